"""Checkpoints as transformers saves them: one safetensors file, sharded safetensors with an index,
pytorch_model.bin (one file or sharded). Each builds; a shard missing from its index is one line."""

import json

import pytest

from bertforge.cli import main
from conftest import make_tiny_checkpoint, tiny_feeds


def resave(source, path, **save_options):
    from transformers import AutoTokenizer, BertForMaskedLM

    BertForMaskedLM.from_pretrained(source).save_pretrained(path, **save_options)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("plain") / "checkpoint")


@pytest.mark.parametrize("options, weights", [
    ({"max_shard_size": "1MB"}, "model.safetensors.index.json"),
    ({"safe_serialization": False}, "pytorch_model.bin"),
    ({"safe_serialization": False, "max_shard_size": "1MB"}, "pytorch_model.bin.index.json"),
])
def test_every_checkpoint_layout_builds_the_same_model(plain, tmp_path, capsys, options, weights):
    checkpoint = resave(plain, tmp_path / "checkpoint", **options)
    assert (checkpoint / weights).is_file()
    if weights.endswith("index.json"):
        assert len(set(json.loads((checkpoint / weights).read_text())["weight_map"].values())) > 1
    out = tmp_path / "out"
    assert main(["build", "--model", str(checkpoint), "--variants", "fp32,int8-dynamic", "--out", str(out),
                 "--max-sentences", "30", "--no-latency", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0
    assert report["variants"]["fp32"]["metrics"]["max_abs"] < 1e-4
    # the same model as the original single-file checkpoint: its PyTorch logits, from the export
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import BertForMaskedLM

    feeds = tiny_feeds()
    with torch.no_grad():
        original = BertForMaskedLM.from_pretrained(plain).eval()(
            **{name: torch.from_numpy(value) for name, value in feeds.items()}).logits.numpy()
    exported = ort.InferenceSession(str(out / "fp32" / "model.onnx")).run(None, feeds)[0]
    assert np.abs(exported - original).max() < 1e-4


def test_a_missing_shard_is_one_line_before_any_work(plain, tmp_path, capsys):
    checkpoint = resave(plain, tmp_path / "checkpoint", max_shard_size="1MB")
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (checkpoint / lost).unlink()
    out = tmp_path / "out"
    assert main(["build", "--model", str(checkpoint), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shards and 1 are missing" in err[0] and lost in err[0]
    assert not out.exists()


def test_a_malformed_config_or_weights_index_is_one_line_naming_what_is_wrong(plain, tmp_path):
    import shutil

    from bertforge.errors import SourceError
    from bertforge.sources.checkpoint import check_checkpoint

    checkpoint = tmp_path / "c"
    shutil.copytree(plain, checkpoint)
    config = (checkpoint / "config.json").read_text()
    for text, said in (("[1, 2]", "config.json: not a JSON object"), ('{"hidden_size": 8}', "has no model_type")):
        (checkpoint / "config.json").write_text(text)
        with pytest.raises(SourceError, match=said):
            check_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text(config)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(SourceError, match="is not a weights index: its weight_map names something that is no file"):
        check_checkpoint(checkpoint)
