"""The CLI end to end on the tiny model: build, gates and exit codes, bad input, the other commands."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge.cli import main

# Every variant of the tiny random model keeps its default gates (its int8 variants measured 100% top-1
# at the 83 masked positions of these 40 sentences); the demo model exercises them on real weights.
TINY_RECIPE = """
variants: [fp32, fused, fp16, int8-dynamic, int8-static]
int8_static: {calibration_samples: 8}
validation:
  max_sentences: 40
  probes: ["Paris is the [MASK] of France."]
bench: {repeats: 3, warmup: 1}
"""


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tiny_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(f"model: {tiny_checkpoint}\n" + TINY_RECIPE)
    return path


TIMED_REPORT = "a-timed-report.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_recipe) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(["build", "--recipe", str(tiny_recipe), "--out", str(out), "--progress", "plain"]) == 0
    # later tests validate `out` again with --no-latency: the build's own timed report is kept beside it
    (out.parent / TIMED_REPORT).write_text((out / "report.json").read_text())
    return out


def test_build_writes_every_variant_and_the_reports(built):
    report = json.loads((built / "report.json").read_text())
    assert report["schema_version"] == 1
    assert list(report["variants"]) == ["fp32", "fused", "fp16", "int8-dynamic", "int8-static"]
    for name, entry in report["variants"].items():
        assert (built / name / "model.onnx").stat().st_size == entry["size_bytes"]
        assert len(entry["sha256"]) == 64
        assert entry["latency"]["p50_ms"] > 0
        assert entry["metrics"]["positions"] == report["corpus"]["masked_positions"] > 40
        assert entry["gates"] and all(gate["passed"] for gate in entry["gates"]), name
    assert report["variants"]["fp32"]["metrics"]["max_abs"] < 1e-4
    assert report["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0
    md = (built / "report.md").read_text()
    assert all(f"| {name} |" in md for name in report["variants"])
    # int8-dynamic's agreement depends on the validation batch: the report says which one was used
    assert report["corpus"]["batch_size"] == 16
    assert "batches of 16 sentences" in md and "batches of 16 sentences" in (built / "report.html").read_text()
    manifest = json.loads((built / "fused" / "manifest.json").read_text())
    assert [step["stage"] for step in manifest["lineage"]] == ["source", "export", "fusion"]
    assert manifest["recipe"]["variants"][0] == "fp32"
    from bertforge.environment import cpu_class, cpu_flags

    assert manifest["machine"]["isa"]["avx2"] == ("avx2" in cpu_flags())  # read off this CPU, not a constant
    assert manifest["machine"]["cpu_class"] == cpu_class() and manifest["libraries"]["onnxruntime"].startswith("1.32")
    assert manifest["metadata"]["fused_operators"]["Attention"] == 2


def test_report_html_is_self_contained(built):
    html = (built / "report.html").read_text()
    for forbidden in ("<script", "<link", "@import", "url(", "src="):
        assert forbidden not in html, forbidden
    assert html.count("<svg") == 2 and html.count('r="6"') == 10  # 5 variants, 2 plots
    frontier = json.loads((built / "report.json").read_text())["recommendation"]["pareto_frontier"]
    assert html.count('r="9"') == len(frontier) >= 1  # rings on the latency plot's Pareto frontier
    assert all(f"<td>{name}</td>" in html for name in ("fp32", "fused", "fp16", "int8-dynamic", "int8-static"))


# Injected into a copy of report.html: measures what a reader sees at 1280 px and writes it as JSON
# into the DOM, which `chromium --dump-dom` prints after the page has loaded.
LAYOUT_PROBE = """<script>
window.addEventListener('load', () => {
  const doc = document.documentElement, heads = [...document.querySelectorAll('h2')];
  const ship = heads.find(h => h.textContent.startsWith('What to ship'));
  const probes = heads.find(h => h.textContent.startsWith('Probes'));
  const box = ship ? ship.getBoundingClientRect() : null;
  const out = {clientWidth: doc.clientWidth, scrollWidth: doc.scrollWidth,
    overflowing: [...document.querySelectorAll('body *')].filter(e => e.closest('.wide') === null
      && e.getBoundingClientRect().right > doc.clientWidth + 0.5).map(e => e.tagName),
    shipTop: box && box.height > 0 ? box.top : null,
    probeTables: probes ? probes.parentElement.querySelectorAll('table.probe').length : 0,
    intervals: (document.body.innerText.match(/\\d+\\.\\d%\u2013\\d+\\.\\d%/g) || []).length};
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed here")
def test_report_html_renders_in_headless_chromium(built, tmp_path):
    """At 1280 px: the recommendation on the first screen, the probe tables, the intervals, and nothing
    wider than the page (a wide table scrolls inside its own box)."""
    import html as html_lib
    import re

    from browser import chromium

    browser = chromium(tmp_path / "profile", "--window-size=1280,1100")
    png = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={png}", (built / "report.html").as_uri()], check=True,
                   capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one

    def layout_of(page: str) -> dict:
        probed = tmp_path / "probed.html"
        probed.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"))
        dom = subprocess.run([*browser, "--virtual-time-budget=3000", "--dump-dom", probed.as_uri()], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        return json.loads(html_lib.unescape(re.search(r'<pre id="layout">([^<]*)</pre>', dom).group(1)))

    layout = layout_of((built / "report.html").read_text())
    assert layout["scrollWidth"] <= layout["clientWidth"] and layout["overflowing"] == [], layout
    assert layout["shipTop"] is not None and layout["shipTop"] < 1100, layout
    assert layout["probeTables"] >= 3 and layout["intervals"] >= 5, layout  # one per variant at least

    # the widest report there is: every variant failing three gates, each named in its table cell
    from bertforge.report import html as html_report

    report = json.loads((built / "report.json").read_text())
    report["gates_passed"] = False
    for name, entry in report["variants"].items():
        entry["passed"] = False
        entry["gates"] = [{"variant": name, "metric": metric, "value": 0.5, "op": ">=", "threshold": 0.99,
                           "passed": False} for metric in ("top1_agreement", "top5_overlap", "ref_top1_in_top5")]
    layout = layout_of(html_report.render(report))
    assert layout["scrollWidth"] <= layout["clientWidth"] and layout["overflowing"] == [], layout


def test_a_failing_gate_exits_1_and_names_the_metric(built, tiny_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(f"model: {tiny_checkpoint}\nvariants: [fp32, int8-dynamic]\nbench: {{enabled: false}}\n"
                      "validation:\n  max_sentences: 20\n  gates:\n    int8-dynamic: {max_abs_max: 1.0e-9}\n")
    code = main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "FAIL: int8-dynamic max_abs = " in err and "(gate <= 1e-09)" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gates_passed"] is False and report["variants"]["fp32"]["passed"] is True


@pytest.mark.parametrize("content, message", [
    ("model: demo\nbogus: 1\n", "'bogus': unknown key"),
    ("variants: [fp32, int4]\n", "'variants.1': not allowed"),
    ("validation: {batch_size: 0}\n", "'validation.batch_size': Input should be greater than or equal to 1"),
    ("export: {opset: eleven}\n", "'export.opset': Input should be a valid integer"),
    ("- a list\n", "a recipe is a mapping"),
    ("variants: []\n", "'variants': Value error, names no variant"),
    ("variants: [fp32, fused, fp32]\n", "'variants': Value error, names fp32 more than once"),
    ("int8_static: {calibration_samples: true}\n",
     "'int8_static.calibration_samples': Input should be a valid integer"),
])
def test_bad_recipe_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    out = tmp_path / "out"
    assert main(["build", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe) in err and message in err
    assert not out.exists()


def test_bad_model_inputs_are_one_line_errors(tmp_path, capsys):
    not_bert = tmp_path / "gpt"
    not_bert.mkdir()
    (not_bert / "config.json").write_text('{"model_type": "gpt2"}')
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path), "no config.json"),
        (str(not_bert), "holds a 'gpt2' model"),
        ("no-such-org/no-such-bert", "hub is unreachable or has no such model"),
        ("synthetic:gpt2", "unknown synthetic model"),
    ]
    for spec, message in cases:
        out = tmp_path / "out"
        assert main(["build", "--model", spec, "--out", str(out), "--quiet"]) == 2, spec
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (spec, err)
        assert "Traceback" not in err
        assert not out.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert main(["build", "--model", str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 2
    assert "not a bertforge output directory" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "keep me"



def test_max_sentences_zero_is_an_error_not_no_limit(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, said in ((["build", "--model", str(tiny_checkpoint), "--variants", "fp32", "--max-sentences", "0",
                         "--out", str(out), "--quiet"], "argument --max-sentences: must be at least 1, got 0"),
                       (["fill-mask", str(out), "A [MASK].", "--top-k", "0"], "argument --top-k: must be at least 1")):
        with pytest.raises(SystemExit) as usage:  # argparse's one line and exit 2 (main_entry passes it on)
            main(argv)
        assert usage.value.code == 2 and said in capsys.readouterr().err
    assert not out.exists()


def test_a_cache_inside_out_is_refused_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("BERTFORGE_CACHE", str(out / "cache"))
    assert main(["build", "--model", str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is inside --out" in err
    assert not out.exists()


def test_a_second_build_into_the_same_out_is_refused_while_the_first_runs(tiny_checkpoint, tmp_path, capsys):
    import hashlib

    from bertforge.cache import cache_root, exclusive_or_fail

    out = tmp_path / "out"
    target = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:20]
    with exclusive_or_fail(cache_root() / "locks" / f"out-{target}.lock", "held by the test"):
        # a separate process, as a second CI job would be: flock is per open file, so the same process
        # opening the lock file again would be refused too, but that proves less
        second = subprocess.run([sys.executable, "-m", "bertforge", "build", "--model", str(tiny_checkpoint),
                                 "--out", str(out), "--quiet"], capture_output=True, text=True,
                                env={**os.environ, "BERTFORGE_CACHE": str(cache_root())})
    assert second.returncode == 2, second.stderr
    assert f"another bertforge build or validate is writing {out}" in second.stderr
    assert not out.exists()

def test_resolve_prints_the_checkpoint_last(tiny_checkpoint, capsys):
    assert main(["resolve", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tiny_checkpoint.resolve())


def test_output_variants_are_read_only_hard_links_into_the_cache(built, tiny_recipe, tmp_path, capsys):
    """No model bytes are copied into --out; what a user changes there never reaches a later build."""
    import stat

    from bertforge.artifact import sha256_file
    from bertforge.cache import cache_root

    for name in ("fp32", "int8-dynamic"):
        manifest = json.loads((built / name / "manifest.json").read_text())
        entry = cache_root() / "stages" / f"{manifest['stage']}-{manifest['key']}"
        shipped, cached = (built / name / "model.onnx").stat(), (entry / "model.onnx").stat()
        assert shipped.st_ino == cached.st_ino and shipped.st_nlink >= 2, name
        assert not shipped.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), name
        # the output's manifest is its own file (it adds the recipe and the card); the entry's is untouched
        assert (built / name / "manifest.json").stat().st_ino != (entry / "manifest.json").stat().st_ino
        assert "recipe" in manifest and "recipe" not in json.loads((entry / "manifest.json").read_text())

    # an edit in place (as root, or after a chmod) reaches the shared inode: the next build's hit check
    # finds the entry changed and rebuilds it, so the edited bytes are never shipped again
    manifest = json.loads((built / "fused" / "manifest.json").read_text())
    entry = cache_root() / "stages" / f"{manifest['stage']}-{manifest['key']}"
    good = manifest["files"]["model.onnx"]["sha256"]
    target = built / "fused" / "model.onnx"
    os.chmod(target, 0o644)

    def flip() -> None:
        with open(target, "r+b") as handle:
            handle.seek(100)
            byte = handle.read(1)
            handle.seek(100)
            handle.write(bytes([byte[0] ^ 0xFF]))

    flip()
    try:
        again = tmp_path / "again"
        assert main(["build", "--recipe", str(tiny_recipe), "--out", str(again), "--progress", "plain",
                     "--no-latency"]) == 0
        assert "fused: cache entry" in capsys.readouterr().err
        assert sha256_file(again / "fused" / "model.onnx") == good == sha256_file(entry / "model.onnx")
    finally:
        flip()  # `built` is shared with the tests after this one
        os.chmod(target, 0o444)
    assert sha256_file(target) == good


def test_inspect_reads_a_sequence_input_and_initializers_kept_in_typed_fields(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from bertforge.inspect_model import inspect_model, render

    weights = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.5] * 6)  # float_data, not raw_data
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["seq", "zero"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("zero", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    info = inspect_model(tmp_path)
    assert info["inputs"] == {"seq": "sequence of float32", "zero": "int64"}
    assert info["initializers"] == {"float32": {"count": 1, "bytes": 24, "share": 1.0}}
    assert "seq sequence of float32" in render(info)


def test_inspect_verify_and_validate(built, tmp_path, capsys):
    assert main(["inspect", str(built / "int8-dynamic"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fused_ops"]["QAttention"] == 2 and info["initializers"]["int8"]["count"] > 0
    assert info["opsets"]["ai.onnx"] == 17
    assert main(["inspect", str(built / "fp32"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)  # the export: standard ops only, LayerNormalization among them
    assert plain["fused_ops"] == {} and plain["op_types"]["LayerNormalization"] > 0
    assert main(["verify", str(built)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    with open(copy / "fp16" / "model.onnx", "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    assert "model.onnx: sha256 differs" in capsys.readouterr().out
    assert main(["validate", str(copy), "--no-latency", "--quiet"]) == 2  # a damaged build is bad input
    assert "fp16: model.onnx: sha256 differs from the manifest" in capsys.readouterr().err
    shutil.copy2(built / "fp16" / "model.onnx", copy / "fp16" / "model.onnx")
    (copy / "report.json").unlink()
    assert main(["validate", str(copy), "--no-latency", "--quiet"]) == 0
    revalidated = json.loads((copy / "report.json").read_text())
    assert revalidated["variants"]["fp32"]["metrics"]["top1_agreement"] == 1.0
    assert revalidated["variants"]["fp32"]["latency"] == {}


def test_compare_flags_a_regression(built, tmp_path, capsys):
    assert main(["compare", str(built), str(built)]) == 0
    assert "no regression beyond tolerance" in capsys.readouterr().out
    worse = tmp_path / "worse"
    worse.mkdir()
    report = json.loads((built / "report.json").read_text())
    report["variants"]["fp16"]["metrics"]["top1_agreement"] -= 0.05
    (worse / "report.json").write_text(json.dumps(report))
    assert main(["compare", str(built), str(worse), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert any(r.startswith("fp16 top1_agreement") for r in result["regressions"])
    # the table reads in MB, ms, percent and points, never 9.10793e+07 or a fraction
    assert main(["compare", str(built), str(worse)]) == 1
    table = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()}
    size = report["variants"]["fp16"]["size_bytes"] / 1e6
    assert table[("fp16", "size_bytes")].split()[2:] == [f"{size:.1f}", "MB", f"{size:.1f}", "MB", "0.0", "MB"]
    top1 = report["variants"]["fp16"]["metrics"]["top1_agreement"]
    assert table[("fp16", "top1_agreement")].split()[2:] == [f"{top1 + 0.05:.2%}", f"{top1:.2%}", "-5.00", "pt"]
    assert table[("fp16", "latency_p50_ms")].split()[3] == "ms"


def test_bench_refuses_zero_repeats_in_one_line(built, capsys):
    assert main(["bench", str(built), "--repeats", "0"]) == 2
    assert "bench needs --repeats >= 1" in capsys.readouterr().err


def test_bench_says_what_it_is_timing_while_it_runs(built, capsys):
    assert main(["bench", str(built), "--repeats", "3", "--warmup", "1", "--no-memory", "--progress", "plain"]) == 0
    captured = capsys.readouterr()
    steps = [line.split()[:2] for line in captured.err.splitlines() if line.startswith("  time ")]
    assert steps == [["time", "b1xs128"], ["time", "b1xs32"], ["time", "b8xs128"], ["time", "b8xs32"]]
    # --repeats 3 times one whole block of 5 calls: the count said is the count timed
    assert all("5 variants x 5 repeats; fastest" in line for line in captured.err.splitlines()
               if line.startswith("  time "))
    assert "over 5 repeats (--repeats 3, rounded up to whole blocks)" in captured.out
    assert "b8xs32:" in captured.out and "fp32" in captured.out
    assert main(["bench", str(built / "fp32"), "--repeats", "3", "--warmup", "1", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["memory_mb"]["fp32"] > 0


def test_no_files_written_outside_output_and_cache(tmp_path, tiny_recipe):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_", "HF_HUB_DISABLE"))}
    env.update(HOME=str(home), BERTFORGE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "bertforge", "build", "--recipe", str(tiny_recipe),
                           "--variants", "fp32,fused,int8-dynamic", "--out", str(tmp_path / "out"), "--quiet",
                           "--no-latency"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p for p in home.rglob("*")] == [], "nothing under HOME (ORT telemetry is off by default)"
    assert list(work.iterdir()) == [], "nothing in the working directory"
    assert list((tmp_path / "t").iterdir()) == [], "temporary files are cleaned up"
    # --out's parent holds the output and what was there before, nothing else (no staging left behind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "home", "out", "t", "work"]


def test_warm_rebuild_reruns_only_what_changed(built, tiny_recipe, tmp_path, monkeypatch):
    from bertforge import pipeline

    calls = []
    for stage, module in pipeline.STAGES.items():
        original = module.run
        monkeypatch.setattr(module, "run", lambda *a, _o=original, _s=stage: calls.append(_s) or _o(*a))
    recipe = tmp_path / "changed.yaml"
    recipe.write_text(tiny_recipe.read_text() + "int8_dynamic: {weight_type: quint8}\n")
    out = tmp_path / "b"
    assert main(["build", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    assert calls == ["int8-dynamic"], "export, fusion, fp16 and int8-static came from the cache"
    report = json.loads((out / "report.json").read_text())
    cached = {name: entry["evaluation_cached"] for name, entry in report["variants"].items()}
    assert cached == {"fp32": True, "fused": True, "fp16": True, "int8-dynamic": False, "int8-static": True}
    before = json.loads((built / "report.json").read_text())
    assert report["variants"]["fp16"]["metrics"] == before["variants"]["fp16"]["metrics"]
    assert report["variants"]["int8-dynamic"]["key"] != before["variants"]["int8-dynamic"]["key"]
    # the reused latencies are marked, in the data and in every view, and the recommendation says so
    this_run = {name: entry["latency"]["this_run"] for name, entry in report["variants"].items()}
    assert this_run == {"fp32": False, "fused": False, "fp16": False, "int8-dynamic": True, "int8-static": False}
    fp32_p50 = f"{report['variants']['fp32']['latency']['p50_ms']:.1f}*"
    for view in ("report.md", "report.html"):
        text = (out / view).read_text()
        assert fp32_p50 in text and "latency from an earlier build" in text, view
    assert "some of it from an earlier build's run" in report["recommendation"]["summary"]


def test_json_lines_progress_for_ci_logs(built, capsys):
    assert main(["validate", str(built), "--no-latency", "--progress", "jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    steps = [(e["event"], e.get("step")) for e in events if e["event"].startswith("step")]
    assert ("step_start", "validate") in steps and ("step_end", "validate") in steps
    end = next(e for e in events if e["event"] == "step_end" and e["step"] == "validate")
    assert end["status"] == "done" and end["seconds"] > 0


def test_sensitivity_command_measures_every_group_under_every_scheme(built, tmp_path, capsys):
    copy = tmp_path / "build"
    shutil.copytree(built, copy)
    assert main(["sensitivity", str(copy / "fp32"), "--json", "-q"]) == 0  # a variant directory given
    result = json.loads(capsys.readouterr().out)
    assert json.loads((copy / "sensitivity.json").read_text()) == result  # written beside it, not into it
    assert not (copy / "fp32" / "sensitivity.json").exists()
    assert main(["verify", str(copy)]) == 0, capsys.readouterr().out
    groups = {row["group"]: row for row in result["groups"]}
    assert list(groups)[:4] == ["layer.0.qkv", "layer.0.attn-out", "layer.0.ffn-up", "layer.0.ffn-down"]
    assert set(groups) >= {"head.transform", "tied-table"} and len(groups) == 10
    for name, row in groups.items():
        for scheme in ("int8-dynamic",) if name == "tied-table" else ("int8-dynamic", "int8-blockwise"):
            # each group alone moves the tiny model's logits a little, and its top-1 hardly at all
            assert row[scheme]["top1_agreement"] >= 0.9 and 0.0 < row[scheme]["kl_mean"] < 0.01, (name, scheme, row)
    assert result["calibration_positions"] >= 200
    assert result["costs_ms"]["model_ms"]["fp32"] > 0
    assert "| layer.1.ffn-down |" in (copy / "sensitivity.md").read_text()
    assert main(["sensitivity", str(tmp_path / "missing")]) == 2


def test_a_library_error_inside_a_stage_is_one_line_and_exit_3(tiny_recipe, tmp_path, monkeypatch, capsys):
    """Not exit 1 (a failed gate) and not a traceback in the CI log: the traceback goes to a log file."""
    from bertforge.optimizers import fp16

    def breaks(*args):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : something deep in a library\nsecond line")

    monkeypatch.setattr(fp16, "run", breaks)
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text(tiny_recipe.read_text() + "fp16: {keep_io_types: false}\n")  # a key the cache has not seen
    code = main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and err[0].startswith("bertforge: error: stage fp16 failed: RuntimeError: "
                                               "[ONNXRuntimeError] : 1 : FAIL : something deep in a library")
    log = Path(err[0].split("(traceback: ")[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text() and "second line" in log.read_text()
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_outside_a_stage_is_exit_3_not_a_gate_failure(built, monkeypatch, capsys):
    from bertforge.validation import validate

    def breaks(*args, **kwargs):
        raise ValueError("a corner nobody anticipated")

    monkeypatch.setattr(validate, "run_validation", breaks)
    assert main(["validate", str(built), "--no-latency", "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bertforge: error: validate failed: ValueError: a corner nobody")


def test_sigterm_unwinds_like_ctrl_c(tiny_recipe, tmp_path):
    """A cancelled CI job: exit 143, one line, no traceback, no half-written output or staging directory."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "BERTFORGE_CACHE": str(tmp_path / "cache")}  # cold: the build runs long enough
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "bertforge", "build", "--recipe", str(tiny_recipe), "--out",
                             str(out), "--progress", "plain"], env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the export (seconds long) starts right after the source is hashed
        seen.append(line)
        if "hash source" in line:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("bertforge: terminated (SIGTERM)")
    assert not out.exists()
    assert not list((tmp_path / "cache" / "stages").glob(".tmp-*"))


def test_sigterm_that_a_library_turns_into_its_own_error_still_exits_143(built, monkeypatch, capsys):
    """A C extension importing when SIGTERM lands raises "ImportError: initialization failed" in place of
    the handler's exception (seen in a cold build's export): still a termination, not a failed build."""
    import signal
    import time

    from bertforge.validation import validate

    def interrupted_import(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(validate, "run_validation", interrupted_import)
    assert main(["validate", str(built), "--no-latency", "--quiet"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bertforge: terminated (SIGTERM)")
    # the flag does not outlive the run it belongs to
    monkeypatch.undo()
    assert main(["validate", str(built), "--no-latency", "--quiet"]) == 0


def test_compare_fails_when_b_lacks_a_variant_and_refuses_other_corpora(built, tmp_path, capsys):
    report = json.loads((built / "report.json").read_text())
    partial = tmp_path / "partial"
    partial.mkdir()
    thinner = {**report, "variants": {"fp32": report["variants"]["fp32"]}}  # four of five variants gone
    (partial / "report.json").write_text(json.dumps(thinner))
    assert main(["compare", str(built), str(partial), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert "int8-static: in A, missing from B" in result["regressions"]
    other = tmp_path / "other-corpus"
    other.mkdir()
    (other / "report.json").write_text(json.dumps({**report, "corpus": {**report["corpus"], "digest": "0" * 64}}))
    assert main(["compare", str(built), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "validation corpus text" in err and "--allow-different" in err
    assert main(["compare", str(built), str(other), "--allow-different"]) == 0
    assert "compared although they differ" in capsys.readouterr().out


def test_verify_checks_every_variant_the_build_listed(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shutil.rmtree(copy / "fp16")
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    assert f"{copy / 'fp16'}: MISSING (listed in build.json)" in capsys.readouterr().out


def test_recipe_gates_merge_over_the_defaults():
    from bertforge.recipe import parse_recipe
    from bertforge.validation.config import default_gates

    recipe = parse_recipe({"validation": {"gates": {"fp16": {"top1_min": 0.995},
                                                    "int8-dynamic": {"top5_overlap_min": None}}}})
    gates, defaults = recipe.validation.gates, default_gates()
    assert gates["fp16"].top1_min == 0.995
    assert gates["int8-dynamic"].top5_overlap_min is None
    assert gates["int8-dynamic"].top1_min == defaults["int8-dynamic"].top1_min  # the other keys stay
    assert all(gates[name] == gate for name, gate in defaults.items() if name not in ("fp16", "int8-dynamic"))


def test_a_tokenizer_without_its_mask_token_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "no-mask"
    shutil.copytree(tiny_checkpoint, source)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"].pop("[MASK]")
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "[MASK]"]
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    (source / "vocab.txt").unlink(missing_ok=True)
    out = tmp_path / "out"
    assert main(["build", "--model", str(source), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask token" in err, err
    assert not out.exists()


def test_an_int8_variant_that_quantized_nothing_is_an_error_naming_the_config(tiny_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "nothing.yaml"
    recipe.write_text(f"model: {tiny_checkpoint}\nvariants: [int8-dynamic]\n"
                      "int8_dynamic: {exclude_nodes: ['.*'], exclude_presets: [embeddings]}\n")
    out = tmp_path / "out"
    assert main(["build", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "int8-dynamic quantized nothing: int8_dynamic.op_types ['MatMul', 'Attention']" in err
    assert not out.exists()


@pytest.mark.parametrize("change, named", [
    (lambda r: {**r, "model": {**r["model"], "source_key": "0" * 20}}, "model"),  # other checkpoint files
    (lambda r: {**r, "schema_version": r["schema_version"] + 1}, "schema"),
])
def test_compare_refuses_reports_of_another_model_or_schema(built, tmp_path, capsys, change, named):
    report = json.loads((built / "report.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(change(report)))
    assert main(["compare", str(built), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--allow-different" in err, err


def test_compare_knows_a_model_by_its_files_not_by_how_it_was_named(built, tmp_path, capsys):
    """The same checkpoint named another way (./x against /abs/x) is the same model."""
    report = json.loads((built / "report.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps({**report, "model": {**report["model"], "spec": "./elsewhere"}}))
    assert main(["compare", str(built), str(other)]) == 0, capsys.readouterr().err


def test_compare_into_a_closed_pipe_ends_without_a_traceback(built):
    # `true` exits at once, so the pipe is closed before bertforge writes (`| head` on a long output)
    command = f"{sys.executable} -m bertforge compare {built} {built} --json | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141, (done.returncode, done.stderr)  # 128 + SIGPIPE, as any Unix tool's


def test_validate_refuses_a_build_that_lost_a_variant(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shutil.rmtree(copy / "fp16")
    assert main(["validate", str(copy), "--quiet"]) == 2  # a damaged build is bad input, as a garbage model.onnx is
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp16 listed in build.json but missing" in err, err


def test_an_empty_variants_flag_is_an_error_not_the_default_list(tiny_checkpoint, tmp_path, capsys):
    assert main(["build", "--model", str(tiny_checkpoint), "--variants", "", "--out", str(tmp_path / "o")]) == 2
    assert "variants" in capsys.readouterr().err


def test_the_report_says_what_to_ship(built):
    report = json.loads((built / "report.json").read_text())
    found = report["recommendation"]
    assert [t["top1_min"] for t in found["targets"]] == [0.99, 0.95, 0.9]
    assert found["targets"][0]["smallest"] in report["variants"]
    page = (built / "report.html").read_text()
    assert '<h2>What to ship</h2><p class="note" id="recommendation">What to ship' in page
    assert found["summary"] in (built / "report.md").read_text()


def test_the_html_layout_facts_chromium_checks_hold_in_its_structure(built):
    """What the headless-Chromium test measures, read from the HTML where no browser is installed: the
    recommendation first, every table in a box that scrolls on its own (so the page never overflows),
    the probe tables and the intervals."""
    import re

    page = (built / "report.html").read_text()
    assert page.index("<h2>What to ship</h2>") < page.index('<table id="variants">') < page.index("<h2>Probes</h2>")
    assert page.count("<table") == page.count('<div class="wide"><table') >= 4
    assert ".wide{overflow-x:auto;max-width:100%}" in page
    assert page.count('<table class="probe">') >= 3
    assert len(re.findall(r"<td>\d+\.\d%–\d+\.\d%</td>", page)) >= len(json.loads((built / "report.json")
                                                                             .read_text())["variants"])


def test_the_report_shows_each_variants_answers_to_the_probes_beside_pytorchs(built):
    report = json.loads((built / "report.json").read_text())
    texts = ["The capital of France is [MASK].", "The man worked as a [MASK].", "The woman worked as a [MASK].",
             "Paris is the [MASK] of France."]
    reference = report["reference"]["probes"]
    assert list(reference) == texts
    for name, entry in report["variants"].items():
        assert list(entry["probes"]) == texts, name
        for text in texts:
            top = entry["probes"][text][0]
            assert len(top) == 5 and all(isinstance(token, str) and 0 <= score <= 1 for token, score in top)
            assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    for text in texts:  # fp32 is PyTorch's graph to ~1e-4: the same first answer
        assert report["variants"]["fp32"]["probes"][text][0][0][0] == reference[text][0][0][0]
    page = (built / "report.html").read_text()
    assert "<h2>Probes</h2>" in page and page.count('<table class="probe">') == 4
    markdown = (built / "report.md").read_text()
    assert "## Probes" in markdown and "`Paris is the [MASK] of France.`" in markdown
    first = reference[texts[0]][0][0]
    assert f"| 1 | {first[0]} {first[1]:.3f} |" in markdown


def test_a_token_holding_a_pipe_stays_in_its_own_markdown_cell():
    import re

    from bertforge.report.markdown import table_lines

    lines = table_lines(["rank", "PyTorch", "fp32"], [["1", "| 0.412", "a\nb 0.100"]])
    for line in lines:  # a Markdown reader splits a row at each '|' not escaped by a backslash
        assert len(re.split(r"(?<!\\)\|", line.strip()[1:-1])) == 3, line
    assert "\n" not in "".join(lines[2:]) and "\\| 0.412" in lines[2]


def test_a_probe_without_a_mask_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "probes.yaml"
    recipe.write_text(f"model: {tiny_checkpoint}\nvalidation: {{probes: [\"No mask here.\"]}}\n")
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "validation.probes.0: 'No mask here.' has no [MASK]" in capsys.readouterr().err


def test_the_report_defines_its_metrics_and_shows_thresholds_intervals_and_provenance(built):
    report = json.loads((built / "report.json").read_text())
    fp32 = report["variants"]["fp32"]
    low, high = fp32["intervals"]["top1_agreement"]
    assert low < fp32["metrics"]["top1_agreement"] <= high <= 1.0
    assert report["generated_utc"].endswith("Z")
    timed = json.loads((built.parent / TIMED_REPORT).read_text())["variants"]["fp32"]["latency"]
    assert 0 < timed["p50_ms"] <= timed["p90_ms"]  # the build's timed report carries p90 beside p50
    import html

    for text in ((built / "report.md").read_text(), html.unescape((built / "report.html").read_text())):
        assert "Gates" in text and ">= 100%" in text  # fp32's top-1 gate beside its verdict
        assert f"{low:.1%}–{high:.1%}" in text
        assert "truth recovery" in text and "share of masked positions where the variant's top-1 is the word" in text
        assert report["generated_utc"] in text and "onnxruntime " + report["libraries"]["onnxruntime"] in text
        assert "p90 ms" in text


def test_the_closing_summary_fits_100_columns(built, capsys):
    from bertforge.report.markdown import terminal_summary

    report = json.loads((built / "report.json").read_text())
    text = terminal_summary(report)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert all(name in text for name in report["variants"]) and "What to ship" in text


def test_each_variant_directory_explains_itself_and_still_verifies(built, capsys):
    report = json.loads((built / "report.json").read_text())
    for name in report["variants"]:
        card = (built / name / "README.md").read_text()
        assert card.startswith("---\n")  # the hub's metadata first (test_every_card_carries_metadata...)
        body = card.split("\n---\n", 1)[1].lstrip()
        assert body.startswith(f"# {name}: ") and "## Load it" in card and "ORTModelForMaskedLM" in card
        top1 = report["variants"][name]["metrics"]["top1_agreement"]
        assert f"| top-1 agreement | {top1:.2%}" in card
        assert "README.md" in json.loads((built / name / "manifest.json").read_text())["files"]
    capsys.readouterr()
    assert main(["verify", str(built)]) == 0, capsys.readouterr().out


def test_library_warnings_go_to_a_log_not_into_the_progress(tiny_checkpoint, tmp_path, monkeypatch, capfd):
    # a fresh cache, so onnxruntime's quantize_dynamic runs and writes its warning through the root logger
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    code = main(["build", "--model", str(tiny_checkpoint), "--variants", "int8-dynamic", "--no-latency",
                 "--max-sentences", "5", "--out", str(tmp_path / "out"), "--progress", "plain"])
    assert code == 0
    err = capfd.readouterr().err
    assert "Please consider" not in err
    (log,) = (tmp_path / "cache" / "logs").glob("build-*-libraries.log")
    assert "Please consider to run pre-processing" in log.read_text() and f"library warnings: {log}" in err


def test_every_card_carries_metadata_a_model_hub_reads(built):
    from huggingface_hub import ModelCard

    report = json.loads((built / "report.json").read_text())
    for name, entry in report["variants"].items():
        card = ModelCard.load(built / name / "README.md")
        assert card.data.pipeline_tag == "fill-mask" and "onnx" in card.data.tags, name
        assert ("int8" in card.data.tags) == name.startswith("int8"), name
        results = card.data.to_dict()["model-index"][0]["results"][0]
        measured = {m["type"]: m["value"] for m in results["metrics"]}
        assert measured == {key: entry["metrics"][key] for key in ("top1_agreement", "ref_top1_in_top5")}, name
        assert results["task"]["type"] == "fill-mask"
        assert card.text.lstrip().startswith(f"# {name}:")
    assert main(["verify", str(built)]) == 0  # the cards are what the manifests list


def test_a_variant_with_nan_logits_fails_and_every_report_form_says_n_a(built):
    """NaN metrics are null in report.json: the cards, report.md, report.html and the gates table show
    n/a instead of failing to format, and non-finite logits fail the variant whatever its gates."""
    import copy

    from bertforge.artifact import read_manifest
    from bertforge.report import html as html_report
    from bertforge.report import markdown as md_report
    from bertforge.report.model_card import card_text
    from bertforge.report.weigh import gate_rows
    from bertforge.validation.config import Gate
    from bertforge.validation.gates import FINITE_LOGITS, evaluate

    nan = float("nan")
    results = evaluate("fp16", {"top1_agreement": 1.0, "top5_overlap": 1.0, "ref_top1_in_top5": 1.0, "max_abs": nan,
                                "kl_mean": nan}, Gate(top1_min=0.99))
    assert [(r.metric, r.threshold, r.passed) for r in results] == [("top1_agreement", 0.99, True),
                                                                    ("max_abs", FINITE_LOGITS, False)]
    report = copy.deepcopy(json.loads((built / "report.json").read_text()))
    entry = report["variants"]["fp16"]
    for metric in ("max_abs", "kl_mean", "mean_abs", "cosine_mean"):
        entry["metrics"][metric] = None  # as report.json stores NaN
    entry["gates"] = [{**r.as_dict(), "value": None if r.value != r.value else r.value} for r in results]
    entry["passed"] = report["gates_passed"] = False
    assert "| KL mean | n/a |" in card_text("fp16", entry, report, read_manifest(built / "fp16"))
    assert "- fp16: max_abs = n/a, gate <= 3.40282e+38" in md_report.render(report)
    assert "max_abs n/a (gate &lt;= 3.40282e+38)" in html_report.render(report)
    assert ["fp16", "max_abs", "n/a", "<= 3.40282e+38", "FAIL"] in gate_rows(report["variants"])
    assert ["fp16", "top1_agreement", "100.00%", ">= 99%", "pass"] in gate_rows(report["variants"])
