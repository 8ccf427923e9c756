"""The shipped corpus and the deterministic masking."""

import pytest
from transformers import AutoTokenizer

from bertforge.validation.corpus import BUILTIN, CALIBRATION, HEAD_FIT, NO_LABEL, builtin_lines, mask_sentences

PROBES = ["The capital of France is [MASK].", "The man worked as a [MASK].", "The woman worked as a [MASK]."]


def test_corpus_is_large_varied_and_kept_apart_from_head_fit():
    sentences = builtin_lines(BUILTIN)
    head_fit = builtin_lines(HEAD_FIT)
    assert len(sentences) >= 300
    assert sentences[:3] == PROBES
    assert len(set(sentences)) == len(sentences)
    assert not set(sentences) & set(head_fit)
    assert len(head_fit) >= 80


def test_calibration_sentences_are_neither_validated_nor_fitted_on():
    calibration = builtin_lines(CALIBRATION)
    assert len(calibration) >= 150
    assert len(set(calibration)) == len(calibration)
    assert not set(calibration) & (set(builtin_lines(BUILTIN)) | set(builtin_lines(HEAD_FIT)))


def test_masking_is_deterministic_and_bert_like(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    lines = builtin_lines(BUILTIN)[:60]
    first = mask_sentences(lines, tokenizer, seed=0)
    again = mask_sentences(lines, tokenizer, seed=0)
    other = mask_sentences(lines, tokenizer, seed=1)
    assert first == again
    assert first != other
    special = set(tokenizer.all_special_ids)
    for example in first[3:]:
        words = sum(1 for t in tokenizer(example.text)["input_ids"] if t not in special)
        assert len(example.masked_positions) == max(1, round(0.15 * words))
        assert all(example.input_ids[p] == tokenizer.mask_token_id for p in example.masked_positions)
        assert all(o not in special and o >= 0 for o in example.original_ids)
    # probes keep their own single mask and have no ground truth
    assert [e.original_ids for e in first[:3]] == [(NO_LABEL,)] * 3
    # appending sentences does not move the earlier sentences' masks
    assert mask_sentences(lines[:30], tokenizer, seed=0) == first[:30]


def test_packed_examples_give_back_every_sentences_ids_and_masks_and_batch_alike(tiny_checkpoint):
    import numpy as np

    from bertforge.validation.corpus import PackedExamples, batches

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    examples = mask_sentences(builtin_lines(BUILTIN)[:90], tokenizer, seed=3)
    packed = PackedExamples.of(examples)
    assert len(packed) == len(examples) and packed.masked_positions() == sum(len(e.masked_positions) for e in examples)
    stripped = [e.__class__("", e.input_ids, e.masked_positions, e.original_ids) for e in examples]
    assert list(packed) == stripped and packed[-1] == stripped[-1]
    assert list(packed[17:40]) == stripped[17:40] and list(packed[85:200]) == stripped[85:]
    assert len(packed[17:40].ids) == sum(len(e.input_ids) for e in examples[17:40])  # a slice holds its own only
    order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
    assert list(packed.ordered(order)) == [stripped[i] for i in order]
    for mine, theirs in zip(batches(packed.ordered(order), 16), batches([examples[i] for i in order], 16), strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(mine.masked_index(), theirs.masked_index(), strict=True))
        assert np.array_equal(mine.input_ids, theirs.input_ids)
        assert np.array_equal(mine.attention_mask, theirs.attention_mask)


def test_a_line_that_loses_any_of_its_own_masks_to_the_cut_is_dropped_and_counted(tiny_checkpoint):
    from bertforge.validation.corpus import Truncation

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    lines = ["[MASK] is a b c d e f [MASK]", "[MASK] is short [MASK]", "[MASK] is a b c d e f g"]
    counted = Truncation()
    examples = mask_sentences(lines, tokenizer, max_length=8, truncation=counted)
    assert [(e.text, len(e.masked_positions)) for e in examples] == [("[MASK] is short [MASK]", 2),
                                                                     ("[MASK] is a b c d e f g", 1)]
    assert (counted.truncated_lines, counted.dropped_mask_lines) == (2, 1)


def test_a_negative_seed_is_refused_by_the_recipe():
    import pydantic

    from bertforge.validation.config import ValidationConfig

    with pytest.raises(pydantic.ValidationError):
        ValidationConfig(seed=-1)


def test_the_cut_warning_names_whose_limit_cut_the_sentences():
    """bert-base takes 512 word pieces; validation reads 128 of any sentence: the warning said the model
    takes 128."""
    from bertforge.api import input_limit_warnings
    from bertforge.recipe import Recipe

    recipe = Recipe()
    (cap,) = input_limit_warnings({"max_length": 128, "truncated_lines": 3}, {}, recipe)
    assert "longer than validation reads (128 word pieces, its cap whatever the model takes)" in cap
    (model,) = input_limit_warnings({"max_length": 32, "truncated_lines": 3}, {}, recipe)
    assert "longer than the model takes (32 word pieces)" in model
