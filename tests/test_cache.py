"""The stage cache: hits skip the stage, keys chain, interrupted writes are never trusted."""

import os
import sys
from pathlib import Path

import pytest

from bertforge import pipeline
from bertforge.artifact import MANIFEST, Artifact, verify_directory
from bertforge.cache import cache_root, stage_key
from bertforge.optimizers.config import FusionConfig, Int8DynamicConfig


def test_key_changes_with_config_version_and_parent():
    base = stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base == stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "2", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "1", {"opt_level": 1}, libraries={"onnx": "1"})
    assert base != stage_key("other", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "1"})
    assert base != stage_key("parent", "fusion", "1", {"opt_level": 0}, libraries={"onnx": "2"})
    # a child's key is built from its parent's: a changed parent key changes every descendant
    assert stage_key(base, "fp16", "1", {}) != stage_key(stage_key("p2", "fusion", "1", {}), "fp16", "1", {})


def test_unhashable_config_is_an_error():
    with pytest.raises(TypeError, match="cannot be hashed"):
        stage_key("p", "fusion", "1", {"bad": object()})


def test_cache_hit_skips_the_stage_function(tiny_variants, monkeypatch):
    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    calls = []
    original = pipeline.STAGES["int8-dynamic"].run
    monkeypatch.setattr(pipeline.STAGES["int8-dynamic"], "run", lambda *a: calls.append(a) or original(*a))
    assert pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig()).cached and calls == []
    # only the int8 config changed: the stage runs again, its parent (fusion) is untouched
    run = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig(per_channel=False))
    assert not run.cached and len(calls) == 1
    assert run.artifact.path != tiny_variants["int8-dynamic"]


