"""`bertforge fill-mask` / bertforge.fill_mask: optimum's pipeline's answers, without torch."""

import json
import subprocess
import sys

import pytest

TEXTS = ("The capital of France is [MASK].", "The [MASK] sat on the [MASK], didn't it?")


@pytest.mark.parametrize("variant", ["fp32", "fused", "int8-dynamic"])
def test_the_answers_are_optimums_fill_mask_pipelines(tiny_variants, variant):
    from optimum.pipelines import pipeline

    from bertforge.predict import fill_mask

    path = tiny_variants[variant]
    theirs_of = pipeline("fill-mask", model=str(path), accelerator="ort")
    for text in TEXTS:
        theirs = theirs_of(text, top_k=4)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs  # one [MASK]: a flat list
        ours = fill_mask(path, text, top_k=4)
        assert len(ours) == len(theirs) == text.count("[MASK]")
        for mine, reference in zip(ours, theirs, strict=True):
            assert [(p.token, p.token_str, p.sequence) for p in mine] == [
                (r["token"], r["token_str"], r["sequence"]) for r in reference], (variant, text)
            assert [p.score for p in mine] == pytest.approx([r["score"] for r in reference], rel=1e-4)


def test_padding_and_truncation_saved_in_tokenizer_json_change_no_answer(tiny_variants, tmp_path):
    """all-MiniLM's tokenizer.json pads to 128 and cuts at 128, and save_pretrained carries both into every
    variant; transformers turns them off on each call, so the answers must not depend on them."""
    import shutil

    from optimum.pipelines import pipeline

    from bertforge.predict import fill_mask

    path = tmp_path / "fp32"
    shutil.copytree(tiny_variants["fp32"], path)
    tokenizer_file = path / "tokenizer.json"
    tokenizer_file.chmod(0o644)
    saved = json.loads(tokenizer_file.read_text())
    saved["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                        "pad_type_id": 0, "pad_token": "[PAD]"}
    saved["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    tokenizer_file.write_text(json.dumps(saved))
    theirs_of = pipeline("fill-mask", model=str(path), accelerator="ort")
    for text in TEXTS:  # the second text's second [MASK] is the 7th word piece: past the saved cut
        theirs = theirs_of(text, top_k=3)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs
        ours = fill_mask(path, text, top_k=3)
        assert [[(p.token, p.sequence) for p in mine] for mine in ours] == [
            [(r["token"], r["sequence"]) for r in reference] for reference in theirs], text
        assert ours == fill_mask(tiny_variants["fp32"], text, top_k=3)


def test_the_masked_head_variant_answers_like_the_graph_it_came_from(tiny_variants, tmp_path):
    from bertforge.optimizers import masked_head
    from bertforge.optimizers.config import MaskedHeadConfig
    from bertforge.predict import fill_mask
    from bertforge.runtime import open_session

    out = tmp_path / "masked"
    out.mkdir()
    masked_head.run(tiny_variants["fused"], out, MaskedHeadConfig())
    assert [o.name for o in open_session(out).get_outputs()] == ["logits", "mask_logits", "mask_positions"]
    for text in TEXTS:
        ours = fill_mask(out, text)
        full = fill_mask(tiny_variants["fused"], text)
        assert [[p.token for p in found] for found in ours] == [[p.token for p in found] for found in full]
        assert [p.score for found in ours for p in found] == pytest.approx(
            [p.score for found in full for p in found], rel=1e-4)
    # optimum loads it and its fill-mask pipeline gives the full graph's answers
    from optimum.pipelines import pipeline

    through_optimum, of_full = (pipeline("fill-mask", model=str(path), accelerator="ort")(TEXTS[0])
                                for path in (out, tiny_variants["fused"]))
    assert [a["token"] for a in through_optimum] == [a["token"] for a in of_full]
    assert [a["score"] for a in through_optimum] == pytest.approx([a["score"] for a in of_full], rel=1e-4)


def test_the_command_prints_the_top_k_without_importing_torch(tiny_variants):
    variant = str(tiny_variants["int8-dynamic"])
    code = ("import sys; from bertforge.cli import main; "
            f"rc = main(['fill-mask', {variant!r}, {TEXTS[0]!r}, '--top-k', '3', '--json']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'; "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert len(answers) == 1 and len(answers[0]) == 3
    assert set(answers[0][0]) == {"score", "token", "token_str", "sequence"}
    assert answers[0][0]["score"] >= answers[0][1]["score"] >= answers[0][2]["score"]


def test_a_text_without_a_mask_is_a_usage_error(tiny_variants, capsys):
    from bertforge.cli import main

    assert main(["fill-mask", str(tiny_variants["fp32"]), "No mask here."]) == 2
    assert "no [MASK] in" in capsys.readouterr().err


def test_a_build_directory_is_a_usage_error_that_names_its_variants(tmp_path, capsys):
    from bertforge.cli import main

    for variant in ("int8-dynamic", "fp32"):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "model.onnx").write_bytes(b"")
    (tmp_path / "report.md").write_text("")
    assert main(["fill-mask", str(tmp_path), "A [MASK] here."]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a build directory" in err
    assert f"e.g. {tmp_path / 'fp32'} (in it: fp32, int8-dynamic)" in err
    assert main(["fill-mask", str(tmp_path / "fp32"), "A [MASK] here."]) == 2  # no tokenizer.json
    assert "is not a variant directory" in capsys.readouterr().err


def test_a_text_longer_than_the_model_takes_and_a_model_that_is_no_masked_lm_are_usage_errors(tiny_variants,
                                                                                                 tmp_path, capsys):
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from bertforge.cli import main

    variant = tiny_variants["fp32"]
    limit = json.loads((variant / "config.json").read_text())["max_position_embeddings"]
    assert main(["fill-mask", str(variant), "word " * limit + "[MASK]."]) == 2
    assert f"word pieces; the model takes {limit} at most" in capsys.readouterr().err
    # an encoder without the MLM head: its first output is hidden states, not logits
    encoder = tmp_path / "encoder"
    shutil.copytree(variant, encoder)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])
    hidden = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, None, 1])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["as_float"], to=TensorProto.FLOAT),
                               helper.make_node("Unsqueeze", ["as_float", "axes"], ["last_hidden_state"])],
                              "encoder", [ids], [hidden], [helper.make_tensor("axes", TensorProto.INT64, [1], [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(encoder / "model.onnx"))
    (encoder / "model.onnx_data").unlink(missing_ok=True)
    assert main(["fill-mask", str(encoder), "A [MASK] here."]) == 2
    assert "is not a masked-LM variant (inputs: input_ids; outputs: last_hidden_state" in capsys.readouterr().err
