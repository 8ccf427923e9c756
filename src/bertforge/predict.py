"""Fill-mask from a variant directory with onnxruntime and tokenizers only: no torch, no transformers.

The answers have the fields and the order of transformers' (and optimum's) fill-mask pipeline:
score (softmax over the vocabulary at the [MASK]), token (id), token_str (that id decoded) and
sequence (the text with the [MASK] replaced, decoded without special tokens when the text has one
[MASK], with them when it has several, as the pipeline does). The masked-head variant
(int8-dynamic-masked) is read through its compact `mask_logits` output, one row per [MASK].

The decoding is the pipeline's: `tokenizer.json`'s decoder, then transformers' clean-up of spaces
before punctuation when the checkpoint's tokenizer_config.json asks for it (re-implemented here, four
lines, because importing transformers imports torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.errors import UsageError
from bertforge.json_files import read_json

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Prediction:
    score: float
    token: int
    token_str: str
    sequence: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def unpadded(tokenizer: Any) -> Any:
    """The tokenizer with the padding and truncation a tokenizer.json can carry turned off, as transformers
    turns them off on every call: all-MiniLM's file pads to 128, and its ids fed with an attention mask of
    ones made the model attend to the padding (other answers than the fill-mask pipeline's); a text longer
    than the model takes is refused by length, never cut."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@dataclass
class MaskText:
    """A tokenizer's side of fill-mask: encode a text, turn logit rows at its [MASK]s into predictions."""

    tokenizer: Any  # tokenizers.Tokenizer
    mask_token: str
    mask_id: int
    pad_id: int | None
    clean_up: bool
    max_length: int | None = None  # the model's positions (config.json), where known: a longer text is refused

    @classmethod
    def from_directory(cls, directory: Path) -> MaskText:
        from tokenizers import Tokenizer

        config_path = directory / "tokenizer_config.json"
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # the tokenizers library's message does not name the file
            raise UsageError(f"{directory / TOKENIZER_FILE}: not a tokenizer file "
                             f"({' '.join(str(exc).split())[:200]})") from None
        config = read_json(config_path) if config_path.is_file() else {}
        unpadded(tokenizer)

        def content(token: Any, default: str) -> str:
            return token.get("content", default) if isinstance(token, dict) else (token or default)

        mask = content(config.get("mask_token"), "[MASK]")
        mask_id = tokenizer.token_to_id(mask)
        if mask_id is None:
            raise UsageError(f"{directory}: its tokenizer has no {mask} token")
        model = directory / "config.json"
        positions = read_json(model).get("max_position_embeddings") if model.is_file() else None
        return cls(tokenizer, mask, mask_id, tokenizer.token_to_id(content(config.get("pad_token"), "[PAD]")),
                   bool(config.get("clean_up_tokenization_spaces", False)),
                   positions if isinstance(positions, int) and positions > 0 else None)

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> MaskText:
        """From a transformers fast tokenizer (its backend is a tokenizers.Tokenizer)."""
        from tokenizers import Tokenizer

        backend = unpadded(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))  # a copy: theirs stays as it is
        return cls(backend, tokenizer.mask_token, tokenizer.mask_token_id, tokenizer.pad_token_id,
                   bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids [1, n], token_type_ids [1, n], the [MASK] positions)."""
        encoding = self.tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        positions = np.flatnonzero(ids[0] == self.mask_id)
        if not len(positions):
            raise UsageError(f"no {self.mask_token} in {text!r}")
        if self.max_length is not None and ids.shape[1] > self.max_length:
            raise UsageError(f"the text is {ids.shape[1]} word pieces; the model takes {self.max_length} at most")
        return ids, np.array([encoding.type_ids], dtype=np.int64), positions

    def predictions(self, ids: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                    top_k: int) -> list[list[Prediction]]:
        """Top-k per [MASK] from its logit row, as the fill-mask pipeline words them."""
        single = len(positions) == 1
        answers = []
        for position, row in zip(positions, rows, strict=True):
            probs = np.exp(row.astype(np.float64) - row.max())
            probs /= probs.sum()
            best = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
            found = []
            for token in (int(t) for t in best):
                filled = ids[0].copy()
                filled[position] = token
                kept = [int(t) for t in filled if t != self.pad_id]
                found.append(Prediction(float(probs[token]), token, self.decode([token], False),
                                        self.decode(kept, skip_special_tokens=single)))
            answers.append(found)
        return answers


FEEDS = {"input_ids", "attention_mask", "token_type_ids"}


class MaskFiller:
    """One variant directory's session and tokenizer, for many texts."""

    def __init__(self, directory: Path | str) -> None:
        from bertforge.runtime import MASK_LOGITS, open_session

        self.directory = Path(directory)
        if not (self.directory / "model.onnx").is_file() or not (self.directory / TOKENIZER_FILE).is_file():
            raise UsageError(not_a_variant(self.directory))
        self.text = MaskText.from_directory(self.directory)
        self.session = open_session(self.directory)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if not {"logits", MASK_LOGITS} & set(outputs) or not set(inputs) <= FEEDS:
            raise UsageError(f"{self.directory / 'model.onnx'} is not a masked-LM variant (inputs: "
                             f"{', '.join(inputs)}; outputs: {', '.join(outputs)}; a variant's are "
                             f"{', '.join(sorted(FEEDS))} and logits)")

    def __call__(self, text: str, top_k: int = 5) -> list[list[Prediction]]:
        """The top_k predictions at each [MASK] of `text`, one list per [MASK] in text order."""
        return session_predictions(self.session, self.text, text, top_k)


def not_a_variant(directory: Path) -> str:
    """Why `directory` cannot be read as a variant; for a build directory, the variants inside it."""
    try:
        variants = sorted(p.name for p in directory.iterdir() if (p / "model.onnx").is_file())
    except OSError:  # not a directory, or not readable
        variants = []
    if variants:
        return (f"{directory} is a build directory, not a variant: name one of its variants, e.g. "
                f"{directory / variants[0]} (in it: {', '.join(variants)})")
    return f"{directory} is not a variant directory (needs model.onnx and {TOKENIZER_FILE})"


def session_predictions(session: Any, masker: MaskText, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """fill-mask of `text` through an onnxruntime session of any variant (the masked head included)."""
    from bertforge.runtime import feeds_for, mask_rows

    if top_k < 1:
        raise UsageError(f"top_k must be at least 1, got {top_k}")
    ids, type_ids, positions = masker.encode(text)
    feeds = feeds_for(session, ids, np.ones_like(ids), type_ids)
    rows = mask_rows(session, feeds, np.zeros(len(positions), dtype=np.int64), np.asarray(positions))
    return masker.predictions(ids, positions, rows, top_k)


def fill_mask(directory: Path | str, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """Top-k predictions at each [MASK] of `text` from the variant in `directory` (any variant,
    int8-dynamic-masked included), with onnxruntime and tokenizers only."""
    return MaskFiller(directory)(text, top_k)
