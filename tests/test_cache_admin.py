"""`bertforge cache list|prune` on a cache of its own."""

import json
import os
import time

from bertforge.cli import main


def test_list_shows_each_entry_and_prune_removes_the_least_recently_used(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    args = ["build", "--model", str(tiny_checkpoint), "--variants", "fused", "--no-latency",
            "--max-sentences", "5", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["cache", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["stage"] for e in listed) == ["export", "fusion"]
    assert all(e["size_bytes"] > 1_000_000 for e in listed)

    stages = tmp_path / "cache" / "stages"
    export = next(p for p in stages.iterdir() if p.name.startswith("export-"))
    fusion = next(p for p in stages.iterdir() if p.name.startswith("fusion-"))
    week_ago = time.time() - 7 * 86400
    os.utime(export, (week_ago, week_ago))
    os.utime(fusion, (week_ago, week_ago))
    assert main([*args, "--out", str(tmp_path / "out")]) == 0  # a hit is a use: both touched again
    assert min(export.stat().st_mtime, fusion.stat().st_mtime) > week_ago + 86400

    os.utime(export, (week_ago, week_ago))
    capsys.readouterr()
    assert main(["cache", "prune", "--older-than", "3", "--dry-run", "--json"]) == 0
    assert [e["stage"] for e in json.loads(capsys.readouterr().out)] == ["export"] and export.exists()
    assert main(["cache", "prune", "--older-than", "3", "--json"]) == 0
    assert [e["stage"] for e in json.loads(capsys.readouterr().out)] == ["export"] and not export.exists()
    assert main(["cache", "prune", "--max-size", "0", "--json"]) == 0  # the rest, least recently used first
    assert [e["stage"] for e in json.loads(capsys.readouterr().out)] == ["fusion"] and not fusion.exists()
    assert main(["cache", "prune"]) == 2
    assert "--older-than DAYS and/or --max-size GB" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "-1"]) == 2  # would have removed every entry
    assert "must be 0 or more" in capsys.readouterr().err


def test_prune_keeps_an_entry_a_build_used_after_it_was_listed(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A build that used an old entry and ended between prune's listing and its locks: the entry is no
    longer old, and stays."""
    from bertforge import cache_admin

    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["build", "--model", str(tiny_checkpoint), "--variants", "fp32", "--no-latency",
                 "--max-sentences", "5", "--quiet", "--out", str(tmp_path / "out")]) == 0
    (export,) = (tmp_path / "cache" / "stages").glob("export-*")
    week_ago = time.time() - 7 * 86400
    os.utime(export, (week_ago, week_ago))
    real = cache_admin.exclusive_or_fail

    def used_just_before(path, what):  # the build's hit touches the entry, then ends, before prune locks it
        os.utime(export)
        return real(path, what)

    monkeypatch.setattr(cache_admin, "exclusive_or_fail", used_just_before)
    capsys.readouterr()
    assert main(["cache", "prune", "--older-than", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [] and export.is_dir()
