"""The CPU class that picks the int8 kernels, where each int8 target is exact, and the threads a session
may use on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("flags", "machine", "expected"), [
    ({"avx2"}, "x86_64", "avx2"), ({"avx2", "avx512f"}, "x86_64", "avx512"),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "avx512-vnni"), ({"avx2", "avx_vnni"}, "x86_64", "avx-vnni"),
    ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "x86_64", "amx"), (set(), "aarch64", "arm64")])
def test_cpu_class_and_where_each_target_is_exact(flags, machine, expected):
    from bertforge.cpu_target import exact_here, target_warning
    from bertforge.environment import cpu_class

    assert cpu_class(flags, machine) == expected
    assert exact_here("portable", flags, machine)
    assert exact_here("vnni", flags, machine) == (expected not in ("avx2", "avx512"))
    assert (target_warning("vnni", "v", flags, machine) is None) == exact_here("vnni", flags, machine)
    assert target_warning(None, "v", flags, machine) is None


def test_a_cpu_whose_flags_cannot_be_read_is_not_said_to_lack_vnni():
    """Without /proc/cpuinfo (Windows, macOS) the flags are unknown, not absent: the warning says so."""
    from bertforge.cpu_target import target_warning

    warning = target_warning("vnni", "int8-dynamic", set(), "x86_64")
    assert "cannot read this CPU's flags" in warning and "this CPU (" not in warning
    assert "has no avx512_vnni" in target_warning("vnni", "int8-dynamic", {"avx2"}, "x86_64")


def test_threads_follow_the_cpu_affinity():
    """onnxruntime counts every core of the machine; a process pinned to one CPU gets one thread."""
    script = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from bertforge.environment import physical_cores; print(physical_cores())")
    pinned = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "1"


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0), ({}, None)])
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2(tmp_path, files, expected):
    from bertforge.environment import cgroup_cpu_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_the_recipe_target_sets_every_int8_section_unless_a_section_says_otherwise(tmp_path):
    from bertforge.cli import parser
    from bertforge.commands import _overrides
    from bertforge.recipe import INT8_SECTIONS, load_recipe

    assert {getattr(load_recipe(None), s).cpu_target for s in INT8_SECTIONS} == {"portable"}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("target: vnni\nint8_static: {cpu_target: portable, calibration_samples: 8}\n")
    recipe = load_recipe(recipe_file)
    assert [getattr(recipe, s).cpu_target for s in INT8_SECTIONS] == ["vnni", "portable", "vnni", "vnni", "vnni"]
    assert recipe.int8_static.calibration_samples == 8
    args = parser().parse_args(["build", "--out", str(tmp_path / "o"), "--target", "vnni"])
    assert load_recipe(None, _overrides(args)).int8_auto.cpu_target == "vnni"
    # the Python API over a Recipe object: a new target reaches the sections the old one had set, both ways
    from bertforge.recipe import Recipe, overridden

    for old, new in (("vnni", "portable"), ("portable", "vnni")):
        moved = overridden(Recipe(target=old, int8_static={"calibration_samples": 8}), {"target": new})
        assert moved.target == new and moved.int8_static.calibration_samples == 8
        assert [getattr(moved, s).cpu_target for s in INT8_SECTIONS] == [new] * 5
    assert overridden(Recipe(target="vnni"), {"model": "x"}).int8_auto.cpu_target == "vnni"


def test_a_masked_head_over_a_vnni_variant_is_warned_about_on_a_cpu_without_vnni(monkeypatch):
    from bertforge import preflight
    from bertforge.recipe import parse_recipe

    monkeypatch.setattr(preflight, "exact_here", lambda target: target != "vnni")  # as on an AVX2 CPU
    for variant, section in (("int8-dynamic-masked", "int8_dynamic"), ("int8-auto-masked", "int8_auto")):
        recipe = parse_recipe({"variants": [variant], section: {"cpu_target": "vnni"}})
        found = preflight.warnings_for(recipe)
        assert any(line.startswith(f"{variant}: int8 target vnni on a CPU without VNNI") for line in found), found
        assert preflight.warnings_for(parse_recipe({"variants": [variant]})) == []
