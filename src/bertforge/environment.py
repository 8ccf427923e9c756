"""Facts about the machine and libraries that a manifest records."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

import psutil

# Every library that shapes an artifact's bytes: accelerate decides the exporter's tied-weight dedup,
# onnx-ir is MatMulNBitsQuantizer's graph library, numpy rounds the quantized weights.
TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "accelerate", "onnx",
                     "onnx-ir", "onnxruntime", "onnxconverter-common", "numpy")


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
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


def has_vnni() -> bool:
    flags = cpu_flags()
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def machine_info() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
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


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
