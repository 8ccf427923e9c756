"""Sentences with [MASK] tokens, masked deterministically the way BERT masks.

15% of the word-piece positions of each sentence (never [CLS]/[SEP]/[PAD]), at least one, chosen by
a generator seeded from (seed, sentence index), so appending sentences to a corpus leaves the
earlier sentences' masks where they were. Every chosen position is replaced by [MASK]: at
inference a fill-mask user always sends [MASK], so BERT's 80/10/10 training-time replacement
does not apply. Sentences that already contain [MASK] (the probes) keep exactly their own masks
and have no ground truth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bertforge.errors import UsageError

MASK_FRACTION = 0.15
MAX_LENGTH = 128
NO_LABEL = -1
BUILTIN = "builtin"
HEAD_FIT = "head-fit"


@dataclass(frozen=True)
class MaskedExample:
    text: str
    input_ids: tuple[int, ...]
    masked_positions: tuple[int, ...]
    original_ids: tuple[int, ...]  # NO_LABEL where the sentence came with its own [MASK]


def builtin_lines(name: str) -> list[str]:
    filename = {BUILTIN: "sentences.txt", HEAD_FIT: "head_fit_sentences.txt"}[name]
    text = resources.files("bertforge.validation").joinpath("data", filename).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_lines(source: str) -> list[str]:
    """`builtin`, `head-fit`, or a UTF-8 text file with one sentence per line."""
    if source in (BUILTIN, HEAD_FIT):
        return builtin_lines(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"corpus file {path} does not exist (use 'builtin' or a text file, one sentence a line)")
    lines = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"corpus file {path} holds no sentences")
    return lines


def corpus_digest(source: str) -> str:
    """A hash of the corpus text itself, so cached results follow an edited file or a new built-in corpus."""
    return hashlib.sha256("\n".join(load_lines(source)).encode()).hexdigest()


def mask_sentences(lines: list[str], tokenizer, *, seed: int = 0, fraction: float = MASK_FRACTION,
                   max_length: int = MAX_LENGTH, limit: int | None = None) -> list[MaskedExample]:
    mask_id = tokenizer.mask_token_id
    special = set(tokenizer.all_special_ids)
    examples = []
    for index, text in enumerate(lines[:limit] if limit else lines):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        own_masks = [i for i, token in enumerate(ids) if token == mask_id]
        if own_masks:
            examples.append(MaskedExample(text, tuple(ids), tuple(own_masks), (NO_LABEL,) * len(own_masks)))
            continue
        candidates = [i for i, token in enumerate(ids) if token not in special]
        if not candidates:
            continue
        count = max(1, int(round(fraction * len(candidates))))
        rng = np.random.default_rng([seed, index])
        chosen = sorted(int(p) for p in rng.choice(candidates, size=count, replace=False))
        originals = tuple(ids[p] for p in chosen)
        masked = list(ids)
        for position in chosen:
            masked[position] = mask_id
        examples.append(MaskedExample(text, tuple(masked), tuple(chosen), originals))
    return examples


@dataclass(frozen=True)
class Batch:
    examples: list[MaskedExample]
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def masked_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position, original id or NO_LABEL) of every masked position, row-major."""
        rows = np.array([r for r, e in enumerate(self.examples) for _ in e.masked_positions])
        cols = np.array([p for e in self.examples for p in e.masked_positions])
        truth = np.array([t for e in self.examples for t in e.original_ids])
        return rows, cols, truth


def batches(examples: list[MaskedExample], batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        length = max(len(e.input_ids) for e in chunk)
        ids = np.full((len(chunk), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), length), dtype=np.int64)
        for row, example in enumerate(chunk):
            ids[row, :len(example.input_ids)] = example.input_ids
            mask[row, :len(example.input_ids)] = 1
        yield Batch(chunk, ids, mask, np.zeros_like(ids))
