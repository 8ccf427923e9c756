"""Run the PyTorch reference over the masked corpus once, then every variant, one at a time.

Memory stays at about one model plus one variant, whatever the number of variants: only the
reference's logits at the [MASK] positions are kept (every metric is measured there), the PyTorch
model is released before the first variant opens, and each variant's session is closed before the
next one opens. Nothing of size [corpus tokens x vocab] is kept, in RAM or on disk.

Until this version the reference's logits at every real position were also spilled to the cache (1.2
GB for bert-base, 4.7 GB for multilingual) for a max-abs over all positions that no gate, table or
document read; writing them took 3.5-16 s of a cold bert-base build on this machine's disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.errors import StageError
from bertforge.memory import release_freed_memory, reused_large_buffers
from bertforge.predict import MaskText, Prediction, session_predictions
from bertforge.runtime import feeds_for, mask_rows, open_session
from bertforge.validation.config import ValidationConfig
from bertforge.validation.corpus import (
    PROBE_TOP_K,
    Truncation,
    batches,
    corpus_digest,
    probe_texts,
    validation_examples,
)
from bertforge.validation.metrics import Accumulator, ReferenceStats, top_k


def run_validation(checkpoint: Path, variants: dict[str, Path], config: ValidationConfig,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    with reused_large_buffers():  # a logits array a batch: reused heap pages, not fresh mappings (memory.py)
        return _run_validation(checkpoint, variants, config, progress)


def _run_validation(checkpoint: Path, variants: dict[str, Path], config: ValidationConfig,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bertforge.exporter.export import load_reference

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    truncation = Truncation()
    examples = validation_examples(Path(checkpoint), tokenizer, config, truncation)
    examples.sort(key=lambda e: len(e.input_ids))  # less padding per batch
    pad_id = tokenizer.pad_token_id or 0
    # each shard's batches are built when it starts and dropped with it: their arrays never all exist at once
    per_shard = config.batch_size * config.shard_batches
    total = len(examples) * (1 + len(variants))  # sentence passes: the reference's, then each variant's
    done = 0
    reference_stats = ReferenceStats()
    model, missing_head = load_reference(checkpoint)
    model = with_onednn_linears(model)
    masker = MaskText.from_transformers(tokenizer)
    texts = probe_texts(config.probes, tokenizer.mask_token)
    reference_probes = {text: compact(torch_predictions(model, masker, text)) for text in texts}
    accumulators = {name: Accumulator() for name in variants}
    answers: dict[str, dict[str, Any]] = {}
    # Shard by shard (contiguous runs of the length-sorted batches): the reference's logits at the
    # [MASK] positions of one shard, then every variant's over the same shard, accumulated and dropped.
    # Memory holds one shard's logits whatever the corpus's size; the metrics are the same floats in
    # the same order as in one pass, so the report does not depend on the shard size.
    for start in range(0, len(examples), per_shard):
        shard = list(batches(examples[start:start + per_shard], config.batch_size, pad_id=pad_id))
        masked_reference = []
        for batch in shard:
            rows, cols, truth = batch.masked_index()
            with torch.no_grad():  # the MLM head at the [MASK] rows only: the rest of the logits go unread
                hidden = model.bert(input_ids=torch.from_numpy(batch.input_ids),
                                    attention_mask=torch.from_numpy(batch.attention_mask),
                                    token_type_ids=torch.from_numpy(batch.token_type_ids))[0]
                masked_reference.append(model.cls(hidden[torch.from_numpy(rows), torch.from_numpy(cols)]).numpy())
            del hidden
            reference_stats.add(masked_reference[-1], truth)
            done += len(batch.examples)
            if progress:
                progress(done, total)
        reference_tops = [top_k(logits) for logits in masked_reference]  # once, not once per variant
        if start + per_shard >= len(examples):
            model = None  # the last shard: the reference is done, its memory goes before the variants run
            release_freed_memory()
        for name, path in variants.items():
            if start == 0:  # each variant's answers to the probes, once
                answers[name] = validate_shard(name, path, shard, masked_reference, reference_tops,
                                               accumulators[name], masker, texts)
            else:
                validate_shard(name, path, shard, masked_reference, reference_tops, accumulators[name])
            release_freed_memory()  # the variant's session is closed; the next one starts from a low RSS
            done += sum(len(batch.examples) for batch in shard)
            if progress:
                progress(done, total)
        del masked_reference, reference_tops
        release_freed_memory()
    summaries = {name: {**accumulator.summary(), "probes": answers.get(name, {})}
                 for name, accumulator in accumulators.items()}
    return {
        "corpus": {"source": config.corpus, "digest": corpus_digest(config.corpus), "sentences": len(examples),
                   "seed": config.seed, "mask_fraction": config.mask_fraction, "max_sentences": config.max_sentences,
                   "batch_size": config.batch_size,
                   "masked_positions": int(sum(len(e.masked_positions) for e in examples)),
                   **truncation.as_dict()},
        "reference": {**reference_stats.summary(), "mlm_head_missing_from_checkpoint": missing_head,
                      "probes": reference_probes},
        "variants": summaries,
    }


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


def validate_shard(name: str, path: Path, shard: list, masked_reference: list[np.ndarray],
                   reference_tops: list[np.ndarray], accumulator: Accumulator, masker: MaskText | None = None,
                   probes: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """One variant over one shard's batches against their stored reference, added to `accumulator`;
    then its answers to `probes`, returned. Its session is released on return."""
    # the only session open while it runs, so its threads may spin between ops (about 10% faster on
    # bert-base here); no arena, so it does not keep its largest batch's buffers
    session = open_session(path, spinning=True, arena=False)
    for index, batch in enumerate(shard):
        rows, cols, truth = batch.masked_index()
        feeds = feeds_for(session, batch.input_ids, batch.attention_mask, batch.token_type_ids)
        try:  # the masked head's compact rows where it has them (its other logits are zeros)
            accumulator.add(masked_reference[index], mask_rows(session, feeds, rows, cols), truth,
                            reference_tops[index])
        except ValueError as error:
            raise StageError(f"{name}: {error}") from None
    answers = {}
    if masker is not None:
        answers = {text: compact(session_predictions(session, masker, text, PROBE_TOP_K)) for text in probes}
    del session
    return answers
