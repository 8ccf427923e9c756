"""`bertforge package`: a build as a model repository that the real clients load unchanged.

transformers.js (and onnxruntime-web) are installed with npm into a cache folder outside the repository,
once per machine; the tests skip, saying why, where node or npm is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

import bertforge

VARIANTS = ["fp32", "fp16", "int8-dynamic", "int8-blockwise"]
TEXT = "the quick brown fox jumps over the [MASK] dog."
NODE_PACKAGES = ("@huggingface/transformers@4.3.2", "onnxruntime-web@1.31.1")
FILL_MASK_JS = """
import { pipeline, env } from '@huggingface/transformers';
const [parent, name, text, dtype] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = parent + '/';
const fill = await pipeline('fill-mask', name, dtype ? { dtype } : {});
console.log(JSON.stringify(await fill(text, { top_k: 5 })));
"""

# onnxruntime-web in Node (what `bertforge validate --runtime web` runs): the logits at one position
WEB_LOGITS_JS = """
import * as ort from "onnxruntime-web";
import fs from "fs";
ort.env.wasm.numThreads = 1;
const [model, ids, at] = process.argv.slice(2), position = Number(at), n = JSON.parse(ids).length;
const session = await ort.InferenceSession.create(fs.readFileSync(model), { executionProviders: ["wasm"] });
const tensor = (values) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), [1, n]);
const all = { input_ids: tensor(JSON.parse(ids)), attention_mask: tensor(Array(n).fill(1)),
              token_type_ids: tensor(Array(n).fill(0)) };
const feeds = {};
for (const name of session.inputNames) feeds[name] = all[name];
const logits = (await session.run(feeds, ["logits"])).logits, vocab = logits.dims[2];
console.log(JSON.stringify(Array.from(logits.data.slice(position * vocab, (position + 1) * vocab))));
"""
# The README's snippet as a page runs it offline: transformers.js's browser bundle and onnxruntime-web's
# wasm files from the page's own server (by default the wasm comes from a CDN), the repository at /models/.
BROWSER_PAGE = """<!doctype html><meta charset="utf-8"><title>fill-mask</title>
<script type="module">
import { pipeline, env } from '/transformers/transformers.min.js';
const query = new URLSearchParams(location.search);
env.localModelPath = '/models/'; env.allowLocalModels = true; env.allowRemoteModels = false;
env.backends.onnx.wasm.wasmPaths = '/ort/';
let body;
try {
  const fill = await pipeline('fill-mask', query.get('model'), { dtype: query.get('dtype') });
  body = { answers: await fill(query.get('text'), { top_k: 5 }) };
} catch (error) { body = { error: String(error?.stack ?? error) }; }
await fetch('/answer', { method: 'POST', body: JSON.stringify(body) });
</script>
"""


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """A folder where `import '@huggingface/transformers'` resolves (npm, once per machine)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed here (.ci/run installs Node.js)")
    key = hashlib.sha256(" ".join(NODE_PACKAGES).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "bertforge-tests" / f"node-{key}"
    if not (folder / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
        run = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *NODE_PACKAGES], cwd=folder,
                             env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, capture_output=True, text=True,
                             timeout=600)
        if run.returncode != 0:
            pytest.skip(f"npm could not install {', '.join(NODE_PACKAGES)}: {run.stderr.strip()[-300:]}")
    (folder / "fill_mask.mjs").write_text(FILL_MASK_JS)
    (folder / "web_logits.mjs").write_text(WEB_LOGITS_JS)
    return folder


