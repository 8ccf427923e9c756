"""Synthetic stand-ins for the BERT family named on bert-base-uncased's model card.

Each has its checkpoint's published architecture (layers, hidden size, heads, intermediate size,
vocabulary size, casing, 512 positions, 2 token types) and seeded random weights: the offline
instrument for size, speed, memory and generality, never for what a model predicts.

Vocabularies: the uncased members use bert-base-uncased's real WordPiece vocabulary (it ships with the
demo package). The others' vocabularies are not available offline, so each gets one of the right size
derived from it that still tokenizes English: the same first 104 entries ([PAD] 0, [UNK] 100, [CLS]
101, [SEP] 102, [MASK] 103, as in every one of these checkpoints), then for cased members the
capital letters and the capitalised forms of common words, then the uncased words, cut to size; a
vocabulary larger than that (multilingual) is filled with placeholder entries no English text
produces, so the embedding table and the decoder have their real size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertforge.cache import cache_root, file_lock
from bertforge.errors import SourceError
from bertforge.sources.checkpoint import complete

SEED = 0
PREFIX = "synthetic:"
SPECIAL_BLOCK = 104  # [PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK]


@dataclass(frozen=True)
class Member:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int
    cased: bool


BASE, LARGE = (12, 768, 12, 3072), (24, 1024, 16, 4096)
FAMILY: dict[str, Member] = {
    "bert-base-uncased": Member(*BASE, 30522, cased=False),
    "bert-base-cased": Member(*BASE, 28996, cased=True),
    "bert-large-uncased": Member(*LARGE, 30522, cased=False),
    "bert-large-cased": Member(*LARGE, 28996, cased=True),
    "bert-large-uncased-whole-word-masking": Member(*LARGE, 30522, cased=False),
    "bert-large-cased-whole-word-masking": Member(*LARGE, 28996, cased=True),
    "bert-base-chinese": Member(*BASE, 21128, cased=True),
    "bert-base-multilingual-cased": Member(*BASE, 119547, cased=True),
}


def describe(name: str) -> str:
    member = FAMILY[name]
    vocabulary = ("bert-base-uncased's real vocabulary" if member.vocab_size == 30522 and not member.cased
                  else f"a derived {'cased ' if member.cased else ''}vocabulary of its real size")
    return (f"{name}'s architecture ({member.layers} layers, hidden {member.hidden}, vocabulary "
            f"{member.vocab_size:,}) with seeded random weights and {vocabulary} (for size, speed and memory only)")


def config_for(member: Member):
    from transformers import BertConfig

    return BertConfig(vocab_size=member.vocab_size, hidden_size=member.hidden, num_hidden_layers=member.layers,
                      num_attention_heads=member.heads, intermediate_size=member.intermediate, hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                      type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                      architectures=["BertForMaskedLM"])


def derived_vocabulary(uncased: list[str], size: int, cased: bool) -> list[str]:
    """A WordPiece vocabulary of exactly `size` entries built from bert-base-uncased's (see above)."""
    head, words = uncased[:SPECIAL_BLOCK], uncased[SPECIAL_BLOCK:]
    extra: list[str] = []
    if cased:
        letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        common = [w for w in words if w.isalpha() and w.islower() and len(w) > 1][:4000]
        extra = letters + [f"##{c}" for c in letters] + [w.capitalize() for w in common]
    vocabulary, seen = list(head), set(head)
    for token in extra + words:
        if len(vocabulary) == size:
            break
        if token not in seen:
            vocabulary.append(token)
            seen.add(token)
    filler = 0
    while len(vocabulary) < size:
        vocabulary.append(f"[placeholder{filler}]")
        filler += 1
    return vocabulary


def ensure(name: str) -> Path:
    """The member's checkpoint directory under the cache, made once (atomically) and then reused; made
    again if a file a build reads has gone from it."""
    from bertforge.sources.demo import demo_package_dir

    if name not in FAMILY:
        raise SourceError(f"unknown synthetic model '{name}'; available: " + ", ".join(
            PREFIX + known for known in FAMILY) + " (bertforge resolve --list)")
    member = FAMILY[name]
    suffix = "" if name == "bert-base-uncased" else "-v1"  # bert-base-uncased's entry predates the family
    target = cache_root() / "sources" / f"synthetic-{name}-seed{SEED}{suffix}"
    with file_lock(cache_root() / "locks" / "synthetic.lock"):
        if complete(target):
            return target
        import torch
        from transformers import BertForMaskedLM, BertTokenizerFast

        from bertforge.artifact import atomic_directory

        uncased_file = demo_package_dir() / "vocab.txt"  # bert-base-uncased's WordPiece vocabulary
        with atomic_directory(target) as tmp:
            if member.vocab_size == 30522 and not member.cased:
                vocab_file = uncased_file
            else:
                uncased = uncased_file.read_text("utf-8").splitlines()
                vocab_file = tmp / "vocab.txt"
                vocab_file.write_text("\n".join(derived_vocabulary(uncased, member.vocab_size, member.cased))
                                      + "\n", encoding="utf-8")
            torch.manual_seed(SEED)
            model = BertForMaskedLM(config_for(member)).eval()
            tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=not member.cased,
                                          model_max_length=512)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target
