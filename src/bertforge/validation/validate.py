"""Run the PyTorch reference over the masked corpus, then every variant, one shard at a time.

Memory stays at about one model plus one variant, whatever the number of variants and the corpus's
size: only one shard's reference logits at the [MASK] positions are kept (every metric is measured
there), the PyTorch model is released before the last shard's variants run, and each variant's
session is closed before the next one opens. Nothing of size [corpus tokens x vocab] is kept, in RAM
or on disk.

A shard is a contiguous run of the length-sorted batches (`ValidationConfig.shard_batches`). Its
result (`ShardResult`: counts, exact sums and extremes, tallies.py) merges with the others' exactly, so
the summaries are the same floats whether the shards ran in this process one after another or as
separate tasks (the Ray executor, ray_executor.py); what is kept grows with the corpus only by the
reference's margins (8 bytes a position) and the packed corpus (~0.1 KB a sentence).

Until an earlier version the reference's logits at every real position were also spilled to the cache
(1.2 GB for bert-base, 4.7 GB for multilingual) for a max-abs over all positions that no gate, table
or document read; writing them took 3.5-16 s of a cold bert-base build on this machine's disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.errors import StageError
from bertforge.memory import release_freed_memory, return_free_heap, reused_large_buffers
from bertforge.predict import MaskText, Prediction, session_predictions
from bertforge.runtime import feeds_for, mask_rows, open_session
from bertforge.validation.batch_metrics import ReferenceRows
from bertforge.validation.config import ValidationConfig
from bertforge.validation.corpus import (
    PROBE_TOP_K,
    MaskedExample,
    PackedExamples,
    Truncation,
    batches,
    corpus_digest,
    probe_texts,
    validation_examples,
)
from bertforge.validation.tallies import Accumulator, ReferenceStats


@dataclass
class Corpus:
    """The validation corpus masked and sorted by length (less padding per batch), cut into shards."""

    examples: PackedExamples
    truncation: Truncation
    per_shard: int  # sentences a shard

    @classmethod
    def of(cls, checkpoint: Path, config: ValidationConfig) -> Corpus:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        truncation = Truncation()
        examples = PackedExamples.of(validation_examples(Path(checkpoint), tokenizer, config, truncation))
        by_length = np.argsort(np.diff(examples.id_starts), kind="stable")  # ties in corpus order
        return cls(examples.ordered(by_length), truncation, config.batch_size * config.shard_batches)

    def shard_count(self) -> int:
        return -(-len(self.examples) // self.per_shard)

    def shard(self, index: int) -> PackedExamples:
        """The index-th shard's sentences, a copy of their own (only one shard's need exist at a time)."""
        return self.examples[index * self.per_shard:(index + 1) * self.per_shard]

    def record(self, config: ValidationConfig) -> dict[str, Any]:
        """report.json's `corpus`."""
        return {"source": config.corpus, "digest": corpus_digest(config.corpus), "sentences": len(self.examples),
                "seed": config.seed, "mask_fraction": config.mask_fraction, "max_sentences": config.max_sentences,
                "batch_size": config.batch_size,
                "masked_positions": self.examples.masked_positions(),
                **self.truncation.as_dict()}


@dataclass
class ShardResult:
    """One or more shards' tallies: the reference's statistics and each variant's metrics, with the
    probes' answers where the first shard is among them."""

    reference: ReferenceStats = field(default_factory=ReferenceStats)
    variants: dict[str, Accumulator] = field(default_factory=dict)
    reference_probes: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing_head: list[str] = field(default_factory=list)  # the head weights the checkpoint lacks (load_reference)

    def merge(self, later: ShardResult) -> None:
        """`later`'s positions into this one's tallies: the shards merged give one pass's summaries."""
        self.reference.merge(later.reference)
        for name, accumulator in later.variants.items():
            self.variants.setdefault(name, Accumulator()).merge(accumulator)
        self.reference_probes = self.reference_probes or later.reference_probes
        self.missing_head = self.missing_head or later.missing_head
        for name, found in later.answers.items():
            self.answers.setdefault(name, found)

    def summary(self, corpus: dict[str, Any]) -> dict[str, Any]:
        return {
            "corpus": corpus,
            "reference": {**self.reference.summary(), "mlm_head_missing_from_checkpoint": self.missing_head,
                          "probes": self.reference_probes},
            "variants": {name: {**accumulator.summary(), "probes": self.answers.get(name, {})}
                         for name, accumulator in self.variants.items()},
        }


class Reference:
    """The PyTorch reference and what a shard needs beside it: the masker, the probes, the pad id."""

    def __init__(self, checkpoint: Path, config: ValidationConfig):
        from transformers import AutoTokenizer

        from bertforge.exporter.export import load_reference

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model, self.missing_head = load_reference(checkpoint)
        self.model = with_onednn_linears(model)
        self.masker = MaskText.from_transformers(tokenizer)
        self.probes = probe_texts(config.probes, tokenizer.mask_token)
        self.pad_id = tokenizer.pad_token_id or 0
        self.batch_size = config.batch_size

    def release(self) -> None:
        self.model = None
        release_freed_memory()


