"""Run every variant and the PyTorch reference over the masked corpus, batch by batch.

The reference runs once per batch and its logits are compared with every variant's before the next
batch, so it is computed once per build and nothing of size [corpus tokens x vocab] is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.errors import StageError
from bertforge.recipe import ValidationConfig
from bertforge.runtime import feeds_for, open_session
from bertforge.validation.corpus import batches, load_lines, mask_sentences
from bertforge.validation.metrics import Accumulator, ReferenceStats


def run_validation(checkpoint: Path, variants: dict[str, Path], config: ValidationConfig,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bertforge.exporter.export import load_reference

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    examples = mask_sentences(load_lines(config.corpus), tokenizer, seed=config.seed,
                              fraction=config.mask_fraction, limit=config.max_sentences)
    examples.sort(key=lambda e: len(e.input_ids))  # less padding per batch
    model, missing_head = load_reference(checkpoint)
    sessions = {name: open_session(path, spinning=False, arena=False) for name, path in variants.items()}
    accumulators = {name: Accumulator() for name in variants}
    reference_stats = ReferenceStats()
    total = len(examples)
    done = 0
    for batch in batches(examples, config.batch_size, pad_id=tokenizer.pad_token_id or 0):
        with torch.no_grad():
            reference = model(input_ids=torch.from_numpy(batch.input_ids),
                              attention_mask=torch.from_numpy(batch.attention_mask),
                              token_type_ids=torch.from_numpy(batch.token_type_ids)).logits.numpy()
        rows, cols, truth = batch.masked_index()
        real = batch.attention_mask.astype(bool)
        reference_masked = reference[rows, cols]
        reference_stats.add(reference_masked, truth)
        for name, session in sessions.items():
            logits = session.run(None, feeds_for(session, batch.input_ids, batch.attention_mask,
                                                 batch.token_type_ids))[0]
            if logits.ndim == 2:  # a masked-head variant: one row per [MASK], row-major like rows/cols
                if logits.shape[0] != len(rows):
                    raise StageError(f"{name}: {logits.shape[0]} logit rows for {len(rows)} [MASK] positions")
                accumulators[name].add(reference_masked, logits, truth)
                continue
            accumulators[name].add(reference_masked, logits[rows, cols], truth)
            accumulators[name].add_all_positions(np.abs(logits[real] - reference[real]).max())
        done += len(batch.examples)
        if progress:
            progress(done, total)
    return {
        "corpus": {"source": config.corpus, "sentences": total, "seed": config.seed,
                   "masked_positions": int(sum(len(e.masked_positions) for e in examples))},
        "reference": {**reference_stats.summary(), "mlm_head_missing_from_checkpoint": missing_head},
        "variants": {name: acc.summary() for name, acc in accumulators.items()},
    }