def test_a_stage_killed_midway_leaves_nothing_trusted(tiny_variants, monkeypatch):
    fp32 = Artifact(tiny_variants["fp32"], tiny_variants["fp32"].name.split("-", 1)[1], "export", None)

    def dies_after_writing(src, out, config):
        (out / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt  # what a kill during the stage looks like to Python

    monkeypatch.setattr(pipeline.STAGES["fusion"], "run", dies_after_writing)
    config = FusionConfig(opt_level=1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("fusion", fp32, config)
    key = pipeline.key_of_stage("fusion", fp32, config, {})
    assert not (cache_root() / "stages" / f"fusion-{key}").exists()
    assert not list((cache_root() / "stages").glob(".tmp-*")), "the temporary directory is removed"
    # a hard kill (no cleanup) leaves at most a .tmp-* directory, which no lookup ever reads:
    leftover = cache_root() / "stages" / f".tmp-fusion-{key}-dead"
    (leftover / "model.onnx").parent.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    monkeypatch.undo()
    run = pipeline.run_stage("fusion", fp32, config)
    assert not run.cached and (run.artifact.path / MANIFEST).is_file()
    assert verify_directory(run.artifact.path) == []


def test_verify_catches_a_flipped_byte(tiny_variants, tmp_path):
    import shutil

    copy = tmp_path / "fp16"
    shutil.copytree(tiny_variants["fp16"], copy)
    assert verify_directory(copy) == []
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    assert verify_directory(copy) == ["model.onnx: sha256 differs from the manifest"]
    (copy / "extra.bin").write_bytes(b"x")
    assert "extra.bin: not listed in the manifest" in verify_directory(copy)


def test_rebuild_is_byte_identical(tiny_checkpoint, tiny_variants, tmp_path):
    """The same recipe on the same machine gives the same model files, stage by stage."""
    import os
    import shutil

    from bertforge.artifact import sha256_file
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    # int8-auto plans by kernel times measured on this machine, an input the stage declares and its
    # key covers; "the same machine" here means the same measurement, as a warm cache would give
    fresh = tmp_path / "fresh-cache"
    (fresh / "results").mkdir(parents=True)
    for measured in (cache_root() / "results").glob("int8-costs-*.json"):
        shutil.copy2(measured, fresh / "results" / measured.name)
    shutil.copy2(cache_root() / "results.key", fresh / "results.key")  # their signing key: else re-measured
    os.environ["BERTFORGE_CACHE"] = str(fresh)
    try:
        recipe = Recipe(model=str(tiny_checkpoint), int8_static={"calibration_samples": 8})
        state = pipeline.build_variants(recipe, resolve(recipe.model), Progress("quiet"))
    finally:
        os.environ["BERTFORGE_CACHE"] = str(tiny_variants["fp32"].parent.parent)
    for name, run in state.artifacts.items():
        assert not run.cached
        assert run.artifact.path.name == tiny_variants[name].name, f"{name}: same key"
        for file in ("model.onnx", "config.json", "tokenizer.json"):
            assert sha256_file(run.artifact.path / file) == sha256_file(tiny_variants[name] / file), (name, file)


def test_two_builds_sharing_a_cache_run_a_stage_once(tiny_variants, monkeypatch):
    import threading
    import time

    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    calls = []
    original = pipeline.STAGES["int8-dynamic"].run

    def slow(*args):
        calls.append(args)
        time.sleep(0.5)  # the second build arrives while the first is writing
        return original(*args)

    monkeypatch.setattr(pipeline.STAGES["int8-dynamic"], "run", slow)
    config = Int8DynamicConfig(reduce_range=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pipeline.run_stage("int8-dynamic", fused, config)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(run.cached for run in results) == [False, True]
    assert verify_directory(results[0].artifact.path) == []


def test_source_keys_differ_for_checkpoints_kept_under_a_dot_cache_folder(tiny_checkpoint, tmp_path):
    """Checkpoints usually live under ~/.cache; that part of their path must not hide their files."""
    import shutil

    from bertforge.sources import ResolvedSource
    from conftest import make_tiny_checkpoint

    home_cache = tmp_path / ".cache" / "bertforge" / "sources"
    first = home_cache / "a"
    shutil.copytree(tiny_checkpoint, first)
    second = make_tiny_checkpoint(home_cache / "b", seed=1)
    hub_meta = first / ".cache" / "huggingface"
    hub_meta.mkdir(parents=True)
    (hub_meta / "download.lock").write_text("ignored")  # huggingface_hub metadata inside a checkpoint

    def key(path):
        return pipeline.source_artifact(ResolvedSource(str(path), path, "local", "")).key

    plain = pipeline.source_artifact(ResolvedSource("t", tiny_checkpoint, "local", "")).key
    assert key(first) == plain != key(second)


def test_cached_validation_follows_the_corpus_text(tiny_checkpoint, tmp_path):
    """A validation result is reused for the same corpus text, and measured again once the file at the
    same path says something else."""
    import json

    import bertforge
    from bertforge.validation.corpus import corpus_digest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\nThe dog ran in the park today.\nA bird sang in the tall tree.\n")
    before = corpus_digest(str(corpus))
    out = tmp_path / "out"

    def cached_again() -> bool:  # a build reuses cached results (validate always measures)
        assert bertforge.build(out, model=str(tiny_checkpoint), variants=["fp32"], bench={"enabled": False},
                               validation={"corpus": str(corpus), "seed": 3}).exit_code == 0
        return json.loads((out / "report.json").read_text())["variants"]["fp32"]["evaluation_cached"]

    cached_again()
    assert cached_again()
    corpus.write_text("The cat sat on the mat.\nThe dog ran in the park today.\nA fish swam in the cold lake.\n")
    assert corpus_digest(str(corpus)) != before
    assert not cached_again()
    assert corpus_digest("builtin") != corpus_digest("head-fit")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite(path, edit):
    path.chmod(0o644)  # entries are read-only
    path.write_text(edit(path.read_text()))


def test_a_damaged_cache_entry_is_rebuilt_never_shipped(tiny_variants):
    """A hit is verified against its manifest; a corrupt, partial or stripped entry is rebuilt."""
    from bertforge.artifact import sha256_file

    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    entry = tiny_variants["int8-dynamic"]
    good = sha256_file(entry / "model.onnx")
    damage = {
        "sha256 differs": lambda: _flip_a_byte(entry / "model.onnx"),
        "model.onnx: missing": lambda: (entry / "model.onnx").unlink(),
        "tokenizer.json: missing": lambda: (entry / "tokenizer.json").unlink(),
        "no manifest": lambda: (entry / MANIFEST).unlink(),
        "not readable JSON": lambda: _rewrite(entry / MANIFEST, lambda text: text[: len(text) // 2]),
        "its manifest names the entry int8-dynamic-0": lambda: _rewrite(
            entry / MANIFEST, lambda text: text.replace(entry.name.split("-", 2)[2], "0" * 16)),
    }
    for expected, do in damage.items():
        do()
        run = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig())
        assert not run.cached and run.artifact.path == entry, expected
        assert expected in run.rebuilt_because and run.rebuilt_because.endswith("rebuilt"), run.rebuilt_because
        assert verify_directory(entry) == [] and sha256_file(entry / "model.onnx") == good
    intact = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig())
    assert intact.cached and intact.rebuilt_because is None


def test_key_covers_the_stage_code_and_every_helper_it_imports(tiny_variants, monkeypatch):
    from bertforge.code_digest import code_modules

    assert {"bertforge.optimizers.tied_quant", "bertforge.optimizers.graph.exclusions"} <= set(
        code_modules("bertforge.optimizers.int8_dynamic"))
    assert {"bertforge.optimizers.int8_auto.sensitivity", "bertforge.optimizers.int8_auto.search",
            "bertforge.optimizers.int8_auto.plans", "bertforge.optimizers.tied_quant",
            "bertforge.validation.corpus"} <= set(code_modules("bertforge.optimizers.int8_auto.stage"))
    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    before = pipeline.key_of_stage("int8-dynamic", fused, Int8DynamicConfig(), {})
    assert before == tiny_variants["int8-dynamic"].name.split("-", 2)[2]
    monkeypatch.setattr(pipeline, "code_digest", lambda module: "edited")
    assert pipeline.key_of_stage("int8-dynamic", fused, Int8DynamicConfig(), {}) != before


@pytest.mark.parametrize("stage, parent", [("int8-static", "fused"), ("int8-auto", "fp32")])
def test_key_covers_the_calibration_corpus_text(tiny_variants, tmp_path, stage, parent):
    from bertforge.optimizers.config import Int8StaticConfig
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig

    built = Artifact(tiny_variants[parent], tiny_variants[parent].name.split("-", 1)[1], "?", None)
    corpus = tmp_path / "calibration.txt"
    corpus.write_text("The cat sat on the mat.\nA dog ran in the park.\n")
    config = (Int8StaticConfig if stage == "int8-static" else Int8AutoConfig)(calibration_corpus=str(corpus))

    def key():
        return pipeline.key_of_stage(stage, built, config, pipeline.stage_inputs(stage, built, config))

    before = key()
    assert key() == before
    corpus.write_text("The cat sat on the mat.\nA bird sang in the tree.\n")  # same file name, new text
    assert key() != before


def test_int8_auto_key_covers_the_costs_it_plans_by(tiny_variants):
    """The kernel times are measured once per machine and kept; other times make another key."""
    import json

    from bertforge.optimizers.int8_auto.config import Int8AutoConfig

    fp32 = Artifact(tiny_variants["fp32"], tiny_variants["fp32"].name.split("-", 1)[1], "export", None)
    config = Int8AutoConfig()
    inputs = pipeline.stage_inputs("int8-auto", fp32, config)
    assert pipeline.stage_inputs("int8-auto", fp32, config) == inputs, "read back, not measured again"
    key = pipeline.key_of_stage("int8-auto", fp32, config, inputs)
    assert key == tiny_variants["int8-auto"].name.split("-", 2)[2]
    stored = [json.loads(p.read_text())["data"] for p in (cache_root() / "results").glob("int8-costs-*.json")]
    assert inputs["costs"] in stored
    costs = json.loads(json.dumps(inputs["costs"]))
    costs["ms"]["fp32"] = {group: ms * 2 for group, ms in costs["ms"]["fp32"].items()}
    other = {**inputs, "costs": costs}
    assert pipeline.key_of_stage("int8-auto", fp32, config, other) != key


def _exited_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_builds_staging_and_scratch_are_removed_by_the_next_build(tmp_path):
    import json
    import os
    import tempfile
    import time

    from bertforge.artifact import OWNER_FILE, STALE_AFTER_S, atomic_directory, boot_id, owned_scratch, pid_namespace

    def owned_by(path, pid):
        (path / OWNER_FILE).write_text(json.dumps({"tool": "bertforge staging", "pid": pid}))

    gone = _exited_pid()
    old = time.time() - STALE_AFTER_S - 60
    stale = tmp_path / f".tmp-fused-abc-{gone}-x1y2"
    recent = tmp_path / f".tmp-fused-abc-{gone}-r3s4"  # its process is gone, but it may be another container's
    recent_here = tmp_path / f".tmp-fused-abc-{gone}-h5j6"  # gone, and its pid is this namespace's: at once
    # the same namespace name on another machine sharing the cache (the first namespace is named alike on
    # every host): its pid is not this machine's to judge
    other_host = tmp_path / f".tmp-fused-abc-{gone}-m7n8"
    running = tmp_path / f".tmp-fp32-def-{os.getppid()}-q5w6"  # a live process (pytest's parent)
    unmarked = tmp_path / ".tmp-fp16-u7v8"  # no owner mark: not ours to judge
    users = tmp_path / f".tmp-thesis-{gone}-final"  # a user's folder whose name fits the old pattern
    for path in (stale, recent, recent_here, other_host, running, unmarked, users):
        path.mkdir()
        (path / "model.onnx").write_bytes(b"partial")
    for path, pid in ((stale, gone), (recent, gone), (running, os.getppid())):
        owned_by(path, pid)
    (recent_here / OWNER_FILE).write_text(json.dumps({"tool": "bertforge staging", "pid": gone,
                                                      "pid_namespace": pid_namespace(), "boot_id": boot_id()}))
    (other_host / OWNER_FILE).write_text(json.dumps({"tool": "bertforge staging", "pid": gone,
                                                     "pid_namespace": pid_namespace(), "boot_id": "another-boot"}))
    for path in (stale, running, unmarked, users):
        os.utime(path, (old, old))
    with atomic_directory(tmp_path / "int8-dynamic-key") as staging:
        assert f"-{os.getpid()}-" in staging.name
        (staging / "model.onnx").write_bytes(b"done")
    assert not stale.exists()
    assert not recent_here.exists() or pid_namespace() is None  # no hour's wait where the pid is ours to judge
    assert recent.exists() and other_host.exists() and running.exists() and unmarked.exists() and users.exists()
    assert (users / "model.onnx").read_bytes() == b"partial"
    assert sorted(p.name for p in (tmp_path / "int8-dynamic-key").iterdir()) == ["model.onnx"]  # no mark left
    assert (tmp_path / "int8-dynamic-key" / "model.onnx").read_bytes() == b"done"

    # libraries' temp files (ORT's quantizers use the default temp directory) land in bertforge's scratch
    killed = tmp_path / "tmp" / f"int8-static-{gone}-k9l0"
    killed.mkdir(parents=True)
    owned_by(killed, gone)
    os.utime(killed, (old, old))
    before = tempfile.gettempdir()
    with owned_scratch(tmp_path / "tmp", "int8-static-") as scratch:
        with tempfile.TemporaryDirectory(prefix="ort.quant.") as library_temp:
            library_scratch = Path(library_temp).parent
            assert library_scratch.parent == tmp_path / "tmp"
            assert (library_scratch / OWNER_FILE).is_file()  # bertforge's, removed if this process is killed
        assert not killed.exists()
    assert not scratch.exists() and not library_scratch.exists()
    assert tempfile.gettempdir() == before


def test_two_builds_on_two_threads_keep_the_temp_directory_each_relies_on(tmp_path):
    import tempfile
    import threading

    from bertforge.artifact import owned_scratch

    before = tempfile.gettempdir()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def first() -> None:
        with owned_scratch(tmp_path / "a", "int8-dynamic-"):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with owned_scratch(tmp_path / "b", "int8-static-"):
            second_in.set()
            first_out.wait(10)
            # the first build has ended: the default temp directory must still exist and be bertforge's
            with tempfile.TemporaryDirectory(prefix="ort.quant.") as library_temp:
                seen["second"] = library_temp
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert "second" in seen, "the second build's quantizer could not make its temp directory"
    assert Path(seen["second"]).parent.parent in (tmp_path / "a", tmp_path / "b")
    assert tempfile.gettempdir() == before
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())


def test_publishing_swaps_the_old_output_out_without_a_moment_without_one(tmp_path, monkeypatch):
    import ctypes
    import errno

    from bertforge import artifact

    real_exchange = artifact.exchange
    swaps: list[bool] = []

    def recorded(a: Path, b: Path) -> bool:
        swaps.append(real_exchange(a, b))
        return swaps[-1]

    monkeypatch.setattr(artifact, "exchange", recorded)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with artifact.atomic_directory(out) as staging:
        (staging / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output stays whole until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    if sys.platform != "linux":
        return
    # Linux: one renameat2 call swapped them (the fallback renames the old output aside first)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    swapped = real_exchange(a, b)
    if not swapped and ctypes.get_errno() == errno.ENOSYS:
        pytest.skip("this kernel has no renameat2")
    assert swapped, f"renameat2(RENAME_EXCHANGE) failed: {errno.errorcode.get(ctypes.get_errno())}"
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
    assert swaps == [True]


def test_key_covers_every_library_that_shapes_an_artifact():
    """accelerate decides whether optimum stores the tied decoder once, so it is in the key too."""
    from bertforge.cache import stage_key
    from bertforge.environment import TRACKED_LIBRARIES, library_versions

    versions = library_versions()
    assert {"accelerate", "optimum", "onnxruntime", "onnxconverter-common", "transformers", "torch"} <= set(versions)
    assert list(versions)[:len(TRACKED_LIBRARIES)] == list(TRACKED_LIBRARIES)
    other = {**versions, "accelerate": versions["accelerate"] + ".post1"}
    assert stage_key(None, "export", "1", {}, versions) != stage_key(None, "export", "1", {}, other)


def test_an_onnxruntime_build_under_another_name_is_keyed_by_its_own_version(tmp_path, monkeypatch):
    """onnxruntime-gpu installs the `onnxruntime` module with `onnxruntime` itself absent: its version is in
    the key (a real installed distribution's metadata, written on a sys.path entry)."""
    import sys

    from bertforge import environment

    info = tmp_path / "onnxruntime_gpu-1.32.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.32.0\n")
    environment.library_versions.cache_clear()
    without = environment.library_versions()
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    environment.library_versions.cache_clear()
    try:
        with_gpu = environment.library_versions()
    finally:
        environment.library_versions.cache_clear()
    assert "onnxruntime-gpu" not in without and with_gpu["onnxruntime-gpu"] == "1.32.0"
    assert stage_key(None, "export", "1", {}, without) != stage_key(None, "export", "1", {}, with_gpu)


def test_a_write_that_fails_midway_keeps_nothing_half_written(tiny_checkpoint, tmp_path):
    """A full disk, as far as a test can make one without mounting a filesystem: a file-size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored) makes the export's write of model.onnx fail with an OSError."""
    import resource
    import signal
    import subprocess
    import sys

    cache, out = tmp_path / "cache", tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the tiny export is ~4 MB

    done = subprocess.run([sys.executable, "-m", "bertforge", "build", "--model", str(tiny_checkpoint), "--variants",
                           "fp32", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BERTFORGE_CACHE": str(cache)}, preexec_fn=limit_file_size)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, done.stderr
    assert lines[-1].startswith("bertforge: error: ") and "File too large" in lines[-1], done.stderr
    assert not out.exists()
    assert not list((cache / "stages").glob("*")), "no cache entry, complete or partial, is kept"


def _chained_code_keys(package: Path, monkeypatch) -> dict[str, str]:
    """Every variant's key as the pipeline chains it, from the code digest alone (the rest held fixed),
    with the package's source read from `package`."""
    from bertforge import code_digest

    monkeypatch.setattr(code_digest, "PACKAGE_DIR", package)
    code_digest.code_modules.cache_clear()
    code_digest.code_digest.cache_clear()
    from bertforge.recipe import Recipe

    keys: dict[str, str] = {}
    for variant, (stage, parent, section) in pipeline.VARIANT_PLAN.items():
        module = pipeline.STAGES[stage].__name__
        config = getattr(Recipe(), section).model_dump(mode="json")
        keys[variant] = stage_key(keys.get(parent, "source"), stage, "1", config, libraries={},
                                  extra={"code": code_digest.code_digest(module)})
    code_digest.code_modules.cache_clear()
    code_digest.code_digest.cache_clear()
    return keys


def test_a_stage_key_follows_the_code_the_stage_runs_and_nothing_else(tmp_path, monkeypatch):
    """A comment in the HTML report changes no stage key (a shared cache keeps every hit); a change to a
    stage's own module changes its key and its descendants' only."""
    import shutil

    from bertforge import code_digest
    from bertforge.stages import SPECS

    package = tmp_path / "bertforge"
    shutil.copytree(code_digest.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _chained_code_keys(package, monkeypatch)
    assert len(set(before.values())) == len(before)
    for module in ("report/html.py", "cli.py", "api.py", "validation/validate.py", "commands.py"):
        with open(package / module, "a") as handle:
            handle.write("# a comment\n")
    assert _chained_code_keys(package, monkeypatch) == before

    def descendants(variant: str) -> set[str]:
        below = {v for v, (_, parent, _) in pipeline.VARIANT_PLAN.items() if parent == variant}
        return below.union(*(descendants(v) for v in below))

    for stage in {spec.stage for spec in SPECS} - {"optimizers.masked_head"}:  # int8-auto runs its head_input too
        source = package / (stage.replace(".", "/") + ".py")
        original = source.read_text()
        source.write_text(original + "\nCHANGED = 1\n")
        after = _chained_code_keys(package, monkeypatch)
        source.write_text(original)
        changed = {v for v in before if after[v] != before[v]}
        built_by_it = {spec.name for spec in SPECS if spec.stage == stage}  # int8-blockwise's builds int8-weights too
        assert changed == built_by_it.union(*(descendants(v) for v in built_by_it)), stage
    head = package / "optimizers" / "masked_head.py"
    head.write_text(head.read_text() + "\nCHANGED = 1\n")
    after = _chained_code_keys(package, monkeypatch)
    assert {v for v in before if after[v] != before[v]} == {"int8-auto", "int8-dynamic-masked", "int8-auto-masked"}


def _as_user(uid: int, gid: int, umask: int, argv: list[str], env: dict[str, str]):
    import subprocess

    def become() -> None:
        os.setgroups([gid])
        os.setgid(uid)
        os.setuid(uid)
        os.umask(umask)

    return subprocess.run(argv, env=env, preexec_fn=become, capture_output=True, text=True, timeout=600)


def test_a_cache_shared_by_a_group_serves_every_member_and_refuses_clearly_where_it_cannot(tiny_checkpoint):
    """Two users of one group, one setgid cache: the second hits the first's entries and results (umask
    002); with umask 022 the first's directories are closed to the second, who is told why (exit 2)."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    try:
        probe = _as_user(64001, 64000, 0o002, [sys.executable, "-c", "import bertforge"], dict(os.environ))
        refused = probe.stderr.strip().splitlines()[-1:] if probe.returncode else None
    except PermissionError as exc:
        refused = exc
    if refused:
        pytest.skip(f"another user cannot run this interpreter here ({refused})")
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="bertforge-group-", dir="/tmp"))  # pytest's is closed to others
    request_cleanup = shutil.rmtree
    os.chmod(tmp_path, 0o1777)
    checkpoint = tmp_path / "checkpoint"
    subprocess.run(["cp", "-r", str(tiny_checkpoint), str(checkpoint)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(checkpoint)], check=True)
    try:
        _two_users_share(tmp_path, checkpoint)
    finally:
        request_cleanup(tmp_path, ignore_errors=True)


def _two_users_share(tmp_path: Path, checkpoint: Path) -> None:
    import sys

    for umask, second_code in ((0o002, 0), (0o022, 2)):
        cache = tmp_path / f"cache-{umask:o}"
        cache.mkdir()
        os.chown(cache, 0, 64000)
        os.chmod(cache, 0o2775)
        env = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"},
               "BERTFORGE_CACHE": str(cache), "HOME": str(tmp_path)}
        runs = [_as_user(uid, 64000, umask, [sys.executable, "-m", "bertforge", "build", "--model", str(checkpoint),
                                             "--variants", "fp32,int8-dynamic", "--max-sentences", "20",
                                             "--no-latency", "--progress", "plain",
                                             "--out", str(tmp_path / f"out-{umask:o}-{uid}")], env)
                for uid in (64001, 64002)]
        assert runs[0].returncode == 0, runs[0].stderr
        assert runs[1].returncode == second_code, runs[1].stderr
        if second_code == 0:
            assert "fp32                 cached" in runs[1].stderr and "validate" not in runs[1].stderr
        else:
            assert "may not write" in runs[1].stderr and "umask 002" in runs[1].stderr


def test_an_entry_a_ray_task_built_that_is_gone_when_the_driver_takes_it_is_built_here(tiny_variants, tiny_checkpoint):
    import io

    from bertforge.pipeline import Built, build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), variants=["fp32", "fused"])
    log = io.StringIO()
    # the task reported fp32 under a key whose entry is gone (pruned between the task's end and the driver's lock)
    state = build_variants(recipe, resolve(recipe.model), Progress("plain", stream=log),
                           elsewhere=lambda: {"fp32": Built(key="0" * 16, cached=False, seconds=1.0, where="node-2")})
    assert state.artifacts["fp32"].artifact.path == tiny_variants["fp32"]  # taken from this machine's cache
    assert state.artifacts["fused"].artifact.path == tiny_variants["fused"]
    assert "warning: fp32: stage export: the entry export-" + "0" * 16 in log.getvalue()
    assert "building it in this process" in log.getvalue()


def test_a_measurement_is_keyed_by_the_machine_that_made_it():
    from bertforge import results_cache
    from bertforge.environment import this_machine

    parts = {"variant": "0" * 16, "sequence_length": 128}
    here = this_machine()
    assert results_cache.key_for("latency", parts, here) == results_cache.key_for("latency", parts)
    for change in ({"cpu": "Some Other CPU"}, {"threads": here["threads"] + 30}, {"cpu_class": "arm64"}):
        assert results_cache.key_for("latency", parts, {**here, **change}) != results_cache.key_for("latency", parts)


def test_keys_of_stages_whose_files_fit_the_cpu_carry_its_class(tiny_variants, monkeypatch):
    """int8 stages, and fusion at opt_level 99 (onnxruntime's layout optimizations fit the saving CPU),
    are not reused on another class; a portable fusion is."""
    fp32 = Artifact(tiny_variants["fp32"], tiny_variants["fp32"].name.split("-", 1)[1], "export", None)
    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    cases = {("fusion", FusionConfig(opt_level=99), fp32): True, ("fusion", FusionConfig(opt_level=1), fp32): False,
             ("int8-dynamic", Int8DynamicConfig(), fused): True}
    here = {case: pipeline.key_of_stage(case[0], case[2], case[1], {}) for case in cases}
    monkeypatch.setattr(pipeline, "cpu_class", lambda: "arm64")
    for case, by_class in cases.items():
        assert (pipeline.key_of_stage(case[0], case[2], case[1], {}) != here[case]) == by_class, case[:2]


HOLD_AS_ANOTHER_HOST = """
import fcntl, json, os, sys, time
directory = sys.argv[1]
path = os.path.join(directory, "{owner}")
with open(path, "w") as handle:  # a live build on another machine: a pid and namespace not this one's
    json.dump({{"tool": "bertforge staging", "pid": 2 ** 22 + 7, "pid_namespace": "pid:[1]",
               "boot_id": "another-machine"}}, handle)
fd = os.open(path, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_live_builds_staging_on_another_machine_is_kept_however_old_it_looks(tmp_path):
    """A build on another host sharing the cache (NFS): its pid says nothing here, and its staging's mtime
    stops moving while a long stage (int8-auto's search) works in its own scratch; the lock it holds on
    its owner mark keeps the next build from deleting it under it. Once the lock is gone, it is stale."""
    import os
    import subprocess
    import sys
    import time

    from bertforge.artifact import OWNER_FILE, STALE_AFTER_S, atomic_directory

    staging = tmp_path / ".tmp-int8-auto-abc-4194311-x1y2"
    staging.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AS_ANOTHER_HOST.format(owner=OWNER_FILE), str(staging)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        old = time.time() - STALE_AFTER_S - 60
        os.utime(staging, (old, old))
        with atomic_directory(tmp_path / "fused-key") as own:
            (own / "model.onnx").write_bytes(b"done")
        assert staging.exists(), "a live build's staging was deleted"
    finally:
        holder.communicate("")  # it exits: its lock goes with it
    os.utime(staging, (old, old))
    with atomic_directory(tmp_path / "fused-key-2") as own:
        (own / "model.onnx").write_bytes(b"done")
    assert not staging.exists()
