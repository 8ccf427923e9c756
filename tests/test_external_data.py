"""The large-model path on a tiny model: with the external-data threshold forced to 0, every stage
writes model.onnx + model.onnx_data, and every variant still validates, verifies and loads where
users load it (onnxruntime, optimum's ORTModelForMaskedLM and fill-mask pipeline)."""

import json

import numpy as np
import onnx
import pytest

from bertforge.cli import main
from bertforge.onnx_files import EXTERNAL_DATA_ENV, MODEL_DATA_FILE

VARIANTS = "fp32,fused,fp16,int8-dynamic,int8-static,int8-blockwise,int8-auto,int8-dynamic-masked"


@pytest.fixture(scope="module")
def external_build(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "b"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EXTERNAL_DATA_ENV, "0")
        code = main(["build", "--model", str(tiny_checkpoint), "--variants", VARIANTS, "--out", str(out),
                     "--max-sentences", "40", "--quiet"])
    return out, code


def test_every_stage_writes_external_data_and_the_build_passes(external_build):
    out, code = external_build
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == VARIANTS.split(",")
    for name in VARIANTS.split(","):
        directory = out / name
        graph, data = directory / "model.onnx", directory / MODEL_DATA_FILE
        assert data.is_file(), name
        # the weights live in the data file: the graph file is a small part of the model
        assert graph.stat().st_size < data.stat().st_size, name
        manifest = json.loads((directory / "manifest.json").read_text())
        assert MODEL_DATA_FILE in manifest["files"], name
        # sizes count the data file
        assert report["variants"][name]["size_bytes"] == graph.stat().st_size + data.stat().st_size, name
        assert report["variants"][name]["data_sha256"] == manifest["files"][MODEL_DATA_FILE]["sha256"], name
        external = [t for t in onnx.load(str(graph), load_external_data=False).graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all(dict((e.key, e.value) for e in t.external_data)["location"] == MODEL_DATA_FILE
                                for t in external), name
        # onnx refuses to read external data through a hard link: the data file is the output's own copy
        assert data.stat().st_nlink == 1 and graph.stat().st_nlink >= 2, name
        onnx.checker.check_model(str(graph))
    assert report["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0


def test_verify_covers_the_data_file(external_build, tmp_path):
    import shutil

    out, _ = external_build
    assert main(["verify", str(out)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = copy / "fused" / MODEL_DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["verify", str(copy)]) == 1


def test_external_data_variants_load_in_onnxruntime_and_optimum(external_build, tiny_checkpoint):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForMaskedLM
    from optimum.pipelines import pipeline
    from transformers import AutoTokenizer

    out, _ = external_build
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    encoded = tokenizer("the capital of france is [MASK].", return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in encoded.items()}
    for name in ("fp32", "fused", "fp16", "int8-dynamic", "int8-static", "int8-blockwise", "int8-auto",
                 "int8-dynamic-masked"):  # the masked head too: its logits are zeros but at [MASK]
        session = ort.InferenceSession(str(out / name / "model.onnx"), providers=["CPUExecutionProvider"])
        direct = session.run(None, feeds)[0]
        model = ORTModelForMaskedLM.from_pretrained(out / name)
        np.testing.assert_allclose(model(**encoded).logits, direct, atol=1e-5, err_msg=name)
        answers = pipeline("fill-mask", model=str(out / name), accelerator="ort")("The capital of France is [MASK].")
        assert len(answers) == 5, name
    assert main(["fill-mask", str(out / "int8-dynamic-masked"), "The capital of France is [MASK].", "--json"]) == 0
