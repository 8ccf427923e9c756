"""Shared fixtures: a tiny random BertForMaskedLM built here, with the real uncased vocabulary."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

# the tiny model's logits: max |x| 0.58, standard deviation 0.11; its int8 variants part from fp32 by
# 0.008-0.014 at most (measured); a saturating or broken int8 kernel by a large share of the spread
INT8_LOGIT_ERROR = 0.05

# read by Ray at its import, wherever a test module imports it first: every Ray node the tests start is
# on the loopback (Ray's own switch for a single-machine cluster), and sends no usage report
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

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


@pytest.fixture(scope="session")
def int8_variants(tiny_checkpoint, tiny_variants) -> dict:
    """The tiny model's default int8 variants, and the masked heads over them (extras, built through the
    same cache)."""
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), int8_static={"calibration_samples": 8},
                    variants=("int8-dynamic-masked", "int8-auto-masked"))
    state = build_variants(recipe, resolve(recipe.model), Progress("quiet"))
    masked = {name: run.artifact.path for name, run in state.artifacts.items() if name.endswith("-masked")}
    return {**{n: p for n, p in tiny_variants.items() if n.startswith("int8")}, **masked}


def tiny_feeds(length: int = 12, batch: int = 2):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1], ids[:, 3] = 101, 102, 103
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on this machine for the Ray executor's tests: a head node that runs nothing
    and two worker nodes of one CPU each, on the loopback, telemetry and dashboard off. Started once
    per session (~5 s), stopped at its end."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from bertforge.environment import cpu_class

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    for _ in range(2):  # nodes of this machine's CPU class, as `ray start --resources` declares it
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={f"cpu_class_{cpu_class()}": 100})
    cluster.wait_for_nodes()
    assert cluster.address.startswith("127.0.0.1:")
    yield cluster
    cluster.shutdown()


def kill_a_task(prefix: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen running a task whose name starts with `prefix` (Ray titles the
    process ray::NAME while it runs); its pid goes into `killed`. For a thread beside a Ray build."""
    import psutil

    while not stop.is_set() and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(part.startswith(f"ray::{prefix}") for part in process.info["cmdline"] or []):
                process.kill()
                killed.append(process.info["pid"])
                return
        time.sleep(0.02)


def validate_on_ray_killing_a_shard(out: Path, address: str, shard_batches: int):
    """`validate` of a build directory on the Ray cluster at `address`, its recorded recipe with
    `shard_batches` batches a shard and no latency, while a thread SIGKILLs the first validation task it
    sees running; returns the outcome and the killed pids (empty: none was seen)."""
    from bertforge.api import validate_existing
    from bertforge.pipeline import recorded_recipe
    from bertforge.recipe import Recipe

    recipe = Recipe.model_validate(recorded_recipe(out))
    recipe = recipe.model_copy(update={
        "validation": recipe.validation.model_copy(update={"shard_batches": shard_batches}),
        "bench": recipe.bench.model_copy(update={"enabled": False})})
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_task, args=("bertforge-validation-shard", killed, stop))
    killer.start()
    try:
        return validate_existing(out, recipe, executor="ray", ray_address=address), killed
    finally:
        stop.set()
        killer.join()


def report_metrics(out: Path) -> dict:
    """What validation measured, from a build's report.json: every metric, probe answer and corpus count."""
    report = json.loads((out / "report.json").read_text())
    return {"reference": report["reference"], "corpus": report["corpus"],
            **{name: (entry["metrics"], entry["probes"]) for name, entry in report["variants"].items()}}
