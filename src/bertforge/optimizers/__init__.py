"""Graph passes, one a file: fusion, fp16, int8 dynamic, int8 static."""
