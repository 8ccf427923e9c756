"""Shared fixtures: a tiny random BertForMaskedLM built here, with the real uncased vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every test session gets its own bertforge cache; no test touches the user's."""
    root = tmp_path_factory.mktemp("bertforge-cache")
    os.environ["BERTFORGE_CACHE"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches for the network
    return root


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from bertforge.sources import demo_package_dir

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