def run_validation(checkpoint: Path, variants: dict[str, Path], config: ValidationConfig,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Every shard in this process, one after another: the reference loaded once."""
    with reused_large_buffers():  # a logits array a batch: reused heap pages, not fresh mappings (memory.py)
        corpus = Corpus.of(checkpoint, config)
        shards = corpus.shard_count()
        total = len(corpus.examples) * (1 + len(variants))  # sentence passes: the reference's, then each variant's
        done = [0]

        def count(sentences: int) -> None:
            done[0] += sentences
            if progress:
                progress(done[0], total)

        reference = Reference(checkpoint, config)
        merged = ShardResult()
        for index in range(shards):
            merged.merge(validate_shard(reference, variants, corpus.shard(index), first=index == 0,
                                        last=index == shards - 1, count=count))
        return merged.summary(corpus.record(config))


def validate_shard(reference: Reference, variants: dict[str, Path], examples: PackedExamples | Sequence[MaskedExample],
                   first: bool, last: bool, count: Callable[[int], None] = lambda n: None) -> ShardResult:
    """The reference's logits at one shard's [MASK] positions, then every variant's against them; with
    `first`, the probes' answers too; with `last`, the reference is released before the variants run.
    The shard's batches are built here and dropped on return: their arrays never all exist at once."""
    import torch

    result = ShardResult(variants={name: Accumulator() for name in variants}, missing_head=reference.missing_head)
    if first:  # the reference's answers to the probes, once
        result.reference_probes = {text: compact(torch_predictions(reference.model, reference.masker, text))
                                   for text in reference.probes}
    shard = list(batches(examples, reference.batch_size, pad_id=reference.pad_id))
    masked_reference = []
    for batch in shard:
        rows, cols, truth = batch.masked_index()
        with torch.no_grad():  # the MLM head at the [MASK] rows only: the rest of the logits go unread
            hidden = reference.model.bert(input_ids=torch.from_numpy(batch.input_ids),
                                          attention_mask=torch.from_numpy(batch.attention_mask),
                                          token_type_ids=torch.from_numpy(batch.token_type_ids))[0]
            masked_reference.append(ReferenceRows.of(  # what each variant's metrics need of it, once
                reference.model.cls(hidden[torch.from_numpy(rows), torch.from_numpy(cols)]).numpy()))
        del hidden
        result.reference.add(masked_reference[-1], truth)
        count(len(batch.examples))
    if last:  # the reference is done: its memory goes before the variants run
        reference.release()
    else:  # the reference's freed buffers (its forward passes' temporaries) go back before the variants run:
        # left on the heap, they made the first variant's peak on a shard vary by up to 0.19 GB from one
        # repetition of the same shard to the next (0.96-1.15 GB); trimmed, 0.97-0.99 (docs/memory.md)
        return_free_heap()
    for name, path in variants.items():
        answers = variant_on_shard(name, path, shard, masked_reference, result.variants[name],
                                   reference.masker if first else None, reference.probes)
        if first:
            result.answers[name] = answers
        release_freed_memory()  # the variant's session is closed; the next one starts from a low RSS
        count(len(examples))
    del masked_reference
    release_freed_memory()
    return result


def with_onednn_linears(model):
    """The reference's nn.Linear layers run through oneDNN (torch.utils.mkldnn) instead of MKL's sgemm.

    Still PyTorch fp32 in eager mode, only another GEMM library: MKL picks a slow path on this AMD
    CPU (154 GFLOP/s at 400x768x3072, against oneDNN's 339), and the reference is a quarter of a
    bert-base build. Measured on synthetic bert-base, batch 16x26: 0.34 s against 0.67-0.81 s a
    forward, logits within 3.9e-6 of the MKL path, the same argmax everywhere. Left as it is where
    oneDNN is not built in."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return model
    from torch.utils import mkldnn

    return mkldnn.to_mkldnn(model)


def torch_predictions(model, masker: MaskText, text: str) -> list[list[Prediction]]:
    """The PyTorch model's top PROBE_TOP_K at the [MASK]s of one probe."""
    import torch

    ids, type_ids, positions = masker.encode(text)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                       token_type_ids=torch.from_numpy(type_ids)).logits.numpy()
    return masker.predictions(ids, positions, logits[0, positions], PROBE_TOP_K)


def compact(predictions: list[list[Prediction]]) -> list[list[list[Any]]]:
    """Per [MASK]: [token_str, score] of each prediction, the form the report keeps."""
    return [[[p.token_str, round(p.score, 6)] for p in found] for found in predictions]


def variant_on_shard(name: str, path: Path, shard: list, masked_reference: list[ReferenceRows],
                     accumulator: Accumulator, masker: MaskText | None = None,
                     probes: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """One variant over one shard's batches against their stored reference, added to `accumulator`;
    then its answers to `probes` (with `masker`), returned. Its session is released on return."""
    # the only session open while it runs, so its threads may spin between ops (about 10% faster on
    # bert-base here), but not after a run: the metric threads need the cores then (threads that spun
    # on made validation's metrics 1.6x slower). With ORT's CPU arena, as every session: it keeps the
    # shard's largest batch's buffers until the session closes, one session at a time. Without it,
    # ORT's intermediates (the logits of every token, up to 57 MB a batch at bert-base's vocabulary) came
    # and went on the C heap, and a shard's peak fell anywhere in 1.01-1.28 GB with the heap's layout;
    # with it, 1.01-1.07 GB over the same 28 shards (docs/memory.md).
    session = open_session(path, spin_only_in_run=True)
    for index, batch in enumerate(shard):
        rows, cols, truth = batch.masked_index()
        feeds = feeds_for(session, batch.input_ids, batch.attention_mask, batch.token_type_ids)
        try:  # the masked head's compact rows where it has them (its other logits are zeros)
            accumulator.add(masked_reference[index], mask_rows(session, feeds, rows, cols), truth)
        except ValueError as error:
            raise StageError(f"{name}: {error}") from None
    answers = {}
    if masker is not None:
        answers = {text: compact(session_predictions(session, masker, text, PROBE_TOP_K)) for text in probes}
    del session
    return answers
