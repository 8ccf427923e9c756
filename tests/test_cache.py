"""The stage cache: hits skip the stage, keys chain, interrupted writes are never trusted."""

import pytest

from bertforge import pipeline
from bertforge.artifact import MANIFEST, Artifact, verify_directory
from bertforge.cache import cache_root, stage_key
from bertforge.recipe import FusionConfig, Int8DynamicConfig


def test_key_changes_with_config_version_and_parent():
    base = stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base == stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "2", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "1", {"opt_level": 1}, libraries={"onnx": "1"})
    assert base != stage_key("other", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "2"})
    # a child's key is built from its parent's: a changed parent key changes every descendant
    assert stage_key(base, "fp16", "1", {}) != stage_key(stage_key("p2", "fusion", "1", {}), "fp16", "1", {})


def test_unhashable_config_is_an_error():
    with pytest.raises(TypeError, match="cannot be hashed"):
        stage_key("p", "fusion", "1", {"bad": object()})


def test_cache_hit_skips_the_stage_function(tiny_variants, monkeypatch):
    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    calls = []
    original = pipeline.STAGES["int8-dynamic"].run
    monkeypatch.setattr(pipeline.STAGES["int8-dynamic"], "run", lambda *a: calls.append(a) or original(*a))
    _, cached, _ = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig())
    assert cached and calls == []
    # only the int8 config changed: the stage runs again, its parent (fusion) is untouched
    artifact, cached, _ = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig(per_channel=False))
    assert not cached and len(calls) == 1
    assert artifact.path != tiny_variants["int8-dynamic"]


def test_a_stage_killed_midway_leaves_nothing_trusted(tiny_variants, monkeypatch):
    fp32 = Artifact(tiny_variants["fp32"], tiny_variants["fp32"].name.split("-", 1)[1], "export", None)

    def dies_after_writing(src, out, config):
        (out / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt  # what a kill during the stage looks like to Python

    monkeypatch.setattr(pipeline.STAGES["fusion"], "run", dies_after_writing)
    config = FusionConfig(opt_level=1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("fusion", fp32, config)
    key = stage_key(fp32.key, "fusion", pipeline.STAGES["fusion"].VERSION, config.model_dump(mode="json"))
    assert not (cache_root() / "stages" / f"fusion-{key}").exists()
    assert not list((cache_root() / "stages").glob(".tmp-*")), "the temporary directory is removed"
    # a hard kill (no cleanup) leaves at most a .tmp-* directory, which no lookup ever reads:
    leftover = cache_root() / "stages" / f".tmp-fusion-{key}-dead"
    (leftover / "model.onnx").parent.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    monkeypatch.undo()
    artifact, cached, _ = pipeline.run_stage("fusion", fp32, config)
    assert not cached and (artifact.path / MANIFEST).is_file()
    assert verify_directory(artifact.path) == []


def test_verify_catches_a_flipped_byte(tiny_variants, tmp_path):
    import shutil

    copy = tmp_path / "fp16"
    shutil.copytree(tiny_variants["fp16"], copy)
    assert verify_directory(copy) == []
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    assert verify_directory(copy) == ["model.onnx: sha256 differs from the manifest"]
    (copy / "extra.bin").write_bytes(b"x")
    assert "extra.bin: not listed in the manifest" in verify_directory(copy)


def test_rebuild_is_byte_identical(tiny_checkpoint, tiny_variants, tmp_path):
    """The same recipe on the same machine gives the same model files, stage by stage."""
    import os

    from bertforge.artifact import sha256_file
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    os.environ["BERTFORGE_CACHE"] = str(tmp_path / "fresh-cache")
    try:
        recipe = Recipe(model=str(tiny_checkpoint), int8_static={"calibration_samples": 8})
        state = pipeline.build_variants(recipe, resolve(recipe.model), Progress("quiet"))
    finally:
        os.environ["BERTFORGE_CACHE"] = str(tiny_variants["fp32"].parent.parent)
    for name, run in state.artifacts.items():
        assert not run.cached
        assert run.artifact.path.name == tiny_variants[name].name, f"{name}: same key"
        for file in ("model.onnx", "config.json", "tokenizer.json"):
            assert sha256_file(run.artifact.path / file) == sha256_file(tiny_variants[name] / file), (name, file)


def test_two_builds_sharing_a_cache_run_a_stage_once(tiny_variants, monkeypatch):
    import threading
    import time

    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    calls = []
    original = pipeline.STAGES["int8-dynamic"].run

    def slow(*args):
        calls.append(args)
        time.sleep(0.5)  # the second build arrives while the first is writing
        return original(*args)

    monkeypatch.setattr(pipeline.STAGES["int8-dynamic"], "run", slow)
    config = Int8DynamicConfig(reduce_range=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pipeline.run_stage("int8-dynamic", fused, config)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(cached for _, cached, _ in results) == [False, True]
    assert verify_directory(results[0][0].path) == []


def test_source_keys_differ_for_checkpoints_kept_under_a_dot_cache_folder(tiny_checkpoint, tmp_path):
    """Checkpoints usually live under ~/.cache; that part of their path must not hide their files."""
    import shutil

    from bertforge.sources import ResolvedSource
    from conftest import make_tiny_checkpoint

    home_cache = tmp_path / ".cache" / "bertforge" / "sources"
    first = home_cache / "a"
    shutil.copytree(tiny_checkpoint, first)
    second = make_tiny_checkpoint(home_cache / "b", seed=1)
    hub_meta = first / ".cache" / "huggingface"
    hub_meta.mkdir(parents=True)
    (hub_meta / "download.lock").write_text("ignored")  # huggingface_hub metadata inside a checkpoint

    def key(path):
        return pipeline.source_artifact(ResolvedSource(str(path), path, "local", "")).key

    plain = pipeline.source_artifact(ResolvedSource("t", tiny_checkpoint, "local", "")).key
    assert key(first) == plain != key(second)


def test_cached_validation_follows_the_corpus_text(tmp_path):
    from bertforge.validation.corpus import corpus_digest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n")
    before = corpus_digest(str(corpus))
    corpus.write_text("The cat sat on the mat.\nA second sentence.\n")
    assert corpus_digest(str(corpus)) != before
    assert corpus_digest("builtin") != corpus_digest("head-fit")
