"""onnxruntime sessions over an artifact directory (fill-mask on them: predict.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bertforge.artifact import MANIFEST, MODEL_FILE, read_manifest
from bertforge.cpu_target import target_warning
from bertforge.environment import session_threads
from bertforge.errors import ModelFileError

# the masked-head variant's compact output: one logit row per [MASK], row-major (batch, then position)
MASK_LOGITS = "mask_logits"


def session_options(threads: int | None = None, spinning: bool = True, spin_only_in_run: bool = False):
    """CPU session options. spinning=False: idle intra-op threads sleep instead of spinning, which a
    process holding several sessions needs (a session's spinning threads steal the cores the next
    session's run needs; seen here as a 1.6x slower fused demo variant when interleaved).
    spin_only_in_run: they spin between the ops of a run and stop when it returns, for a process that
    computes on the same cores between runs (validation's metric threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin_only_in_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.intra_op_num_threads = threads or session_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def int8_target_of(directory: Path) -> str | None:
    """The int8 target a variant directory's manifest records (None: not int8, or no manifest)."""
    if not (Path(directory) / MANIFEST).is_file():  # a bare model directory runs without one
        return None
    metadata = read_manifest(directory).get("metadata")  # a manifest that does not parse is named
    target = metadata.get("int8_target") if isinstance(metadata, dict) else None
    return target if isinstance(target, str) else None


_warned: set[str] = set()


def warn_outside_target(directory: Path) -> str | None:
    """Print (once per directory and process) the one-line warning when this CPU is outside the
    variant's int8 target; returns it."""
    warning = target_warning(int8_target_of(directory), directory.name)
    if warning and str(directory.resolve()) not in _warned:
        _warned.add(str(directory.resolve()))
        print(warning, file=sys.stderr)
    return warning


def open_session(location: Path, threads: int | None = None, spinning: bool = True,
                 spin_only_in_run: bool = False):
    """A CPU session over `location`: a variant directory (its model.onnx) or an .onnx file. A variant
    built for an int8 target this CPU is outside of warns first (cpu_target.py)."""
    import onnxruntime as ort

    path = Path(location)
    directory = path if path.is_dir() else path.parent
    warn_outside_target(directory)
    if path.is_dir():
        path = path / MODEL_FILE
    try:
        return ort.InferenceSession(str(path), session_options(threads, spinning, spin_only_in_run),
                                    providers=["CPUExecutionProvider"])
    except tuple(_load_failures()) as exc:
        cause = " ".join(str(exc).split())
        raise ModelFileError(f"{path}: onnxruntime {ort.__version__} cannot load it ({cause[:300]})") from exc


def _load_failures() -> list[type[Exception]]:
    """ORT's exceptions for a file it cannot load: corrupt, missing, or a graph it does not accept."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail", "NotImplemented", "InvalidArgument")
    return [getattr(state, name) for name in names if hasattr(state, name)]


def feeds_for(session, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray):
    available = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    return {i.name: available[i.name] for i in session.get_inputs()}


def mask_rows(session, feeds: dict[str, np.ndarray], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The logits at positions (rows, cols) [n, vocab]: a masked-head variant's compact output when the
    session has one (its rows are exactly the [MASK] positions), else gathered from `logits`."""
    if any(o.name == MASK_LOGITS for o in session.get_outputs()):
        found = session.run([MASK_LOGITS], feeds)[0]
        if found.shape[0] != len(rows):
            raise ValueError(f"{found.shape[0]} {MASK_LOGITS} rows for {len(rows)} [MASK] positions")
        return found
    return session.run(["logits"], feeds)[0][rows, cols]  # by name: a graph may list other outputs first
