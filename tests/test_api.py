"""The Python API at the package top: bertforge.build, validate, compare, fill_mask."""

import subprocess
import sys

import bertforge


def test_build_validate_compare_and_fill_mask_from_python(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    no_int8_gate = {"top1_min": None, "top5_overlap_min": None, "ref_top1_in_top5_min": None}
    outcome = bertforge.build(out, model=str(tiny_checkpoint), variants=["fp32", "int8-dynamic"],
                              validation={"max_sentences": 20, "gates": {"int8-dynamic": no_int8_gate}},
                              bench={"enabled": False})
    assert outcome.exit_code == 0 and outcome.out == out
    assert list(outcome.report["variants"]) == ["fp32", "int8-dynamic"] and outcome.report["gates_passed"]
    assert (out / "report.json").is_file()

    again = bertforge.validate(out)  # the recipe recorded in build.json
    assert again.exit_code == 0
    assert again.report["variants"]["fp32"]["metrics"] == outcome.report["variants"]["fp32"]["metrics"]
    assert bertforge.compare(out, out)["regressions"] == []

    answers = bertforge.fill_mask(out / "int8-dynamic", "The capital of France is [MASK].", top_k=3)
    assert len(answers) == 1 and len(answers[0]) == 3 and 0 < answers[0][0].score <= 1


def test_importing_bertforge_imports_no_heavy_library():
    code = ("import sys, bertforge; heavy = {'torch', 'transformers', 'onnxruntime', 'onnx'} & set(sys.modules); "
            "assert not heavy, heavy; assert callable(bertforge.build) and callable(bertforge.fill_mask)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
