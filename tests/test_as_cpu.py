"""tools/as-cpu (tools/as-avx2) really gives a process the lower class's kernels: CI's AVX2 pass
(.ci/run) means something only if it does. Runs where the tool can (x86 with CPUID faulting, a private
mount namespace) and this CPU is above the class."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge.environment import cpu_class, cpu_flags

TOOLS = Path(__file__).resolve().parent.parent / "tools"

# A u8 x s8 MatMulInteger whose K-adjacent products sum past int16: 4 x 255 x 127 = 129540 exactly;
# MLAS's AVX2 kernel (vpmaddubsw) saturates each pair at 32767, so 65534 there.
PROBE = """
import json
import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from numpy._core._multiarray_umath import __cpu_features__ as features
from bertforge.environment import cpu_class, cpu_model
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 4])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
    [numpy_helper.from_array(np.full((4, 1), 127, np.int8), "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
product = int(session.run(None, {"a": np.full((1, 4), 255, np.uint8)})[0].item())
print(json.dumps({"product": product, "numpy_avx512f": bool(features.get("AVX512F")),
                  "torch": torch.backends.cpu.get_cpu_capability(), "class": cpu_class(), "cpu": cpu_model()}))
"""


def tool_usable() -> bool:
    flags = cpu_flags()
    if cpu_class() in ("avx2", "avx512", "x86-64") or "cpuid_fault" not in flags or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


def probe(*prefix: str) -> dict:
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not tool_usable(), reason="needs an x86 CPU above AVX2 with CPUID faulting, and unshare")
def test_as_avx2_gives_onnxruntime_numpy_torch_and_bertforge_the_avx2_class():
    masked = probe(str(TOOLS / "as-avx2"))
    assert masked["product"] == 65534  # MLAS took its AVX2 u8 x s8 kernel and saturated
    assert masked["numpy_avx512f"] is False
    assert masked["torch"] == "AVX2"
    assert masked["class"] == "avx2"
    assert masked["cpu"].endswith("(CPUID masked to AVX2)")
    plain = probe()  # the same probe unmasked: this CPU's own class
    assert plain["class"] == cpu_class() and "(CPUID masked" not in plain["cpu"]
    if "avx512f" in cpu_flags():
        assert plain["torch"] != "AVX2" and plain["numpy_avx512f"] is True
    if plain["class"] in ("avx512-vnni", "avx-vnni", "amx"):
        assert plain["product"] == 129540  # VNNI sums the products exactly


@pytest.mark.skipif(not tool_usable() or "avx512bw" not in cpu_flags(),
                    reason="needs an x86 CPU with AVX-512 and VNNI or AMX, CPUID faulting, and unshare")
def test_as_cpu_avx512_keeps_avx512_and_takes_vnni_away():
    masked = probe(str(TOOLS / "as-cpu"), "avx512")
    assert masked["product"] == 65534  # MLAS's AVX-512 core kernel (no VNNI) saturates too
    assert masked["numpy_avx512f"] is True
    assert masked["torch"] == "AVX512"
    assert masked["class"] == "avx512"
    assert masked["cpu"].endswith("(CPUID masked to AVX-512 without VNNI)")
