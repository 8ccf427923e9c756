"""Shared fixtures: a tiny random BertForMaskedLM built here, with the real uncased vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the tiny model's logits: max |x| 0.58, standard deviation 0.11; its int8 variants part from fp32 by
# 0.008-0.014 at most (measured); a saturating or broken int8 kernel by a large share of the spread
INT8_LOGIT_ERROR = 0.05

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def pytest_report_header(config) -> str:
    """The CPU class decides the int8 kernels (cpu_target.py): every run names the one it ran on."""
    from bertforge.cpu_target import exact_here
    from bertforge.environment import cpu_class, cpu_model

    return (f"cpu class: {cpu_class()} ({cpu_model()}); full-range (target vnni) int8 exact here: "
            f"{'yes' if exact_here('vnni') else 'no, u8 x s8 pair sums saturate'}")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every test session gets its own bertforge cache; no test touches the user's."""
    root = tmp_path_factory.mktemp("bertforge-cache")
    os.environ["BERTFORGE_CACHE"] = str(root)
    # `import bertforge` (at collection, before this fixture) pointed torch's compile cache at the real cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "torchinductor")
    os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches for the network
    return root


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from bertforge.sources.demo import demo_package_dir

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=30522, **TINY)).eval()
    # Random LayerNorm parameters too, so different layers never share identical initializers.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    tokenizer = BertTokenizerFast(vocab_file=str(demo_package_dir() / "vocab.txt"), do_lower_case=True,
                                  model_max_length=128)
    tokenizer.save_pretrained(path)
    return path


def small_cased_vocab(size: int = 1000) -> list[str]:
    """A cased WordPiece vocabulary of `size` entries that still tokenizes English: the special tokens
    first (so [CLS]/[SEP]/[MASK] are not bert-base's 101/102/103), every character of the corpora and
    its ## continuation, then the corpora's most frequent words."""
    from collections import Counter

    from bertforge.validation.corpus import load_lines

    lines = load_lines("builtin") + load_lines("head-fit")
    chars = sorted({c for line in lines for c in line if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    words = Counter(w.strip(".,;:!?\"'()") for line in lines for w in line.split())
    for word, _ in words.most_common():
        if len(vocab) >= size:
            break
        if word and word not in vocab:
            vocab.append(word)
    return vocab[:size]


def make_family_checkpoint(path: Path) -> Path:
    """A tiny BERT shaped unlike bert-base-uncased: vocabulary 1000, cased, type_vocab_size 1,
    max_position_embeddings 32, special-token ids 0-4."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(small_cased_vocab()) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, type_vocab_size=1, pad_token_id=0,
                        **{**TINY, "max_position_embeddings": 32})
    BertForMaskedLM(config).eval().save_pretrained(path)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=False, model_max_length=32)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_variants(tiny_checkpoint, isolated_cache) -> dict:
    """Every variant of the tiny model, built through the pipeline's cache."""
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), int8_static={"calibration_samples": 8})
    state = build_variants(recipe, resolve(recipe.model), Progress("quiet"))
    return {name: run.artifact.path for name, run in state.artifacts.items()}


def tiny_feeds(length: int = 12, batch: int = 2):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1], ids[:, 3] = 101, 102, 103
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
