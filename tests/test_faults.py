"""Bad inputs a CI job may hand bertforge: each is a one-line error with exit 2, found before any stage
runs where it can be, and nothing is written to --out (issue 12's fault suite; the cache, lock and
signal cases are in test_cache.py and test_cli.py)."""

import json
import shutil

import pytest

from bertforge.cli import main


@pytest.fixture
def no_stage_may_run(monkeypatch):
    """A stage that runs raises: a check that happens before the stages exits 2, one after them 3."""
    from bertforge import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran before the input was checked")

    monkeypatch.setattr(pipeline, "run_stage", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def copy_checkpoint(tiny_checkpoint, tmp_path):
    source = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, source)
    return source


def edit_weights(source, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})


def build(args: list[str], out) -> int:
    return main(["build", *args, "--out", str(out), "--quiet"])


@pytest.mark.parametrize("variant, section, presets", [
    ("int8-static", "int8_static", "[embeddings, mlm-decoder, ffn-output]"),
    ("int8-blockwise", "int8_blockwise", "[embeddings]"),
])
def test_an_int8_variant_that_quantized_nothing_names_its_config(variant, section, presets, tiny_checkpoint,
                                                                 tmp_path, capsys):
    recipe = tmp_path / "nothing.yaml"
    recipe.write_text(f"model: {tiny_checkpoint}\nvariants: [{variant}]\n"
                      f"{section}: {{exclude_nodes: ['.*'], exclude_presets: {presets}}}\n")
    out = tmp_path / "out"
    assert build(["--recipe", str(recipe)], out) == 2
    assert f"{variant} quantized nothing: {section}.exclude_presets" in one_line_error(capsys)
    assert not out.exists()


def test_a_config_asking_for_more_layers_than_the_weights_hold_is_an_error(tiny_checkpoint, tmp_path, capsys,
                                                                          no_stage_may_run):
    source = copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] += 1  # transformers would initialise the extra layer at random
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert build(["--model", str(source)], out) == 2
    err = one_line_error(capsys)
    # said from the weight file's header, before any model is built (test_trust: 100,000 layers)
    assert "num_hidden_layers is 3, its weights hold 2 layers (layer.2. would be random)" in err, err
    assert not out.exists()


def test_weights_with_no_place_in_the_model_are_an_error_but_the_other_heads_are_not(tiny_checkpoint, tmp_path,
                                                                                    capsys, no_stage_may_run):
    import torch

    from bertforge.exporter.export import load_reference

    source = copy_checkpoint(tiny_checkpoint, tmp_path)
    # bert-base-uncased's own checkpoint holds the pooler and the next-sentence head: not an error
    edit_weights(source, lambda t: t.update({"bert.pooler.dense.weight": torch.zeros(32, 32),
                                             "cls.seq_relationship.weight": torch.zeros(2, 32)}))
    load_reference(source)
    edit_weights(source, lambda t: t.update({"bert.encoder.layer.7.output.dense.weight": torch.zeros(32, 32)}))
    out = tmp_path / "out"
    assert build(["--model", str(source)], out) == 2
    err = one_line_error(capsys)
    assert "1 weights in the checkpoint have no place in config.json's model: bert.encoder.layer.7" in err, err


@pytest.mark.parametrize("damage", ["truncated", "shape"])
def test_weights_that_do_not_load_are_an_error(damage, tiny_checkpoint, tmp_path, capsys, no_stage_may_run):
    source = copy_checkpoint(tiny_checkpoint, tmp_path)
    weights = source / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # weights that do not fit config.json
        config = json.loads((source / "config.json").read_text())
        config["intermediate_size"] *= 2
        (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert build(["--model", str(source)], out) == 2
    assert "its weights do not load" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("content, key, message", [
    (b"The capital of France is \xff\xfe.\n", "corpus", "is not UTF-8 text (byte 25: invalid start byte)"),
    (b"[CLS]\n[SEP] [SEP]\n", "corpus", "none of its 2 lines has a word to mask once tokenized"),
    (None, "corpus", "does not exist"),
    (b"The capital of France is \xff.\n", "int8_auto", "is not UTF-8 text"),
])
def test_a_bad_corpus_is_found_before_any_stage_runs(content, key, message, tiny_checkpoint, tmp_path, capsys,
                                                     no_stage_may_run):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    recipe = tmp_path / "recipe.yaml"
    where = (f"validation: {{corpus: {corpus}}}" if key == "corpus"
             else f"int8_auto: {{calibration_corpus: {corpus}}}")
    recipe.write_text(f"model: {tiny_checkpoint}\nvariants: [int8-auto]\n{where}\n")
    out = tmp_path / "out"
    assert build(["--recipe", str(recipe)], out) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_a_recipe_that_is_not_utf8_or_has_a_bad_pattern_is_a_usage_error(tiny_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"model: caf\xe9\n")
    assert build(["--recipe", str(recipe)], tmp_path / "out") == 2
    assert "not UTF-8 text" in one_line_error(capsys)
    recipe.write_text(f"model: {tiny_checkpoint}\nint8_dynamic: {{exclude_nodes: ['([']}}\n")
    assert build(["--recipe", str(recipe)], tmp_path / "out") == 2
    assert "int8_dynamic.exclude_nodes.0" in (err := one_line_error(capsys)) and "not a regular expression" in err


def test_an_out_whose_parent_cannot_be_created_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys,
                                                                         no_stage_may_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert build(["--model", str(tiny_checkpoint)], blocker / "sub" / "out") == 2
    assert "is not writable" in one_line_error(capsys)


def test_a_cache_that_cannot_be_created_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                                  no_stage_may_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BERTFORGE_CACHE", str(blocker / "cache"))
    assert build(["--model", str(tiny_checkpoint)], tmp_path / "out") == 2
    assert "the cache" in (err := one_line_error(capsys)) and "is not writable" in err


def test_an_int8_op_type_onnxruntime_does_not_quantize_is_refused_when_the_recipe_is_read(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("int8_dynamic: {op_types: [NotAnOp]}\n")
    assert build(["--recipe", str(recipe)], tmp_path / "out") == 2
    assert "int8_dynamic.op_types.0" in one_line_error(capsys)


@pytest.mark.parametrize("section, setting", [
    ("int8_dynamic", "exclude_nodes: ['/bert/encoder/layer.0/attention/self/qeury/MatMul']"),
    ("fp16", "node_block_list: ['/cls/predictions/decodr/MatMul']"),
])
def test_a_node_name_that_matches_nothing_is_refused_not_ignored(section, setting, tiny_checkpoint, tmp_path,
                                                                  capsys):
    """Misspelt, an exclusion kept nothing fp32, and the build said nothing about it."""
    variant = section.replace("_", "-")
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"model: {tiny_checkpoint}\nvariants: [{variant}]\n{section}: {{{setting}}}\n")
    out = tmp_path / "out"
    assert build(["--recipe", str(recipe)], out) == 2
    err = one_line_error(capsys)
    assert err.startswith("bertforge: error: ") and f"{section}." in err and ("matches no node" in err
                                                                           or "no node named" in err), err
    assert not out.exists()
