"""The calibration split int8-auto plans on, and running a plan's graph over it to the logits at its
[MASK] positions.

Per-group INT8 sensitivity and per-scheme cost, measured on a calibration split.

The calibration split is the project's calibration sentences masked with their own seeds: neither
the validation corpus nor the demo head's fit sentences, so a plan chosen here is judged on
sentences it was not chosen on, and the head is no surer here than on new text. The reference is the
model's own fp32 graph as every plan builds its fp32 groups (`apply_plan(model, {})`: the
MultiHeadAttention fusion of the export with fp32 Q/K/V packed back into Attention, equal to PyTorch
to ~1e-4), run once (fp32_values); every candidate graph is run over the same batches and compared at
the [MASK] positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bertforge.optimizers.int8_auto.masked_rows import GATHER_INDEX, mask_index
from bertforge.optimizers.int8_auto.prefix import LayerPrefix
from bertforge.optimizers.int8_auto.weight_file import WeightFile

CALIBRATION_SEEDS = (7, 8)
WARMUP_RUNS = 3


@dataclass
class CalibrationSplit:
    feeds: list[dict[str, np.ndarray]]
    rows: list[np.ndarray]
    cols: list[np.ndarray]
    # each batch's index in the split it was taken from (`every`): the one LayerPrefix stored its values by
    batch_ids: list[int] | None = None

    @property
    def positions(self) -> int:
        return int(sum(len(r) for r in self.rows))

    def batch_id(self, index: int) -> int:
        return index if self.batch_ids is None else self.batch_ids[index]

    def every(self, stride: int) -> tuple[CalibrationSplit, np.ndarray]:
        """Every `stride`-th batch (the first, then each stride-th after it), and the indices of its
        [MASK] positions among this split's (logits are concatenated in batch order). The batches are
        sorted by length, so the subset spans every length the split has."""
        keep = list(range(0, len(self.feeds), stride))
        starts = np.cumsum([0] + [len(r) for r in self.rows])
        positions = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep]) if keep else np.arange(0)
        return (CalibrationSplit([self.feeds[i] for i in keep], [self.rows[i] for i in keep],
                                 [self.cols[i] for i in keep], [self.batch_id(i) for i in keep]), positions)


def calibration_split(checkpoint: Path, corpus: str = "calibration", seeds: tuple[int, ...] = CALIBRATION_SEEDS,
                      batch_size: int = 32) -> CalibrationSplit:
    from bertforge.validation.corpus import batches, calibration_examples

    tokenizer, examples = calibration_examples(checkpoint, corpus, seeds)
    examples.sort(key=lambda e: len(e.input_ids))
    split = CalibrationSplit([], [], [])
    for batch in batches(examples, batch_size, pad_id=tokenizer.pad_token_id or 0):
        split.feeds.append({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                            "token_type_ids": batch.token_type_ids})
        rows, cols, _ = batch.masked_index()
        split.rows.append(rows)
        split.cols.append(cols)
    return split


def session_for(model: onnx.ModelProto, threads: int | None = None, profile_prefix: str | None = None,
                weight_file: WeightFile | None = None):
    """A session over `model`; with `weight_file`, its large base initializers are read from that file."""
    import onnxruntime as ort

    from bertforge.runtime import session_options

    options = session_options(threads, spinning=False)
    if weight_file is not None:
        weight_file.configure(options)
        model = weight_file.referencing(model)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def masked_logit_batches(model: onnx.ModelProto, split: CalibrationSplit, masked_rows_only: bool = False,
                         prefix: LayerPrefix | None = None,
                         weight_file: WeightFile | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(batch index, its logits at its [MASK] positions), batch after batch. `masked_rows_only`: `model`
    gives the logits at those rows only (masked_rows).
    `prefix`: `model` is a suffix graph reading the prefix's stored values. `weight_file`: the base
    graph's weight file."""
    session = session_for(model, weight_file=weight_file)
    wanted = [i.name for i in session.get_inputs()]
    for index, (feeds, rows, cols) in enumerate(zip(split.feeds, split.rows, split.cols, strict=True)):
        available = {**feeds, GATHER_INDEX: mask_index(rows, cols)}
        if prefix is not None:
            available.update(prefix.feeds(session, split.batch_id(index)))
        logits = session.run(None, {name: available[name] for name in wanted})[0]
        yield index, logits if masked_rows_only else logits[rows, cols]


def masked_logits(model: onnx.ModelProto, split: CalibrationSplit, masked_rows_only: bool = False,
                  prefix: LayerPrefix | None = None, weight_file: WeightFile | None = None) -> np.ndarray:
    """Logits at every [MASK] position of the split, in batch order (masked_logit_batches)."""
    return np.concatenate([logits for _, logits in masked_logit_batches(model, split, masked_rows_only, prefix,
                                                                        weight_file)])