@pytest.fixture(scope="module")
def tiny_build(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package") / "build"
    outcome = bertforge.build(out, model=str(tiny_checkpoint), variants=VARIANTS, validation={"max_sentences": 20},
                              bench={"enabled": False})
    assert outcome.exit_code == 0
    return out


@pytest.fixture(scope="module")
def repo(tiny_build, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repos") / "tiny-onnx"
    bertforge.package(tiny_build, dest)
    return dest


def test_the_repository_has_the_hub_layout_with_real_copies(tiny_build, repo):
    report = json.loads((tiny_build / "report.json").read_text())
    config = json.loads((repo / "quantize_config.json").read_text())
    # no latency measured: the smallest int8 variant whose gates passed at top-1 >= 95%
    int8 = {v: report["variants"][v]["size_bytes"] for v in ("int8-dynamic", "int8-blockwise")}
    assert config["quantized"] == min(int8, key=int8.get)
    other = next(v for v in int8 if v != config["quantized"])
    assert {path: facts["variant"] for path, facts in config["files"].items()} == {
        "onnx/model.onnx": "fp32", "onnx/model_fp16.onnx": "fp16", "onnx/model_quantized.onnx": config["quantized"],
        f"onnx/model_{other.replace('-', '_')}.onnx": other}
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        assert (repo / name).is_file()
    for path, facts in config["files"].items():
        packaged, built = repo / path, tiny_build / facts["variant"] / "model.onnx"
        assert packaged.read_bytes() == built.read_bytes()
        assert packaged.stat().st_nlink == 1 and packaged.stat().st_ino != built.stat().st_ino  # a copy


def _top5(answers: list[dict]) -> list[int]:
    return [answer["token"] for answer in answers]


@pytest.mark.parametrize("dtype, variant", [(None, "fp32"), ("fp16", "fp16"), ("q8", "quantized")])
def test_transformers_js_fills_masks_as_bertforge_does(node_modules, tiny_build, repo, dtype, variant):
    """transformers.js's own fill-mask pipeline in Node, local files only, no option but the dtype."""
    if variant == "quantized":
        variant = json.loads((repo / "quantize_config.json").read_text())["quantized"]
    run = subprocess.run(["node", "fill_mask.mjs", str(repo.parent), repo.name, TEXT, *([dtype] if dtype else [])],
                         cwd=node_modules, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    ours = bertforge.fill_mask(tiny_build / variant, TEXT)[0]
    assert _top5(theirs) == [p.token for p in ours]
    assert [a["token_str"] for a in theirs] == [p.token_str for p in ours]
    for answer, prediction in zip(theirs, ours, strict=True):
        assert answer["score"] == pytest.approx(prediction.score, rel=1e-3, abs=1e-6)


def bundled_onnxruntime_web(node_modules: Path) -> Path:
    """The onnxruntime-web whose wasm files transformers.js's browser bundle was built with."""
    transformers = node_modules / "node_modules" / "@huggingface" / "transformers"
    wanted = json.loads((transformers / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    for folder in (transformers / "node_modules", node_modules / "node_modules"):
        package = folder / "onnxruntime-web" / "package.json"
        if package.is_file() and json.loads(package.read_text())["version"] == wanted:
            return package.parent / "dist"
    raise AssertionError(f"npm installed no onnxruntime-web {wanted} for transformers.js")


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("dtype, file", [("fp32", "model.onnx"), ("fp16", "model_fp16.onnx"),
                                         ("q8", "model_quantized.onnx")])
def test_transformers_js_in_a_real_browser_answers_as_onnxruntime_web_does(node_modules, tiny_build, repo, tmp_path,
                                                                           dtype, file):
    """Chromium loads the packaged repository with transformers.js's own fill-mask pipeline and answers as
    onnxruntime-web does in Node (what `validate --runtime web` measures); the float files also as
    bertforge does natively."""
    import numpy as np
    from tokenizers import Tokenizer

    from browser import answer, serving

    routes = {"/transformers/": node_modules / "node_modules" / "@huggingface" / "transformers" / "dist",
              "/ort/": bundled_onnxruntime_web(node_modules), "/models/": repo.parent}
    with serving(BROWSER_PAGE, routes) as site:
        found = answer(site, f"?model={repo.name}&dtype={dtype}&text={quote(TEXT)}", tmp_path / "profile")
    assert "error" not in found, found.get("error")
    theirs = found["answers"]
    ids = Tokenizer.from_file(str(repo / "tokenizer.json")).encode(TEXT).ids
    run = subprocess.run(["node", "web_logits.mjs", str(repo / "onnx" / file), json.dumps(ids), str(ids.index(103))],
                         cwd=node_modules, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    logits = np.array(json.loads(run.stdout), dtype=np.float64)
    scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    web = np.argsort(-scores, kind="stable")[:5]
    assert _top5(theirs) == web.tolist()
    assert [a["score"] for a in theirs] == pytest.approx(scores[web].tolist(), rel=1e-5)
    if dtype != "q8":  # int8 activations requantized in wasm round apart from native now and then
        ours = bertforge.fill_mask(tiny_build / ("fp32" if dtype == "fp32" else "fp16"), TEXT)[0]
        assert _top5(theirs) == [p.token for p in ours]
        assert [a["score"] for a in theirs] == pytest.approx([p.score for p in ours], rel=1e-3, abs=1e-6)


def test_every_card_is_one_a_hub_reads(tiny_build, repo):
    from huggingface_hub import ModelCard

    report = json.loads((tiny_build / "report.json").read_text())
    card = ModelCard.load(repo / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers.js"
    config = json.loads((repo / "quantize_config.json").read_text())
    read_back: dict[str, dict[str, float]] = {}
    for result in card.data.eval_results:  # huggingface_hub's parse of the model-index
        assert result.task_type == "fill-mask"
        read_back.setdefault(result.metric_config, {})[result.metric_type] = result.metric_value
    assert set(read_back) == set(config["files"])
    for path, facts in config["files"].items():
        assert read_back[path] == {key: report["variants"][facts["variant"]]["metrics"][key]
                                   for key in ("top1_agreement", "ref_top1_in_top5")}
    for variant in VARIANTS:
        variant_card = ModelCard.load(tiny_build / variant / "README.md")
        assert variant_card.data.pipeline_tag == "fill-mask"


def test_the_runtime_a_file_needs_is_in_its_card_and_in_inspect(tiny_build, repo, capsys):
    from bertforge.cli import main

    assert main(["inspect", str(tiny_build / "int8-blockwise")]) == 0
    assert "onnxruntime >= 1.22 (MatMulNBits with 8-bit weights" in capsys.readouterr().out
    assert main(["inspect", str(tiny_build / "int8-dynamic")]) == 0
    assert "onnxruntime >= 1.16 (the oldest release tested" in capsys.readouterr().out
    config = json.loads((repo / "quantize_config.json").read_text())
    path = next(path for path, facts in config["files"].items() if facts["variant"] == "int8-blockwise")
    row = next(line for line in (repo / "README.md").read_text().splitlines() if f"`{path}`" in line)
    assert row.endswith("| >= 1.22 |") and config["files"][path]["needs"]["onnxruntime"] == "1.22"
    assert "onnxruntime >= 1.22" in (tiny_build / "int8-blockwise" / "README.md").read_text()


def test_packaging_never_replaces_files_it_did_not_write(tiny_build, tmp_path):
    from bertforge.errors import UsageError

    dest = tmp_path / "repo"
    bertforge.package(tiny_build, dest, variants=["fp32", "int8-dynamic"])
    assert sorted(p.name for p in (dest / "onnx").iterdir()) == ["model.onnx", "model_quantized.onnx"]
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="did not write"):
        bertforge.package(tiny_build, dest)
    assert (dest / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="inside the build"):
        bertforge.package(tiny_build, tiny_build / "repo")
    with pytest.raises(UsageError, match="holds no int8-auto"):
        bertforge.package(tiny_build, tmp_path / "other", variants=["int8-auto"])


def test_packaging_again_keeps_what_you_added_or_edited_in_the_repository(tiny_build, tmp_path, monkeypatch):
    from bertforge import hub_repo
    from bertforge.errors import UsageError

    dest = tmp_path / "repo"
    bertforge.package(tiny_build, dest, variants=["fp32", "int8-dynamic"])
    (dest / "onnx" / "model_custom.onnx").write_bytes(b"mine")
    with pytest.raises(UsageError, match=r"did not write \(onnx/model_custom.onnx\)"):
        bertforge.package(tiny_build, dest)
    (dest / "onnx" / "model_custom.onnx").unlink()
    (dest / "README.md").write_text((dest / "README.md").read_text() + "\nMy notes.\n")
    with pytest.raises(UsageError, match=r"README.md \(edited since bertforge wrote it\)"):
        bertforge.package(tiny_build, dest)
    assert (dest / "README.md").read_text().endswith("My notes.\n")
    link = tmp_path / "link"
    link.symlink_to(dest, target_is_directory=True)
    with pytest.raises(UsageError, match="is a symbolic link"):
        bertforge.package(tiny_build, link)
    monkeypatch.chdir(dest)
    with pytest.raises(UsageError, match="is the current directory or holds it"):
        bertforge.package(tiny_build, Path("."))
    monkeypatch.chdir(tmp_path)
    # a file added while packaging runs keeps the previous repository whole beside the new one
    fresh = tmp_path / "fresh"
    bertforge.package(tiny_build, fresh, variants=["fp32"])
    copy = hub_repo.copy_model

    def added_meanwhile(variant_dir, target):
        (fresh / "notes.txt").write_text("mine")
        copy(variant_dir, target)

    monkeypatch.setattr(hub_repo, "copy_model", added_meanwhile)
    result = bertforge.package(tiny_build, fresh, variants=["fp32"])
    assert result.kept_previous is not None and (result.kept_previous / "notes.txt").read_text() == "mine"
    assert (result.kept_previous / "onnx" / "model.onnx").is_file() and not (fresh / "notes.txt").exists()


def test_a_variant_answering_differently_on_the_web_is_not_packaged_as_model_quantized():
    from bertforge.hub_repo import choose_quantized

    def entry(top1: float, web: float | None, p50: float) -> dict:
        return {"passed": True, "metrics": {"top1_agreement": top1}, "size_bytes": 1, "latency": {"p50_ms": p50},
                **({"web": {"top1_vs_native": web, "positions": 100}} if web is not None else {})}

    report = {"variants": {"int8-dynamic": entry(0.97, 0.96, 5.0), "int8-auto": entry(0.96, 0.999, 8.0),
                           "int8-static": entry(0.90, 1.0, 4.0)}}
    chosen, why = choose_quantized(report, ["int8-dynamic", "int8-auto", "int8-static"], 0.95)
    assert chosen == "int8-auto" and "99.9%" in why
    chosen, why = choose_quantized(report, ["int8-dynamic", "int8-static"], 0.95)
    assert chosen is None and "onnxruntime-web" in why and "top-1 90.0% < 95.0%" in why


def test_validate_on_the_web_runtime_measures_agreement_and_package_reads_it(node_modules, tiny_build, tmp_path,
                                                                            monkeypatch):
    """onnxruntime-web (wasm, in Node) against native onnxruntime on every validation position."""
    monkeypatch.setenv("BERTFORGE_ONNXRUNTIME_WEB_DIR", str(node_modules))
    (node_modules / "top1.mjs").unlink(missing_ok=True)  # bertforge writes nothing into a folder of yours
    before = sorted(p.name for p in node_modules.iterdir())
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    outcome = bertforge.validate(build, runtime="web")
    assert outcome.exit_code == 0
    report = json.loads((build / "report.json").read_text())
    positions = report["corpus"]["masked_positions"]
    for variant in VARIANTS:
        web = report["variants"][variant]["web"]
        assert web["positions"] == positions and web["runtime"].startswith("onnxruntime-web 1.31.1 wasm")
        assert web["differ"] == round((1 - web["top1_vs_native"]) * positions)
        assert f"{web['top1_vs_native']:.2%} of {positions} positions" in (build / variant / "README.md").read_text()
    assert report["variants"]["fp32"]["web"]["top1_vs_native"] == 1.0
    assert sorted(p.name for p in node_modules.iterdir()) == before
    dest = tmp_path / "repo"
    result = bertforge.package(build, dest)
    assert ("onnxruntime-web" in result.quantized_because) and result.quantized is not None
    row = next(line for line in (dest / "README.md").read_text().splitlines() if "`onnx/model.onnx`" in line)
    assert f"100.00% of {positions}" in row


def test_a_license_the_source_declares_reaches_the_cards(tmp_path):
    from bertforge.sources.spec import declared_license

    readme = tmp_path / "README.md"
    readme.write_text("---\nlanguage: en\nlicense: apache-2.0\ntags: [bert]\n---\n# a model\n")
    assert declared_license(readme) == "apache-2.0"
    readme.write_text("# a model without metadata\nlicense: mit\n")
    assert declared_license(readme) is None
    assert declared_license(tmp_path / "absent.md") is None
    from bertforge.report.hub_card import repo_metadata

    report = {"model": {"spec": "x", "kind": "local", "license": "apache-2.0"}, "corpus": {
        "source": "builtin", "masked_positions": 3}, "variants": {"fp32": {"metrics": {
            "top1_agreement": 1.0, "ref_top1_in_top5": 1.0}}}}
    assert "license: apache-2.0" in "\n".join(repo_metadata(report, {"onnx/model.onnx": "fp32"}))


def test_optimum_loads_a_packaged_file_by_subfolder_and_name(tiny_build, repo):
    from optimum.onnxruntime import ORTModelForMaskedLM
    from transformers import AutoTokenizer
    from transformers import pipeline as transformers_pipeline

    variant = json.loads((repo / "quantize_config.json").read_text())["quantized"]
    model = ORTModelForMaskedLM.from_pretrained(repo, subfolder="onnx", file_name="model_quantized.onnx")
    fill = transformers_pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(repo))
    theirs = fill(TEXT, top_k=5)
    ours = bertforge.fill_mask(tiny_build / variant, TEXT)[0]
    assert [a["token"] for a in theirs] == [p.token for p in ours]
    for answer, prediction in zip(theirs, ours, strict=True):
        assert answer["score"] == pytest.approx(prediction.score, rel=1e-4, abs=1e-7)


def test_the_web_probe_ranks_float16_logits_by_value_not_by_their_bits(node_modules, tmp_path, monkeypatch):
    """An fp16 variant without float32 io returns float16 logits, raw bits in a Uint16Array on Node 20:
    as integers -1.0 (0xBC00) outranks 2.0 (0x4000)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bertforge.web_runtime import native_top1, web_top1

    monkeypatch.setenv("BERTFORGE_ONNXRUNTIME_WEB_DIR", str(node_modules))
    weights = numpy_helper.from_array(np.array([[[-1.0, 0.5, 2.0]]], dtype=np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT16),
         helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]), helper.make_node("Mul", ["x3", "w"], ["logits"])],
        "fp16-logits", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [1, "n", 3])],
        [weights, numpy_helper.from_array(np.array([2], dtype=np.int64), "axis")])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    examples = [{"ids": [1, 3], "pos": [0, 1]}]
    assert native_top1(model, examples) == [2, 2]
    assert web_top1([model], examples)["top1"][str(model)] == [2, 2]
