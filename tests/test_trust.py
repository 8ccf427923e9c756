"""What bertforge reads back is checked, and what it writes stays where it belongs (issue "Trust, round
2"): each test here failed on 024f178."""

import json
import os
import shutil

import pytest

from bertforge.cli import main


@pytest.fixture
def small_recipe(tmp_path, tiny_checkpoint):
    path = tmp_path / "small.yaml"
    path.write_text(f"model: {tiny_checkpoint}\nvariants: [fp32, int8-dynamic]\nbench: {{enabled: false}}\n"
                    "validation: {max_sentences: 20}\n")
    return path


def build(recipe, out, *extra) -> int:
    return main(["build", "--recipe", str(recipe), "--out", str(out), "--quiet", *extra])


def test_validate_never_follows_a_variant_name_out_of_the_build(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    victim = tmp_path / "victim" / "fp32"
    shutil.copytree(out / "fp32", victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    marker = json.loads((out / "build.json").read_text())
    marker["variants"] = ["../victim/fp32"]
    (out / "build.json").write_text(json.dumps(marker))
    assert main(["validate", str(out), "--quiet"]) == 2
    assert "lists '../victim/fp32', which is no bertforge variant" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before  # nothing read there rewritten


def test_an_edited_cached_result_is_refused_and_measured_again(small_recipe, tmp_path, capsys):
    from bertforge.cache import cache_root

    first = tmp_path / "first"
    assert build(small_recipe, first) == 0
    truth = json.loads((first / "report.json").read_text())["variants"]["int8-dynamic"]["metrics"]["top1_agreement"]
    edited = 0
    for path in (cache_root() / "results").glob("validation-*.json"):
        stored = json.loads(path.read_text())
        if stored["data"].get("top1_agreement") == truth and stored["data"].get("max_abs", 0) > 1e-3:  # int8's
            stored["data"]["top1_agreement"] = truth - 0.5
            os.chmod(path, 0o644)
            path.write_text(json.dumps(stored))
            edited += 1
    assert edited == 1, truth
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["build", "--recipe", str(small_recipe), "--out", str(second), "--progress", "plain"]) == 0
    assert "a cached validation result was refused" in capsys.readouterr().err
    again = json.loads((second / "report.json").read_text())["variants"]["int8-dynamic"]
    assert again["metrics"]["top1_agreement"] == truth and not again["evaluation_cached"]


def test_a_results_file_is_read_only_whatever_the_umask(small_recipe, tmp_path):
    from bertforge.cache import cache_root

    previous = os.umask(0)
    try:
        assert build(small_recipe, tmp_path / "out") == 0
    finally:
        os.umask(previous)
    modes = {oct(p.stat().st_mode & 0o777) for p in (cache_root() / "results").glob("*.json")}
    assert modes and all(int(m, 8) & 0o222 == 0 for m in modes), modes


def test_cache_prune_skips_every_entry_a_running_build_has_used(tiny_checkpoint):
    import contextlib

    from bertforge import cache_admin
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), variants=("fp32", "fused"))
    with contextlib.ExitStack() as hold:  # the build is still running: validation, report, ...
        state = build_variants(recipe, resolve(recipe.model), Progress("quiet"), hold)
        used = {run.artifact.path for run in state.artifacts.values()}
        removed = {entry.path for entry in cache_admin.prune(None, 0.0)}
        assert not used & removed and all(path.is_dir() for path in used)
    removed = {entry.path for entry in cache_admin.prune(None, 0.0)}  # the build is over
    assert used <= removed


def test_a_rebuild_whose_gates_fail_leaves_the_previous_build_as_it_was(small_recipe, tiny_checkpoint, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    before = (out / "report.json").read_bytes()
    strict = tmp_path / "strict.yaml"
    strict.write_text(small_recipe.read_text().replace("validation: {max_sentences: 20}", "validation:\n"
                      "  max_sentences: 20\n  gates:\n    int8-dynamic: {max_abs_max: 1.0e-9}\n"))
    capsys.readouterr()
    assert build(strict, out) == 1
    assert f"the previous build in {out} is kept as it was" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    rejected = tmp_path / "out.rejected"
    assert json.loads((rejected / "report.json").read_text())["gates_passed"] is False


def test_files_a_user_put_in_out_stop_the_rebuild_before_any_work(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    (out / "notes.md").write_text("mine")
    (out / "fp32" / "extra.txt").write_text("mine too")  # inside a variant: verify's business, not lost either
    capsys.readouterr()
    assert build(small_recipe, out) == 2
    assert "holds files bertforge did not write (notes.md)" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine"


def test_out_as_the_current_directory_is_refused(small_recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    monkeypatch.chdir(out)
    assert build(small_recipe, ".") == 2
    assert "is the current directory or holds it" in capsys.readouterr().err
    assert (out / "report.json").is_file()


def test_validate_takes_the_builds_lock(small_recipe, tmp_path, capsys):
    from bertforge.api import output_lock

    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    capsys.readouterr()
    with output_lock(out):  # a build of the same --out is running
        assert main(["validate", str(out), "--quiet"]) == 2
    assert f"another bertforge build or validate is writing {out}" in capsys.readouterr().err
