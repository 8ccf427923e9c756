"""Which CPUs an int8 artifact computes the same integers on, and this CPU's class.

Every int8 kernel bertforge emits (DynamicQuantizeMatMul, MatMulInteger, QAttention, the QDQ pairs ORT
fuses into QLinearMatMul) multiplies u8 activations by s8 weights. With VNNI or AMX (and on ARM, and in
onnxruntime-web's wasm kernels) MLAS sums those products exactly in int32. Without VNNI, its AVX2 and
AVX-512 core kernels use vpmaddubsw, which adds each adjacent pair of u8 x s8 products into int16 and
saturates at 32767 (QgemmU8X8KernelAvx2.S; onnxruntime #6004, #14642): the same file computes other
numbers there. A pair of K-adjacent weights of one sign saturates once |w0| + |w1| > 128.

Targets:
- `portable` (default): s8 weights whose same-sign K-adjacent pairs sum to at most 128 in magnitude
  (optimizers/int8_weights.py: each output channel's scale widened only as far as that needs), exact on
  every class, with the same kernels and so the same speed. onnxruntime's reduce_range (weights in
  [-64, 64]) is exact too but halves every channel's grid: on demo it left no int8 plan at 95% top-1.
- `vnni`: s8 weights in [-127, 127], exact only where the products are summed in int32 (VNNI, AMX,
  ARM64); elsewhere the artifact still runs, with a warning, and computes saturated sums.

MatMulNBits (int8-blockwise) quantizes activations to s8 itself and multiplies s8 x s8 through sign
transfers; its symmetric 8-bit blocks reach -128, so a pair sums to at most 2 * 127 * 128 = 32512, under
32767: exact at either target. That holds for `int8_blockwise.symmetric: true` (the default), the case
the exact-integer test checks; blocks with zero points (`symmetric: false`) are not checked there.
"""

from __future__ import annotations

from typing import Literal, get_args

import bertforge.environment as environment
from bertforge.environment import cpu_class, is_x86
from bertforge.errors import StageError

Target = Literal["portable", "vnni"]
TARGETS: tuple[str, ...] = get_args(Target)

# x86 flags with which MLAS sums u8 x s8 products exactly in int32
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def exact_here(target: str, flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether an artifact of `target` computes here the integers it was validated with."""
    if target == "portable" or not is_x86(machine):
        return True
    flags = environment.cpu_flags() if flags is None else flags
    return any(flag in flags for flag in EXACT_INT8_FLAGS)


def target_warning(target: str | None, where: str, flags: set[str] | None = None,
                   machine: str | None = None) -> str | None:
    """The one line to print when `where` (a variant) runs on a CPU outside its target, else None."""
    if target is None or exact_here(target, flags, machine):
        return None
    if not (environment.cpu_flags() if flags is None else flags):  # no /proc/cpuinfo (Windows, macOS)
        return (f"warning: {where} was built for int8 target '{target}' and bertforge cannot read this CPU's "
                f"flags here: where it has none of {' / '.join(EXACT_INT8_FLAGS)}, its u8 x s8 sums saturate and "
                "its answers can differ from the validated ones; target: portable is exact on every CPU")
    return (f"warning: {where} was built for int8 target '{target}' and this CPU ({cpu_class(flags, machine)}) "
            f"has no {' / '.join(EXACT_INT8_FLAGS)}: its u8 x s8 sums saturate here, so its answers can differ "
            "from the validated ones; rebuild with target: portable to run it here")


# what int8_target_record writes into a manifest's metadata (a masked head carries its parent's over)
INT8_RECORD_KEYS = ("int8_target", "int8_weights", "built_on", "int8_target_asked")


def int8_target_record(target: str, saturating_pairs: int) -> dict[str, object]:
    """What an int8 stage's manifest metadata says of where its integers hold, from the graph it wrote:
    `saturating_pairs` (int8_weights.saturating_pairs_in) counts the same-sign K-adjacent s8 weight pairs
    of its u8 x s8 GEMMs past 128. None means the artifact computes the same integers on every class,
    whatever target was asked (u8 weights, reduce_range, an int8-auto plan of no such GEMM): it is
    recorded `portable`, with the target asked beside it; otherwise `vnni`, which a portable build
    never writes (the stage checks). And the CPU class it was built on."""
    if target == "portable" and saturating_pairs:
        raise StageError(f"target portable wrote {saturating_pairs} s8 weight pairs that can saturate on a CPU "
                         "without VNNI (a bertforge defect: please report it with the recipe)")
    if saturating_pairs:
        recorded, rule = "vnni", f"s8 in [-127, 127]; {saturating_pairs} same-sign K-adjacent pairs sum past 128"
    else:
        recorded, rule = "portable", "u8 x s8 GEMMs with same-sign K-adjacent s8 pairs summing to at most 128"
    return {"int8_target": recorded, "int8_weights": rule, "built_on": cpu_class(),
            **({"int8_target_asked": target} if target != recorded else {})}
