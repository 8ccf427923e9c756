"""int8-auto, the accuracy-first INT8 stage, whole: stage.py (the stage), groups.py and plans.py (the
groups and what each scheme makes of one), weights.py and weight_file.py (the quantized weights every
plan shares), calibration.py, prefix.py, sensitivity.py, screen.py and costs.py (what the search
measures), search.py (the plan), analyze.py (`bertforge sensitivity`)."""
