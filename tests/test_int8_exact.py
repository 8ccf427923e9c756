"""Every int8 variant computes the exact integers on this CPU, whatever its class (cpu_target.py).

Each int8 node of the tiny model's int8 variants (and of every int8-auto scheme) is held against an
exact-integer numpy reference on the inputs it gets inside the graph (int8_reference.py). On an AVX2
machine a full-range s8 weight makes these fail by 3-40% of the output's range (int8-dynamic's
MatMulIntegers by thousands of integer units; measured under an emulated AVX2 CPU): a pass here
means the same numbers on VNNI, AMX and ARM.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import tiny_feeds
from int8_reference import check_nodes, check_qdq

U8S8_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention")


def load(path) -> onnx.ModelProto:
    return onnx.load(str(path / "model.onnx"))


@pytest.mark.parametrize("variant", ["int8-dynamic", "int8-blockwise", "int8-weights", "int8-auto",
                                     "int8-dynamic-masked", "int8-auto-masked"])
def test_each_int8_node_equals_its_exact_integer_reference(int8_variants, variant):
    checked, mismatches = check_nodes(load(int8_variants[variant]), tiny_feeds())
    assert checked >= 1, f"{variant} has no int8 node to check"
    assert not mismatches, mismatches


def test_int8_static_qdq_matmuls_equal_their_exact_integer_reference(int8_variants, tmp_path):
    checked, mismatches, fused = check_qdq(load(int8_variants["int8-static"]), tiny_feeds(), tmp_path)
    assert checked == 5  # 2 layers x (attention output, FFN up) + the head's transform
    assert "MatMulIntegerToFloat" in fused  # ORT ran them as u8 x s8 integer kernels, not float MatMuls
    assert not mismatches, mismatches


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise"])
def test_every_int8_auto_scheme_equals_its_exact_integer_reference(tiny_variants, scheme):
    """int8-auto's tiny plan keeps its encoder fp32, so each scheme is checked over every group here."""
    from bertforge.artifact import MODEL_FILE
    from bertforge.onnx_files import model_config
    from bertforge.optimizers.graph.ort_fusion import mha_fused
    from bertforge.optimizers.int8_auto.groups import group_input, input_channels, quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    source = tiny_variants["fp32"]
    model, _ = mha_fused(source / MODEL_FILE, model_config(source), "test")
    groups = quant_groups(model)
    rng = np.random.default_rng(0)
    absmax = {group_input(model, g): rng.uniform(0.5, 4, input_channels(model, g)).astype(np.float32)
              for g in groups}
    planned = apply_plan(model, {g.name: scheme for g in groups}, groups, QuantizedWeights(activation_absmax=absmax))
    checked, mismatches = check_nodes(planned, tiny_feeds())
    assert checked >= len(groups)
    assert not mismatches, mismatches


def int8_weights_of_u8s8_kernels(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    """{name: (int8 weight, the axis its scales vary over; K is the other)} of every u8 x s8 kernel.

    The same walk as int8_weights.u8s8_weights, kept here on purpose: the tests check the files, and
    the manifest's count, against their own reading of the graph, so a kernel that function missed
    would not be missed by the check too."""
    initializers = {i.name: i for i in model.graph.initializer}
    # the tied decoder reads its int8 table [vocab, hidden] through a Transpose, folded at load: K is hidden
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    found = {}
    for node in model.graph.node:
        names = node.input[1:2] if node.op_type in U8S8_OPS else ()
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            names = node.input[:1]
        for name in names:
            table = transposed.get(name)
            name = table or name
            if name in initializers and initializers[name].data_type == TensorProto.INT8:
                found[name] = (numpy_helper.to_array(initializers[name]), 0 if table else 1)
    return found


@pytest.mark.parametrize("variant", ["int8-dynamic", "int8-static", "int8-blockwise", "int8-weights", "int8-auto",
                                     "int8-dynamic-masked", "int8-auto-masked"])
def test_portable_weights_cannot_saturate_a_pair_sum(int8_variants, variant):
    """The portable target's bound, checked on the files whatever this CPU is: no same-sign K-adjacent
    pair past 128 (255 * 128 < 32768), while the full [-127, 127] grid stays in use where it is safe."""
    from bertforge.optimizers.int8_weights import saturating_pairs

    weights = int8_weights_of_u8s8_kernels(load(int8_variants[variant]))
    assert weights, f"{variant}: no s8 weight of a u8 x s8 kernel found"
    over = {name: saturating_pairs(w, axis) for name, (w, axis) in weights.items()}
    assert not any(over.values()), {n: count for n, count in over.items() if count}
    assert max(int(np.abs(w.astype(np.int16)).max()) for w, _ in weights.values()) > 64  # not reduce_range
    manifest = json.loads((int8_variants[variant] / "manifest.json").read_text())
    assert manifest["metadata"]["int8_target"] == "portable"
    assert "pairs summing to at most 128" in manifest["metadata"]["int8_weights"]


@pytest.fixture(scope="module")
def vnni_int8_dynamic(tiny_checkpoint, tiny_variants):
    """int8-dynamic built with target: vnni (its loader files beside it, as a build writes them)."""
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), target="vnni", variants=("int8-dynamic",))
    assert recipe.int8_auto.cpu_target == recipe.int8_static.cpu_target == "vnni"
    return build_variants(recipe, resolve(recipe.model), Progress("quiet")).artifacts["int8-dynamic"].artifact.path


