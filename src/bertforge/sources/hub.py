"""Hub model ids: the local hub cache first, then a download bounded by BERTFORGE_HUB_TIMEOUT."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertforge.errors import SourceError
from bertforge.sources.checkpoint import ALTERNATIVES, check_checkpoint, has_weights

# README.md: the model card, whose declared license reaches the report and every card (spec.declared_license)
HUB_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "README.md"]
# what is fetched from the hub, safetensors first; pytorch_model.bin only for a repo without them
# (bert-base-uncased has both, and the .bin would be 440 MB more)
HUB_WEIGHTS = (["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"],
               ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"])


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

    cached_problem: SourceError | None = None
    try:
        return check_checkpoint(download(local_only=True))
    except HFValidationError as exc:
        raise SourceError(f"'{repo_id}' is neither an existing directory nor a valid hub id ({ALTERNATIVES})") from exc
    except (OSError, ValueError):
        pass  # not cached: try the hub
    except SourceError as exc:
        # cached in part (AutoTokenizer leaves config and vocabulary, no weights): the hub may complete it
        cached_problem = exc
    try:
        return check_checkpoint(within_deadline(lambda: download(local_only=False), hub_timeout(), repo_id))
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure reduces to one actionable line
        if cached_problem is not None:
            raise SourceError(f"{cached_problem}; the Hugging Face hub, which could complete it, is unreachable "
                              f"({ALTERNATIVES})") from exc
        raise SourceError(f"cannot load '{repo_id}': the Hugging Face hub is unreachable or has no such model, "
                          f"and it is not in the local cache; {ALTERNATIVES}") from exc


def hub_timeout() -> float:
    """Seconds a hub download may take before bertforge gives up (BERTFORGE_HUB_TIMEOUT, default 900)."""
    raw = os.environ.get("BERTFORGE_HUB_TIMEOUT", "900")
    try:
        value = float(raw)
    except ValueError:
        raise SourceError(f"BERTFORGE_HUB_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):  # NaN fails the first test
        raise SourceError(f"BERTFORGE_HUB_TIMEOUT={raw!r} must be a finite number of seconds above 0")
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
