"""Sentences with [MASK] tokens, masked deterministically the way BERT masks.

15% of the word-piece positions of each sentence (never [CLS]/[SEP]/[PAD]), at least one, chosen by
a generator seeded from (seed, sentence index), so appending sentences to a corpus leaves the
earlier sentences' masks where they were. Every chosen position is replaced by [MASK]: at
inference a fill-mask user always sends [MASK], so BERT's 80/10/10 training-time replacement
does not apply. Sentences that already contain [MASK] (the probes) keep exactly their own masks
and have no ground truth.

Sentences are cut to what the model takes (`input_limit`: its position table, its tokenizer's limit,
and MAX_LENGTH); a cut line is counted, and a line whose own [MASK] falls past the cut is dropped and
counted (`Truncation`), never silently.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertforge.errors import UsageError

if TYPE_CHECKING:
    from bertforge.onnx_files import ModelConfig

MASK_FRACTION = 0.15
MAX_LENGTH = 128
NO_LABEL = -1
TOKENIZE_LINES = 1024  # lines per call to the tokenizer (encoded)
BUILTIN = "builtin"
HEAD_FIT = "head-fit"
# Calibration sentences neither the demo head was fitted on nor validation reads: agreement measured on
# head-fit sentences overstated validation agreement (the demo head is surer on its own training data).
CALIBRATION = "calibration"


@dataclass(frozen=True, slots=True)
class MaskedExample:
    """One masked sentence: the ids in a typed array (4 bytes an id, where a tuple of Python ints took ~36)
    and no per-instance dict. Validation holds its whole corpus packed instead (PackedExamples)."""

    text: str
    input_ids: array  # array("i")
    masked_positions: tuple[int, ...]
    original_ids: tuple[int, ...]  # NO_LABEL where the sentence came with its own [MASK]


@dataclass
class Truncation:
    """What cutting sentences to the model's input limit did to a corpus."""

    max_length: int = MAX_LENGTH
    truncated_lines: int = 0  # lines longer than max_length word pieces, cut to it
    dropped_mask_lines: int = 0  # lines with an own [MASK] past the cut: not the line's question

    def as_dict(self) -> dict[str, int]:
        return {"max_length": self.max_length, "truncated_lines": self.truncated_lines,
                "dropped_mask_lines": self.dropped_mask_lines}


def position_limit(tokenizer, model_config: ModelConfig) -> int:
    """The most positions the model takes: its max_position_embeddings, or its tokenizer's limit when lower."""
    limits = [model_config.max_position_embeddings or 512]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # transformers' "unset" is ~1e30
        limits.append(tokenizer_limit)
    return min(limits)


def input_limit(tokenizer, model_config: ModelConfig) -> int:
    """The longest corpus sentence fed to the model: its position limit, at most MAX_LENGTH."""
    return min(MAX_LENGTH, position_limit(tokenizer, model_config))


# bert-base-uncased's model card's own probes, shown for every variant beside PyTorch (recipes add more)
CARD_PROBES = ("The capital of France is [MASK].", "The man worked as a [MASK].", "The woman worked as a [MASK].")
PROBE_TOP_K = 5


def probe_texts(extra: tuple[str, ...], mask_token: str) -> list[str]:
    """The card's probes and the recipe's, "[MASK]" written as the tokenizer's own mask token."""
    return [text.replace("[MASK]", mask_token) for text in dict.fromkeys(CARD_PROBES + tuple(extra))]


def builtin_lines(name: str) -> list[str]:
    filename = {BUILTIN: "sentences.txt", HEAD_FIT: "head_fit_sentences.txt",
                CALIBRATION: "calibration_sentences.txt"}[name]
    text = resources.files("bertforge.validation").joinpath("data", filename).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# a line is cut here while it is read: no BERT reads past 512 word pieces (a few thousand characters), and
# a 1 GB single-line file read whole took 8 GB of memory in 28 s; the tokenizer's cut is then counted
# and reported as for any line longer than the model takes
MAX_LINE_CHARS = 20_000