def test_vnni_target_keeps_full_range_weights(vnni_int8_dynamic):
    """target: vnni is the full s8 range, recorded as such (exact on VNNI/AMX/ARM only)."""
    from bertforge.optimizers.int8_weights import saturating_pairs

    weights = int8_weights_of_u8s8_kernels(load(vnni_int8_dynamic))
    assert sum(saturating_pairs(w, axis) for w, axis in weights.values()) > 0
    manifest = json.loads((vnni_int8_dynamic / "manifest.json").read_text())
    assert manifest["metadata"]["int8_target"] == "vnni" and "int8_target_asked" not in manifest["metadata"]
    assert manifest["metadata"]["int8_weights"] == (
        f"s8 in [-127, 127]; {sum(saturating_pairs(w, axis) for w, axis in weights.values())} same-sign "
        "K-adjacent pairs sum past 128")


@pytest.mark.parametrize("weights", [{"reduce_range": True}, {"weight_type": "quint8"}])
def test_a_vnni_build_whose_weights_cannot_saturate_is_recorded_portable_and_never_warns(
        tiny_checkpoint, tiny_variants, weights, avx2_only, capsys):
    """Asked for vnni, int8-dynamic with [-64, 64] s8 weights or u8 weights, and the tied table kept fp32
    (which would otherwise be full-range s8 at vnni: the decoder's pairs saturate), computes the same
    integers everywhere: the manifest says so (and what was asked), and an AVX2 CPU gets no warning."""
    weights = {**weights, "exclude_presets": ["embeddings"]}
    from bertforge.cli import main
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), target="vnni", variants=("int8-dynamic",), int8_dynamic=weights)
    built = build_variants(recipe, resolve(recipe.model), Progress("quiet")).artifacts["int8-dynamic"].artifact.path
    metadata = json.loads((built / "manifest.json").read_text())["metadata"]
    assert (metadata["int8_target"], metadata["int8_target_asked"]) == ("portable", "vnni")
    assert main(["fill-mask", str(built), "The capital of France is [MASK]."]) == 0
    assert "warning:" not in capsys.readouterr().err


@pytest.fixture
def avx2_only(monkeypatch):
    """This process believes it runs on an x86 CPU with AVX2 and no VNNI/AMX."""
    import platform

    from bertforge import environment, runtime

    monkeypatch.setattr(environment, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "_warned", set())


def test_a_vnni_artifact_warns_once_on_a_cpu_without_vnni(vnni_int8_dynamic, tiny_variants, avx2_only, capsys):
    from bertforge.cli import main
    from bertforge.predict import MaskFiller

    assert main(["fill-mask", str(vnni_int8_dynamic), "The capital of France is [MASK]."]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "target 'vnni'" in warnings[0] and "(avx2)" in warnings[0] and "avx512_vnni" in warnings[0]
    MaskFiller(vnni_int8_dynamic)  # the Python API, same process: said once already
    assert "warning:" not in capsys.readouterr().err
    assert main(["fill-mask", str(tiny_variants["int8-dynamic"]), "The capital of France is [MASK]."]) == 0
    assert "warning:" not in capsys.readouterr().err  # portable: exact here too

    assert main(["verify", str(vnni_int8_dynamic)]) == 0
    assert "int8 target vnni: NOT exact on this CPU, avx2" in capsys.readouterr().out
    assert main(["verify", str(tiny_variants["int8-dynamic"])]) == 0
    assert "int8 target portable: exact on this CPU" in capsys.readouterr().out


EMULATED_CHECK = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import onnx
from conftest import tiny_feeds
from int8_reference import check_nodes, check_qdq
found = {}
for name, path in json.loads(sys.argv[2]).items():
    model = onnx.load(path + "/model.onnx")
    if name == "int8-static":
        with tempfile.TemporaryDirectory() as scratch:
            checked, bad, _ = check_qdq(model, tiny_feeds(), Path(scratch))
    else:
        checked, bad = check_nodes(model, tiny_feeds())
    found[name] = [checked, [[b.op_type, b.error] for b in bad]]
print(json.dumps(found))
"""


def qemu_avx2() -> list[str] | None:
    """qemu's user-mode emulator as an AVX2 CPU without VNNI (Haswell), where it and x86 are here."""
    import platform
    import shutil

    emulator = shutil.which("qemu-x86_64")
    return [emulator, "-cpu", "Haswell"] if emulator and platform.machine() == "x86_64" else None


def test_on_an_emulated_avx2_cpu_portable_is_exact_and_full_range_saturates(int8_variants, vnni_int8_dynamic):
    """The same check on an AVX2 CPU whatever class runs the suite: qemu emulates a Haswell (AVX2, no
    VNNI), whose MLAS kernels are the vpmaddubsw ones. Portable variants are exact there; the full-range
    vnni one is not, which shows that the check sees saturation where it happens. CI installs qemu-user
    (.ci/run) and fails here without it; elsewhere the test is skipped without it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if qemu_avx2() is None:
        message = "needs qemu-x86_64 on x86 (Debian's qemu-user)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run installs it")
        pytest.skip(message)

    variants = {name: str(path) for name, path in int8_variants.items()} | {"vnni": str(vnni_int8_dynamic)}
    done = subprocess.run([*qemu_avx2(), sys.executable, "-c", EMULATED_CHECK, str(Path(__file__).parent),
                           json.dumps(variants)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # /proc/cpuinfo is the host's under qemu; the full-range variant's saturation shows the AVX2 kernels ran
    saturated = found.pop("vnni")
    assert saturated[1], "full-range weights on AVX2: some int8 node must part from the exact integers"
    for name, (checked, mismatches) in found.items():
        assert checked >= 1 and not mismatches, (name, mismatches)
