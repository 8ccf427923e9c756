"""Validation shard by shard: the reference's logits of one shard at a time, and the same report
whatever the shard size (issue "Past one machine, part 1")."""

from bertforge.validation.config import ValidationConfig
from bertforge.validation.validate import run_validation


def test_the_metrics_do_not_depend_on_the_shard_size(tiny_checkpoint, tiny_variants, int8_variants):
    """The masked head's validation (logits at the [MASK] rows only) included."""
    variants = {"fp32": tiny_variants["fp32"], "int8-dynamic": tiny_variants["int8-dynamic"],
                "int8-dynamic-masked": int8_variants["int8-dynamic-masked"]}
    results = {size: run_validation(tiny_checkpoint, variants, ValidationConfig(max_sentences=120, shard_batches=size))
               for size in (1, 7, 10_000)}
    whole = results[10_000]
    assert whole["corpus"]["sentences"] == 120 and len(whole["variants"]) == len(variants)
    assert whole["variants"]["int8-dynamic"]["kl_mean"] > 1e-6  # a variant that differs, to be compared
    for size in (1, 7):
        assert results[size] == whole, size


def test_each_variant_session_reuses_its_buffers_from_batch_to_batch(tiny_checkpoint, tiny_variants, monkeypatch):
    """Validation's sessions run with ORT's CPU arena and memory pattern, one at a time: without them each
    batch's intermediates came and went on the C heap and the peak varied by up to 0.27 GB from shard to
    shard (variant_on_shard), so a larger corpus peaked higher only by having more shards."""
    import bertforge.validation.validate as validate

    open_session, opened = validate.open_session, []

    def recorded(path, **options):
        session = open_session(path, **options)
        opened.append(session.get_session_options())
        return session

    monkeypatch.setattr(validate, "open_session", recorded)
    run_validation(tiny_checkpoint, {"fp32": tiny_variants["fp32"]}, ValidationConfig(max_sentences=20))
    assert opened, "validation opened no session"
    assert all(o.enable_cpu_mem_arena and o.enable_mem_pattern for o in opened)


def test_the_heap_is_trimmed_after_each_shards_reference_before_its_first_variant(tiny_checkpoint, tiny_variants,
                                                                                   monkeypatch):
    """The reference's freed buffers go back to the OS before a shard's variants run: left on the heap, the
    first variant's peak varied by up to 0.19 GB between repetitions of the same shard (docs/memory.md)."""
    import bertforge.validation.validate as validate

    events = []

    def recording(owner, name, mark):
        function = getattr(owner, name)

        def recorded(*args, **kwargs):
            events.append(mark)
            return function(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    recording(validate, "return_free_heap", "T")
    recording(validate, "open_session", "V")
    recording(validate.ReferenceRows, "of", "R")
    run_validation(tiny_checkpoint, {"fp32": tiny_variants["fp32"]}, ValidationConfig(max_sentences=40,
                                                                                      shard_batches=1))
    shards = "".join(events).split("V")  # each shard's steps up to its variant's session
    assert len(shards) >= 3, events  # more than one shard, the last one's reference released rather than trimmed
    assert all(part.endswith("RT") for part in shards[:-2]), events
