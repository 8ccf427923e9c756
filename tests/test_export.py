"""The export stage on a tiny random BertForMaskedLM: loadable everywhere, tied weights once, parity."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from conftest import tiny_feeds


def test_export_graph_properties(tiny_variants, tiny_checkpoint):
    fp32 = tiny_variants["fp32"]
    model = onnx.load(str(fp32 / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert all(d.dim_param and not d.dim_value for d in dims), "batch and sequence axes must be dynamic"
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    tables = [i for i in model.graph.initializer if sorted(i.dims) == [32, 30522]]
    assert len(tables) == 1, "the tied decoder must not store the embedding table a second time"
    for name in ("config.json", "tokenizer.json", "vocab.txt", "manifest.json"):
        assert (fp32 / name).is_file()


def test_export_matches_pytorch(tiny_variants, tiny_checkpoint):
    from bertforge.exporter.export import load_reference

    reference, missing = load_reference(tiny_checkpoint)
    assert missing == []
    feeds = tiny_feeds()
    session = ort.InferenceSession(str(tiny_variants["fp32"] / "model.onnx"))
    onnx_logits = session.run(None, feeds)[0]
    with torch.no_grad():
        torch_logits = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4
    assert (onnx_logits.argmax(-1) == torch_logits.argmax(-1)).all()


def test_every_variant_loads_in_optimum_and_the_pipeline(tiny_variants):
    from optimum.onnxruntime import ORTModelForMaskedLM
    from optimum.pipelines import pipeline
    from transformers import AutoTokenizer

    for name, path in tiny_variants.items():
        model = ORTModelForMaskedLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        out = model(**tokenizer("the capital of france is [MASK].", return_tensors="np"))
        assert out.logits.shape[-1] == 30522, name
        fill = pipeline("fill-mask", model=str(path), accelerator="ort")
        answers = fill("The capital of France is [MASK].")
        assert len(answers) == 5 and all("token_str" in a for a in answers), name


def test_variants_optimum_has_a_format_for_carry_its_ort_config(tiny_variants, int8_variants):
    """ort_config.json, read back by optimum's own ORTConfig, says what was done in optimum's terms."""
    from optimum.onnxruntime.configuration import ORTConfig

    def read(name):
        graph = onnx.load(str(tiny_variants[name] / "model.onnx"), load_external_data=False)
        opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        assert ORTConfig.from_pretrained(tiny_variants[name]).opset == opset, name  # optimum reads it back
        return json.loads((tiny_variants[name] / "ort_config.json").read_text())

    fused, fp16, dynamic, static = (read(n) for n in ("fused", "fp16", "int8-dynamic", "int8-static"))
    assert fused["quantization"] == {} or fused["quantization"] is None
    assert fused["optimization"]["fp16"] is False and fused["optimization"]["optimization_level"] == 0
    assert not fused["optimization"]["disable_embed_layer_norm_fusion"]
    assert fp16["optimization"]["fp16"] is True
    assert dynamic["quantization"]["is_static"] is False and dynamic["quantization"]["format"] == "QOperator"
    assert dynamic["quantization"]["per_channel"] is True and dynamic["quantization"]["weights_dtype"] == "QInt8"
    assert dynamic["optimization"] == fused["optimization"]  # quantized from the fused graph
    assert static["quantization"]["is_static"] is True and static["quantization"]["format"] == "QDQ"
    assert any("/cls/predictions/decoder" in n for n in static["quantization"]["nodes_to_exclude"])
    # no ORTConfig form for these: none is written rather than a wrong one
    variants = {**tiny_variants, **int8_variants}
    for name in ("fp32", "int8-blockwise", "int8-weights", "int8-auto", "int8-dynamic-masked", "int8-auto-masked"):
        assert not (variants[name] / "ort_config.json").exists(), name


def test_an_encoder_without_an_mlm_head_exports_and_validates_against_the_same_head(tiny_checkpoint, tmp_path):
    """A checkpoint of BertModel alone: transformers draws the missing head at random on every load, and
    the export and each validation reference are separate loads. The head is seeded, so fp32 meets its
    parity gate and the report says the head was not in the checkpoint."""
    import json
    import shutil

    import torch
    from transformers import BertForMaskedLM

    import bertforge
    from bertforge.exporter.export import load_reference

    encoder = tmp_path / "encoder"
    BertForMaskedLM.from_pretrained(tiny_checkpoint).bert.save_pretrained(encoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(tiny_checkpoint / name, encoder / name)
    first, missing = load_reference(encoder)
    second, _ = load_reference(encoder)
    assert "cls.predictions.transform.dense.weight" in missing
    ids = torch.tensor([[101, 2054, 103, 102]])
    assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)
    outcome = bertforge.build(tmp_path / "out", model=str(encoder), variants=["fp32", "fused"],
                              validation={"max_sentences": 20}, bench={"enabled": False})
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert outcome.exit_code == 0, [g for v in report["variants"].values() for g in v["gates"] if not g["passed"]]
    assert report["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0
    assert "cls.predictions.transform.dense.weight" in report["reference"]["mlm_head_missing_from_checkpoint"]
