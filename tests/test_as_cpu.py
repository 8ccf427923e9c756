"""tools/as-cpu (tools/as-avx2) really gives a process the lower class's kernels: CI's AVX2 pass
(.ci/run) means something only if it does. Runs wherever the tool can (x86 with CPUID faulting and the
class's base set, a private mount namespace); on a CPU of the class itself it proves less but holds."""

from __future__ import annotations

import json
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


def skip_unless_usable(mask: str) -> None:
    """Skip where the tool says this machine cannot take the mask (exit 2, an "as-cpu:" line: not x86,
    no CPUID faulting, nothing to keep or mask, no private mount namespace); any other failure fails."""
    done = subprocess.run([str(TOOLS / "as-cpu"), mask, "true"], capture_output=True, text=True, timeout=120)
    if done.returncode == 2 and done.stderr.startswith("as-cpu:"):
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-2000:]


def probe(*prefix: str) -> dict:
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_as_avx2_gives_onnxruntime_numpy_torch_and_bertforge_the_avx2_class():
    skip_unless_usable("avx2")
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


def test_as_cpu_avx512_keeps_avx512_and_takes_vnni_away():
    skip_unless_usable("avx512")
    masked = probe(str(TOOLS / "as-cpu"), "avx512")
    assert masked["product"] == 65534  # MLAS's AVX-512 core kernel (no VNNI) saturates too
    assert masked["numpy_avx512f"] is True
    assert masked["torch"] == "AVX512"
    assert masked["class"] == "avx512"
    assert masked["cpu"].endswith("(CPUID masked to AVX-512 without VNNI)")
