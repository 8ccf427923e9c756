"""Facts about the machine and libraries that a manifest records."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

# Every library that shapes an artifact's bytes: accelerate decides the exporter's tied-weight dedup,
# onnx-ir is MatMulNBitsQuantizer's graph library, numpy rounds the quantized weights.
TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "accelerate", "onnx",
                     "onnx-ir", "onnxruntime", "onnxconverter-common", "numpy")
# onnxruntime's other builds install the same `onnxruntime` module under their own distribution name (with
# `onnxruntime` itself then absent): each is keyed by its own version where it is installed, and left out
# of the key where it is not, so adding this list changed no existing key.
ONNXRUNTIME_BUILDS = ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn",
                      "onnxruntime-training")


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    for name in ONNXRUNTIME_BUILDS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@functools.cache
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686")


# x86 int8 classes, highest first: (the /proc/cpuinfo flag that marks one, its name)
X86_CLASSES = (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"),
               ("avx512f", "avx512"), ("avx2", "avx2"))


def cpu_class(flags: set[str] | None = None, machine: str | None = None) -> str:
    """This CPU's class for int8 numerics and speed: amx, avx512-vnni, avx-vnni, avx512, avx2, or the
    architecture's name off x86 (arm64 ...). Keys and reports carry it: it names what picks the
    kernels, where the CPU's model name ("AMD EPYC") does not."""
    machine = machine or platform.machine()
    if not is_x86(machine):
        return {"aarch64": "arm64"}.get(machine.lower(), machine.lower())
    flags = cpu_flags() if flags is None else flags
    for flag, name in X86_CLASSES:
        if flag in flags:
            return name
    return "x86-64"


def this_machine() -> dict[str, Any]:
    """The machine a measurement ran on, as the report names it (a Ray build's latency node, too) and as
    a cached measurement's key needs it: its CPU, class and the threads a session uses there."""
    import socket

    return {"host": socket.gethostname(), "cpu": cpu_model(), "cpu_class": cpu_class(), "threads": physical_cores()}


def machine_info() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpu_class": cpu_class(),
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": psutil.cpu_count(logical=True),
        "isa": {
            "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags,
        },
        "python": platform.python_version(),
    }


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: it survives fork+exec, so a child started by a
    large parent would report the parent's peak."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process's cgroup may use (quota / period), or None when unlimited or unknown."""
    try:
        if (root / "cpu.max").is_file():  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():  # cgroup v1: quota -1 when unlimited
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        pass
    return None


def physical_cores() -> int:
    """The threads an onnxruntime session should use: the physical cores, but no more than the CPUs this
    process may run on (its affinity) or its cgroup's quota allows (onnxruntime itself counts every core
    of the machine: with affinity to one core it still starts two threads here)."""
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return max(1, cores)


_cores_share: ContextVar[int | None] = ContextVar("bertforge_cores_share", default=None)


def session_threads() -> int:
    """The threads a session opened here should use: physical_cores(), or the share of them the piece
    running on this thread was given (fanout.side_by_side runs pieces beside each other)."""
    return _cores_share.get() or physical_cores()


@contextlib.contextmanager
def sharing_cores(threads: int) -> Iterator[None]:
    """Sessions opened within (on this thread) use `threads` threads."""
    token = _cores_share.set(max(1, threads))
    try:
        yield
    finally:
        _cores_share.reset(token)
