"""Validation shard by shard: the reference's logits of one shard at a time, and the same report
whatever the shard size (issue "Past one machine, part 1")."""

from bertforge.validation.config import ValidationConfig
from bertforge.validation.validate import run_validation


def test_the_metrics_do_not_depend_on_the_shard_size(tiny_checkpoint, tiny_variants):
    variants = {name: tiny_variants[name] for name in ("fp32", "int8-dynamic", "int8-dynamic-masked")
                if name in tiny_variants}
    assert "int8-dynamic" in variants
    results = {size: run_validation(tiny_checkpoint, variants, ValidationConfig(max_sentences=120, shard_batches=size))
               for size in (1, 7, 10_000)}
    whole = results[10_000]
    assert whole["corpus"]["sentences"] == 120 and len(whole["variants"]) == len(variants)
    assert whole["variants"]["int8-dynamic"]["kl_mean"] > 1e-6  # a variant that differs, to be compared
    for size in (1, 7):
        assert results[size] == whole, size
