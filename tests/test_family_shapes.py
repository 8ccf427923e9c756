"""A BERT unlike bert-base-uncased builds end to end: vocabulary 1000, cased, one token type,
32 positions, special-token ids 0-4. Every input the pipeline makes comes from the model."""

import json

import numpy as np
import pytest

from bertforge.cli import main
from conftest import make_family_checkpoint


@pytest.fixture(scope="module")
def family_build(tmp_path_factory):
    checkpoint = make_family_checkpoint(tmp_path_factory.mktemp("family") / "checkpoint")
    out = tmp_path_factory.mktemp("family-out") / "b"
    variants = "fp32,fused,fp16,int8-dynamic,int8-static,int8-blockwise,int8-auto,int8-dynamic-masked"
    code = main(["build", "--model", str(checkpoint), "--variants", variants, "--out", str(out), "--quiet"])
    return checkpoint, out, code


def test_every_standard_variant_builds_validates_and_is_timed(family_build):
    _, out, code = family_build
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["fp32", "fused", "fp16", "int8-dynamic", "int8-static", "int8-blockwise",
                                        "int8-auto", "int8-dynamic-masked"]
    assert report["variants"]["int8-dynamic-masked"]["metadata"]["mask_token_id"] == 4
    for name, entry in report["variants"].items():
        assert entry["latency"]["p50_ms"] > 0 and entry["latency"]["sequence"] == 32, name
        assert entry["metrics"]["positions"] > 100, name
    assert report["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0
    # the masked-head directory says what its logits are, and how to fill masks with it
    card = (out / "int8-dynamic-masked" / "README.md").read_text()
    assert "zeros at every other position" in card and "bertforge fill-mask int8-dynamic-masked" in card


def test_the_input_limit_is_the_models_and_its_effects_are_reported(family_build):
    _, out, _ = family_build
    report = json.loads((out / "report.json").read_text())
    corpus = report["corpus"]
    # the project corpus has sentences up to 95 word pieces: cut to 32, and counted
    assert corpus["max_length"] == 32 and corpus["truncated_lines"] > 0
    assert any("longer than the model takes (32 word pieces)" in w for w in report["warnings"])
    assert any("latency measured at sequence 32" in w for w in report["warnings"])
    assert "p50 ms b1×s32" in (out / "report.md").read_text()


def test_synthetic_inputs_use_the_models_ids(family_build):
    from bertforge.bench import InputSpec, synthetic_inputs

    checkpoint, _, _ = family_build
    spec = InputSpec.of(checkpoint)
    assert (spec.vocab_size, spec.cls_id, spec.sep_id, spec.mask_id, spec.max_positions) == (1000, 2, 3, 4, 32)
    ids = synthetic_inputs(2, spec.sequence(128), spec)["input_ids"]
    assert ids.shape == (2, 32) and ids.max() < 1000
    assert list(ids[0, [0, 16, 31]]) == [2, 4, 3]
    assert np.all(ids[:, 1:16] > 4)
    with pytest.raises(ValueError, match="longer than the model takes"):
        synthetic_inputs(1, 33, spec)


def test_a_line_whose_mask_is_cut_off_is_counted_not_masked_elsewhere(family_build):
    from transformers import AutoTokenizer

    from bertforge.validation.corpus import Truncation, mask_sentences

    checkpoint, _, _ = family_build
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    long_tail = " ".join(["the cat sat on the mat"] * 10) + " [MASK]."
    counted = Truncation()
    examples = mask_sentences(["The capital of France is [MASK].", long_tail, "A short line."], tokenizer,
                              max_length=32, truncation=counted)
    assert [e.text for e in examples] == ["The capital of France is [MASK].", "A short line."]
    assert (counted.truncated_lines, counted.dropped_mask_lines) == (1, 1)


def test_synthetic_family_members_have_their_published_shapes_and_usable_vocabularies(tmp_path, capsys):
    from transformers import BertTokenizerFast

    from bertforge.sources import synthetic
    from bertforge.sources.demo import demo_package_dir

    published = {  # layers, hidden, heads, intermediate, vocabulary (the checkpoints' config.json)
        "bert-base-uncased": (12, 768, 12, 3072, 30522), "bert-base-cased": (12, 768, 12, 3072, 28996),
        "bert-large-uncased": (24, 1024, 16, 4096, 30522), "bert-large-cased": (24, 1024, 16, 4096, 28996),
        "bert-large-uncased-whole-word-masking": (24, 1024, 16, 4096, 30522),
        "bert-large-cased-whole-word-masking": (24, 1024, 16, 4096, 28996),
        "bert-base-chinese": (12, 768, 12, 3072, 21128), "bert-base-multilingual-cased": (12, 768, 12, 3072, 119547),
    }
    assert {name: (m.layers, m.hidden, m.heads, m.intermediate, m.vocab_size)
            for name, m in synthetic.FAMILY.items()} == published
    uncased = (demo_package_dir() / "vocab.txt").read_text("utf-8").splitlines()
    for size in (28996, 21128, 119547):
        vocabulary = synthetic.derived_vocabulary(uncased, size, cased=True)
        assert len(vocabulary) == len(set(vocabulary)) == size
        assert vocabulary[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        path = tmp_path / f"vocab-{size}.txt"
        path.write_text("\n".join(vocabulary) + "\n")
        tokens = BertTokenizerFast(vocab_file=str(path), do_lower_case=False).tokenize(
            "The capital of France is [MASK].")
        assert "[UNK]" not in tokens and "[MASK]" in tokens and tokens[0] == "The"
    assert main(["resolve", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"synthetic:{name}:" in listed for name in published)


def test_a_synthetic_checkpoint_missing_its_weights_is_made_again(tmp_path, monkeypatch):
    from bertforge.sources import synthetic

    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    # a member this small builds in a second; ensure() treats it as any family member
    monkeypatch.setitem(synthetic.FAMILY, "bert-test-2x32", synthetic.Member(2, 32, 2, 64, 30522, cased=False))
    made = synthetic.ensure("bert-test-2x32")
    weights = (made / "model.safetensors").read_bytes()
    (made / "model.safetensors").unlink()  # deleted by hand: the entry's config.json is still there
    again = synthetic.ensure("bert-test-2x32")
    assert again == made and (again / "model.safetensors").read_bytes() == weights  # seeded: the same weights
    (again / "tokenizer.json").unlink()
    assert (synthetic.ensure("bert-test-2x32") / "tokenizer.json").is_file()


def test_bench_times_a_32_position_model_once_per_batch_under_the_sequence_it_ran(family_build, capsys):
    _, out, _ = family_build
    assert main(["bench", str(out / "fp32"), "--repeats", "1", "--warmup", "0", "--no-memory", "--json",
                 "--quiet"]) == 0
    shapes = json.loads(capsys.readouterr().out)["shapes"]
    assert list(shapes) == ["b1xs32", "b8xs32"]  # 128 and 32 asked: both are 32 on this model
    assert all(row["sequence"] == 32 for table in shapes.values() for row in table.values())


def test_bench_names_a_tokenizer_file_that_does_not_parse(family_build, tmp_path, capsys):
    import shutil

    _, out, _ = family_build
    variant = tmp_path / "fp32"
    shutil.copytree(out / "fp32", variant)
    (variant / "tokenizer.json").chmod(0o644)
    (variant / "tokenizer.json").write_text("{bad")
    assert main(["bench", str(variant), "--repeats", "1", "--no-memory", "--quiet"]) == 2
    assert f"{variant / 'tokenizer.json'}: the tokenizer does not load" in capsys.readouterr().err