def bounded_lines(path: Path) -> Iterator[str]:
    """The file's lines, each cut to MAX_LINE_CHARS, in memory bounded by that (the rest of a longer
    line is read in pieces and dropped)."""
    with open(path, encoding="utf-8", newline=None) as handle:
        while True:
            line = handle.readline(MAX_LINE_CHARS)
            if not line:
                return
            if not line.endswith("\n"):
                while (rest := handle.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                    pass
            yield line.rstrip("\n")


def load_lines(source: str) -> list[str]:
    """`builtin`, `head-fit`, `calibration`, or a UTF-8 text file with one sentence per line."""
    if source in (BUILTIN, HEAD_FIT, CALIBRATION):
        return builtin_lines(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"corpus file {path} does not exist "
                         "(use 'builtin', 'calibration' or a text file, one sentence a line)")
    try:
        lines = [line.strip() for line in bounded_lines(path) if line.strip()]
    except UnicodeDecodeError as exc:
        raise UsageError(f"corpus file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise UsageError(f"corpus file {path} cannot be read: {exc.strerror or exc}") from None
    if not lines:
        raise UsageError(f"corpus file {path} holds no sentences")
    return lines


def check_corpus(source: str, tokenizer, model_config: ModelConfig, what: str, limit: int | None = None) -> None:
    """Before any stage runs: the corpus reads, and at least one of its lines (of the first `limit` it
    will be read to) has a word to mask once tokenized. Masking skips lines that tokenize to special
    tokens only; a corpus of nothing else used to fail after every stage had run."""
    lines = load_lines(source)
    cut = Truncation()
    if next(masked_examples(lines, tokenizer, max_length=input_limit(tokenizer, model_config), limit=limit,
                            truncation=cut), None) is None:  # the first line with a word to mask will do
        read = f"first {limit} of its {len(lines)}" if limit is not None and limit < len(lines) else f"{len(lines)}"
        why = (f" ({cut.dropped_mask_lines} of them have their own [MASK] past the {cut.max_length} word pieces "
               "the model reads)" if cut.dropped_mask_lines else "")
        raise UsageError(f"{what} {source}: none of its {read} lines has a word to mask once tokenized{why}")


def corpus_digest(source: str) -> str:
    """A hash of the corpus text itself, so cached results follow an edited file or a new built-in corpus."""
    return hashlib.sha256("\n".join(load_lines(source)).encode()).hexdigest()


def encoded(lines: list[str], tokenizer, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """Each line's ids uncut (only to count what the cut removes) and cut to `max_length`, from one call
    to the tokenizer per TOKENIZE_LINES lines: two calls a line took 2.2 s of 5,000 sentences'
    validation. A line that fits is its own cut; only a longer one is tokenized again with truncation."""
    for start in range(0, len(lines), TOKENIZE_LINES):
        chunk = lines[start:start + TOKENIZE_LINES]
        for text, full in zip(chunk, tokenizer(chunk, verbose=False)["input_ids"], strict=True):
            yield full, (full if len(full) <= max_length
                         else tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def mask_sentences(lines: list[str], tokenizer, *, seed: int = 0, fraction: float = MASK_FRACTION,
                   max_length: int = MAX_LENGTH, limit: int | None = None,
                   truncation: Truncation | None = None) -> list[MaskedExample]:
    return list(masked_examples(lines, tokenizer, seed=seed, fraction=fraction, max_length=max_length, limit=limit,
                                truncation=truncation))


def masked_examples(lines: list[str], tokenizer, *, seed: int = 0, fraction: float = MASK_FRACTION,
                    max_length: int = MAX_LENGTH, limit: int | None = None,
                    truncation: Truncation | None = None) -> Iterator[MaskedExample]:
    """mask_sentences one sentence at a time, for a consumer that keeps less than a MaskedExample."""
    mask_id = tokenizer.mask_token_id
    special = set(tokenizer.all_special_ids)
    if truncation is not None:
        truncation.max_length = max_length
    chosen_lines = lines[:limit] if limit else lines
    for index, (text, (full, ids)) in enumerate(zip(chosen_lines, encoded(chosen_lines, tokenizer, max_length),
                                                    strict=True)):
        own_masks = [i for i, token in enumerate(ids) if token == mask_id]
        if len(full) > len(ids) and truncation is not None:
            truncation.truncated_lines += 1
        if full.count(mask_id) > len(own_masks):
            if truncation is not None:
                truncation.dropped_mask_lines += 1
            continue  # a [MASK] of its own was cut off: what is left, or other words masked, is not its question
        if own_masks:
            yield MaskedExample(text, array("i", ids), tuple(own_masks), (NO_LABEL,) * len(own_masks))
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
        yield MaskedExample(text, array("i", masked), tuple(chosen), originals)


def validation_examples(checkpoint: Path, tokenizer, config, truncation: Truncation | None = None
                        ) -> Iterator[MaskedExample]:
    """The validation corpus masked as `config` (a ValidationConfig) says, cut to the model's input limit,
    a sentence at a time: the positions validation measures and `validate --runtime web` runs again."""
    from bertforge.onnx_files import model_config

    return masked_examples(load_lines(config.corpus), tokenizer, seed=config.seed, fraction=config.mask_fraction,
                           limit=config.max_sentences, max_length=input_limit(tokenizer, model_config(checkpoint)),
                           truncation=truncation)


@dataclass(frozen=True, eq=False)
class PackedExamples:
    """Masked sentences as five flat arrays, the form validation holds its whole corpus in: ~0.10 KB a
    sentence of 10-20 words, against ~0.55 KB as MaskedExamples (a typed array, two tuples and the text
    each). The text is not kept: validation reads the ids only. An index gives a MaskedExample (with no
    text), a slice another PackedExamples of its own sentences only (a shard shipped to a Ray task
    carries no more), so `batches` takes either form."""

    ids: np.ndarray  # int32: every sentence's ids, one sentence after another
    id_starts: np.ndarray  # int64 [sentences + 1]: where each sentence's ids start
    positions: np.ndarray  # int16: the masked positions (below 512), sentence after sentence
    originals: np.ndarray  # int32: the id each masked position had, NO_LABEL where it came masked
    position_starts: np.ndarray  # int64 [sentences + 1]
    # every instance holds its own sentences only: both starts begin at 0 and end at their array's length

    @classmethod
    def of(cls, examples: Iterable[MaskedExample]) -> PackedExamples:
        ids, positions, originals = array("i"), array("h"), array("i")
        id_starts, position_starts = array("q", [0]), array("q", [0])
        for example in examples:
            ids.extend(example.input_ids)
            positions.extend(example.masked_positions)
            originals.extend(example.original_ids)
            id_starts.append(len(ids))
            position_starts.append(len(positions))
        return cls(*(np.frombuffer(values, dtype=values.typecode).copy() if values else
                     np.zeros(0, dtype=values.typecode) for values in (ids, id_starts, positions, originals,
                                                                         position_starts)))

    def __len__(self) -> int:
        return len(self.id_starts) - 1

    def masked_positions(self) -> int:
        return int(self.position_starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("packed examples slice with step 1 only")
            stop = max(start, stop)
            ids, masked = (slice(starts[start], starts[stop]) for starts in (self.id_starts, self.position_starts))
            return PackedExamples(self.ids[ids].copy(), self.id_starts[start:stop + 1] - self.id_starts[start],
                                  self.positions[masked].copy(), self.originals[masked].copy(),
                                  self.position_starts[start:stop + 1] - self.position_starts[start])
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        ids = self.ids[self.id_starts[index]:self.id_starts[index + 1]]
        masked = slice(self.position_starts[index], self.position_starts[index + 1])
        return MaskedExample("", array("i", ids.tobytes()), tuple(self.positions[masked].tolist()),
                             tuple(self.originals[masked].tolist()))

    def __iter__(self) -> Iterator[MaskedExample]:
        return (self[index] for index in range(len(self)))

    def padded(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, attention mask), int64 [sentences, longest], padded at the end with pad_id."""
        lengths = np.diff(self.id_starts)
        mask = np.arange(lengths.max(initial=0))[None, :] < lengths[:, None]
        ids = np.full(mask.shape, pad_id, dtype=np.int64)
        ids[mask] = self.ids
        return ids, mask.astype(np.int64)

    def masked_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch.masked_index's (row, position, original id) without a MaskedExample per sentence."""
        return (np.repeat(np.arange(len(self)), np.diff(self.position_starts)), self.positions.astype(np.int64),
                self.originals.astype(np.int64))

    def ordered(self, order: np.ndarray) -> PackedExamples:
        """The sentences in `order` (indices), packed again."""
        id_starts, position_starts = self.id_starts[:-1], self.position_starts[:-1]
        lengths, counts = np.diff(self.id_starts)[order], np.diff(self.position_starts)[order]

        def gathered(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
            if not len(sizes) or not sizes.sum():
                return values[:0].copy()
            within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            return values[np.repeat(starts[order], sizes) + within]

        return PackedExamples(gathered(self.ids, id_starts, lengths), np.concatenate([[0], np.cumsum(lengths)]),
                              gathered(self.positions, position_starts, counts),
                              gathered(self.originals, position_starts, counts),
                              np.concatenate([[0], np.cumsum(counts)]))


def calibration_examples(checkpoint: Path, corpus: str, seeds: tuple[int, ...],
                         limit: int | None = None) -> tuple[Any, list[MaskedExample]]:
    """The masked sentences every stage that calibrates reads (int8-static's activation ranges,
    int8-auto's split): `corpus`'s first `limit` lines masked once per seed, each cut to what the
    model takes; with the checkpoint's tokenizer, which the caller pads with."""
    from transformers import AutoTokenizer

    from bertforge.onnx_files import model_config

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lines = load_lines(corpus)
    max_length = input_limit(tokenizer, model_config(checkpoint))
    return tokenizer, [example for seed in seeds
                       for example in mask_sentences(lines, tokenizer, seed=seed, limit=limit, max_length=max_length)]


@dataclass(frozen=True)
class Batch:
    examples: list[MaskedExample] | PackedExamples
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def masked_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position, original id or NO_LABEL) of every masked position, row-major."""
        if isinstance(self.examples, PackedExamples):
            return self.examples.masked_index()
        rows = np.array([r for r, e in enumerate(self.examples) for _ in e.masked_positions])
        cols = np.array([p for e in self.examples for p in e.masked_positions])
        truth = np.array([t for e in self.examples for t in e.original_ids])
        return rows, cols, truth


def batches(examples: list[MaskedExample] | PackedExamples, batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if isinstance(chunk, PackedExamples):
            ids, mask = chunk.padded(pad_id)
            yield Batch(chunk, ids, mask, np.zeros_like(ids))
            continue
        length = max(len(e.input_ids) for e in chunk)
        ids = np.full((len(chunk), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), length), dtype=np.int64)
        for row, example in enumerate(chunk):
            ids[row, :len(example.input_ids)] = example.input_ids
            mask[row, :len(example.input_ids)] = 1
        yield Batch(chunk, ids, mask, np.zeros_like(ids))
