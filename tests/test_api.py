"""The Python API at the package top: bertforge.build, validate, compare, fill_mask."""

import subprocess
import sys

import bertforge


def test_build_validate_compare_and_fill_mask_from_python(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    outcome = bertforge.build(out, model=str(tiny_checkpoint), variants=["fp32", "int8-dynamic"],
                              validation={"max_sentences": 20}, bench={"enabled": False})
    assert outcome.exit_code == 0 and outcome.out == out
    assert list(outcome.report["variants"]) == ["fp32", "int8-dynamic"] and outcome.report["gates_passed"]
    assert [g["metric"] for g in outcome.report["variants"]["int8-dynamic"]["gates"]] == [
        "top1_agreement", "top5_overlap", "ref_top1_in_top5"]  # its default gates, on
    assert (out / "report.json").is_file()

    again = bertforge.validate(out)  # the recipe recorded in build.json
    assert again.exit_code == 0
    assert again.report["variants"]["fp32"]["metrics"] == outcome.report["variants"]["fp32"]["metrics"]
    assert bertforge.compare(out, out)["regressions"] == []
    # again: importing its module must not replace the function on the package (it did: bertforge.compare
    # was also the submodule's name, and the second call raised "'module' object is not callable")
    assert callable(bertforge.compare) and bertforge.compare(out, out)["regressions"] == []

    answers = bertforge.fill_mask(out / "int8-dynamic", "The capital of France is [MASK].", top_k=3)
    assert len(answers) == 1 and len(answers[0]) == 3 and 0 < answers[0][0].score <= 1


def test_importing_bertforge_imports_no_heavy_library():
    code = ("import sys, bertforge; heavy = {'torch', 'transformers', 'onnxruntime', 'onnx'} & set(sys.modules); "
            "assert not heavy, heavy; assert callable(bertforge.build) and callable(bertforge.fill_mask)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
