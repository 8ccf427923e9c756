"""The library API the CLI wraps: build, validate, each returning data and an exit code."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bertforge.bench as bench
import bertforge.results_cache as results_cache
from bertforge.artifact import (
    atomic_directory,
    read_manifest,
    sha256_file,
    verify_directory,
    write_json_atomic,
    write_text_atomic,
)
from bertforge.cache import cache_root
from bertforge.crash_log import library_messages_to
from bertforge.errors import EXIT_GATE_FAILED, EXIT_OK, UsageError
from bertforge.executor import Executor, LocalExecutor, started
from bertforge.onnx_files import MODEL_DATA_FILE, model_bytes, model_config, uses_external_data
from bertforge.output_dir import check_writable, output_lock, rejected_path
from bertforge.pipeline import (
    OUTPUT_MARKER,
    assemble_variant,
    build_variants,
    check_output_dir,
    check_own_directories,
    foreign_files,
    listed_variants,
    required_variants,
    source_artifact,
    write_marker,
)
from bertforge.preflight import warnings_for
from bertforge.progress import Progress
from bertforge.recipe import Recipe
from bertforge.remote_cache import session as remote_session
from bertforge.report import html as html_report
from bertforge.report import markdown as md_report
from bertforge.report.content import make_report
from bertforge.report.model_card import write_cards
from bertforge.report.weigh import few_positions_warnings, intervals, plan_miss_warnings
from bertforge.runtime_floor import floor_of_file
from bertforge.sources import ResolvedSource, resolve
from bertforge.stages import BY_NAME, EXTRA_VARIANTS, VARIANTS
from bertforge.validation.corpus import corpus_digest
from bertforge.validation.gates import evaluate


@dataclass
class Outcome:
    exit_code: int
    report: dict[str, Any]
    out: Path


def evaluate_variants(dirs: dict[str, Path], source: ResolvedSource, source_key: str, recipe: Recipe,
                      progress: Progress, use_cache: bool,
                      executor: Executor) -> tuple[dict[str, Any], dict[str, dict], list[str], dict[str, Any] | None]:
    """Validation metrics and latency per variant, run by `executor`; cached results reused when
    `use_cache`; the last item: where this run's latencies were measured (None: none were)."""
    keys = {name: read_manifest(path)["key"] for name, path in dirs.items()}
    validation_parts = {"source": source_key, "corpus": corpus_digest(recipe.validation.corpus),
                        "validation": recipe.validation.model_dump(mode="json", exclude={"gates"})}
    reference_key = results_cache.key_for("reference", validation_parts)
    metric_keys = {n: results_cache.key_for("validation", {**validation_parts, "variant": k}) for n, k in keys.items()}
    found = {n: results_cache.load("validation", k) for n, k in metric_keys.items()} if use_cache else {}
    reference = results_cache.load("reference", reference_key) if use_cache else None
    missing = [n for n in dirs if found.get(n) is None]
    cached = [n for n in dirs if n not in missing]
    for kind in ("validation", "reference"):
        if kind in results_cache.refused:
            progress.message(f"warning: a cached {kind} result was refused ({results_cache.refused.pop(kind)}); "
                             "measured again")
    if missing or reference is None:
        with progress.step("validate") as info:
            fresh = executor.validate(source, {n: dirs[n] for n in missing}, recipe.validation,
                                      lambda done, total: progress.update(
                                          f"{done}/{total} sentence runs (reference, then one variant at a time)"))
            reference = {"corpus": fresh["corpus"], "reference": fresh["reference"]}
            results_cache.store("reference", reference_key, reference)
            for name in missing:
                found[name] = fresh["variants"][name]
                results_cache.store("validation", metric_keys[name], found[name])
            info["note"] = f"{fresh['corpus']['masked_positions']} masked positions" + (
                f"; cached: {', '.join(cached)}" if cached else "")
    validation = {**reference, "variants": found}
    latencies: dict[str, dict] = {}
    measured_on = None
    if recipe.bench.enabled:
        bench_parts = recipe.bench.model_dump(mode="json")

        def latency_key(name: str, machine: dict[str, Any] | None = None) -> str:
            return results_cache.key_for("latency", {**bench_parts, "variant": keys[name]}, machine)

        # latencies are kept under the machine that timed them; a cached one is reused only where the
        # variants are timed in this process (a Ray build times them on a worker it does not choose)
        if use_cache and executor.describe()["kind"] == "local":
            latencies = {n: v for n in keys if (v := results_cache.load("latency", latency_key(n)))
                         and not bench.busy(v)}
        to_time = {n: dirs[n] for n in dirs if n not in latencies}
        if to_time:
            with progress.step("latency") as info:
                timed, measured_on = executor.latency(to_time, recipe.bench.sequence_length, recipe.bench.warmup,
                                                      recipe.bench.repeats)
                noisy = []
                for name, stats in timed.items():
                    if bench.busy(stats):  # measured on a busy machine: a later build measures it again
                        noisy.append(name)
                    else:
                        results_cache.store("latency", latency_key(name, measured_on), stats)
                latencies.update(timed)
                info["note"] = f"timed {', '.join(to_time)} on {measured_on['host']}" + (
                    f"; busy machine (rounds spread > {bench.BUSY_SPREAD}x), not cached: {', '.join(noisy)}"
                    if noisy else "")
        # which latencies this run measured (together, interleaved) and which an earlier build did
        latencies = {n: {**v, "this_run": n in to_time} for n, v in latencies.items()}
    return validation, latencies, cached, measured_on


def input_limit_warnings(corpus: dict[str, Any], latencies: dict[str, dict], recipe: Recipe) -> list[str]:
    """What the model's input limit changed: corpus lines cut or left out, latency at a shorter sequence."""
    found = []
    limit = corpus.get("max_length")
    if corpus.get("truncated_lines"):
        from bertforge.validation.corpus import MAX_LENGTH

        cap = (f"the model takes ({limit} word pieces)" if limit is not None and limit < MAX_LENGTH
               else f"validation reads ({limit} word pieces, its cap whatever the model takes)")
        found.append(f"{corpus['truncated_lines']} validation sentences were longer than {cap} and were cut to it")
    if corpus.get("dropped_mask_lines"):
        found.append(f"{corpus['dropped_mask_lines']} validation sentences lost their own [MASK] to that cut and "
                     "were left out")
    measured = {stats.get("sequence") for stats in latencies.values()} - {None}
    if measured and min(measured) < recipe.bench.sequence_length:
        found.append(f"latency measured at sequence {min(measured)}, the most the model takes "
                     f"(bench.sequence_length {recipe.bench.sequence_length})")
    return found


def validate_and_report(out: Path, source: ResolvedSource, source_key: str, recipe: Recipe, variants: list[str],
                        progress: Progress, warnings: list[str], use_cache: bool = True,
                        web: bool = False, executor: Executor | None = None) -> dict[str, Any]:
    """Validate the variant directories under `out`, time them, write report.{json,md,html} there; with
    `web`, also measure each variant's agreement between onnxruntime-web (wasm) and native onnxruntime.
    `executor`: where validation and latency run (default: this process)."""
    dirs = {name: out / name for name in variants}
    executor = executor or LocalExecutor()
    validation, latencies, cached, measured_on = evaluate_variants(dirs, source, source_key, recipe, progress,
                                                                   use_cache, executor)
    on_web: dict[str, dict[str, Any]] = {}
    if web:
        from bertforge.web_runtime import web_agreement

        with progress.step("onnxruntime-web") as info:
            on_web = web_agreement(source.path, dirs, recipe.validation)
            info["note"] = "same top-1 as native: " + ", ".join(
                f"{name} {found['top1_vs_native']:.2%}" for name, found in on_web.items())
    limited = input_limit_warnings(validation["corpus"], latencies, recipe)
    for warning in limited:
        progress.message(f"warning: {warning}")
    warnings = warnings + limited
    entries = {}
    for name, path in dirs.items():
        metrics = {k: v for k, v in validation["variants"][name].items() if k != "probes"}
        manifest = read_manifest(path)
        gates = evaluate(name, metrics, recipe.validation.gates.get(name))
        entries[name] = {
            "size_bytes": model_bytes(path),  # model.onnx and its external data, if any
            "sha256": sha256_file(path / "model.onnx"),
            "needs": floor_of_file(path / "model.onnx").as_dict(),  # the oldest onnxruntime, the contrib ops
            **({"data_sha256": sha256_file(path / MODEL_DATA_FILE)} if uses_external_data(path) else {}),
            "key": manifest["key"],
            "stage": manifest["stage"],
            "stage_seconds": manifest["timings"]["seconds"],
            "metadata": manifest["metadata"],
            "latency": latencies.get(name, {}),
            **({"web": on_web[name]} if name in on_web else {}),
            "metrics": metrics,
            "intervals": intervals(metrics),
            "probes": validation["variants"][name].get("probes", {}),
            "evaluation_cached": name in cached,
            "gates": [g.as_dict() for g in gates],
            "passed": all(g.passed for g in gates),
        }
        for gate in gates:
            if not gate.passed:
                progress.alert(gate.line())
    few = few_positions_warnings(entries, {name: gate.model_dump() for name, gate in recipe.validation.gates.items()})
    few += plan_miss_warnings(entries)
    for warning in few:
        progress.message(f"warning: {warning}")
    warnings = warnings + few
    # source_key: the hash of the checkpoint's files, the model's identity for `compare` (not the spec string)
    model = {"spec": source.spec, "kind": source.kind, "description": source.description, "license": source.license,
             "checkpoint": str(source.path), "source_key": source_key}
    ran = {**executor.describe(), **({"latency_measured_on": measured_on} if measured_on else {})}
    report = make_report(model=model, validation=validation, variants=entries, warnings=warnings, executor=ran)
    write_cards(out, report)  # each variant's README.md, listed in its manifest
    write_json_atomic(out / "report.json", report, sort_keys=False)  # variants in recipe order
    write_text_atomic(out / "report.md", md_report.render(report))
    write_text_atomic(out / "report.html", html_report.render(report))
    return report


def build(recipe: Recipe, out: Path, progress: Progress | None = None, remote_cache: str | None = None,
          remote_cache_readonly: bool | None = None, executor: str | None = None,
          ray_address: str | None = None) -> Outcome:
    """`remote_cache`: an fsspec URL of a shared stage cache (default $BERTFORGE_REMOTE_CACHE; none when
    neither), read and written, or only read with `remote_cache_readonly`. `executor`: `local` (default:
    this process) or `ray` (stages, validation shards and latency as Ray tasks; ray_executor.py), which
    joins `ray_address` (default $RAY_ADDRESS), else starts a local Ray instance for this build."""
    progress = progress or Progress("quiet")
    out = Path(out)
    check_output_dir(out)
    check_writable(out)
    with output_lock(out):
        check_output_dir(out)  # again, now that no other build or validate can be changing it
        if (out / OUTPUT_MARKER).is_file():  # a failing rebuild would go beside it: that place must be free
            rejected_path(out)
        log = cache_root() / "logs" / f"build-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-libraries.log"
        remote = remote_session.from_settings(remote_cache, remote_cache_readonly, progress.message)
        with library_messages_to(log), remote_session.using(remote), \
                started(executor, ray_address, progress, usable_settings(remote)) as runner:
            outcome = _build(recipe, out, progress, runner)
        if log.is_file():
            progress.message(f"library warnings: {log}")
        if remote is not None:
            progress.message(remote.summary())
        return outcome


def check_corpora(recipe: Recipe, source: ResolvedSource) -> None:
    """Every corpus the build will read, checked before any stage runs: the validation corpus used to
    be read only after every variant was built."""
    from transformers import AutoTokenizer

    from bertforge.validation.corpus import check_corpus

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    config_of_model = model_config(source.path)
    corpora = {"validation.corpus": recipe.validation.corpus}
    for variant in required_variants(recipe.variants):  # parents too: int8-auto-masked builds int8-auto
        section = BY_NAME[variant].section
        calibration = getattr(getattr(recipe, section), "calibration_corpus", None)
        if calibration is not None:  # any stage that calibrates reads one
            corpora[f"{section}.calibration_corpus"] = calibration
    for key, corpus in corpora.items():
        check_corpus(corpus, tokenizer, config_of_model, key,
                     recipe.validation.max_sentences if key == "validation.corpus" else None)
    from bertforge.validation.corpus import position_limit

    limit = position_limit(tokenizer, config_of_model)
    for index, probe in enumerate(recipe.validation.probes):
        if "[MASK]" not in probe and tokenizer.mask_token not in probe:
            raise UsageError(f"validation.probes.{index}: {probe!r} has no [MASK]")
        pieces = len(tokenizer(probe.replace("[MASK]", tokenizer.mask_token), verbose=False)["input_ids"])
        if pieces > limit:
            raise UsageError(f"validation.probes.{index}: {pieces} word pieces, more than the {limit} the model "
                             "takes; shorten it")


def _build(recipe: Recipe, out: Path, progress: Progress, executor: Executor) -> Outcome:
    with progress.step("resolve") as info:
        source = resolve(recipe.model)
        info["note"] = f"{source.spec} -> {source.path}"
    warnings = warnings_for(recipe)
    for warning in warnings:
        progress.message(f"warning: {warning}")
    with progress.step("check corpora"):
        check_corpora(recipe, source)
    placed = {"linked": 0, "copied": 0, "bytes_copied": 0}
    variants = list(recipe.variants)
    # a rebuild whose gates fail leaves the previous build in `out` as it was and goes beside it
    destination = {"path": out}
    # every cache entry the build uses stays locked against `cache prune` until the build is written
    with contextlib.ExitStack() as hold:
        state = build_variants(recipe, source, progress, hold,
                               lambda: executor.build_stages(recipe, source, progress, hold))

        def kept(old: Path) -> None:
            progress.alert(f"files bertforge did not write were added to {destination['path']} during the build; "
                           f"the previous build and those files are kept whole in {old}")

        # complete or absent; files added to the old one meanwhile keep it from being deleted
        with atomic_directory(out, destination=lambda: destination["path"], foreign=foreign_files,
                              kept=kept) as staging:
            for name in variants:
                for what, count in assemble_variant(state.artifacts[name], staging / name, recipe).items():
                    placed[what] += count
            report = validate_and_report(staging, source, state.source_key, recipe, variants, progress, warnings,
                                         executor=executor)
            write_marker(staging, recipe, source, variants)
            if not report["gates_passed"] and (out / OUTPUT_MARKER).is_file():
                destination["path"] = rejected_path(out)
    written = destination["path"]
    progress.message(md_report.terminal_summary(report))
    progress.message(f"wrote {written}/ (report.md, report.html, report.json); " + placement_note(placed))
    if written != out:
        progress.alert(f"gates failed: the previous build in {out} is kept as it was; this build is in {written}")
    return Outcome(EXIT_OK if report["gates_passed"] else EXIT_GATE_FAILED, report, written)


def usable_settings(remote: Any) -> tuple[str, bool] | None:
    """The remote cache as Ray tasks open it (URL, read-only); None where there is none, or the store
    failed its first check (the run goes on without it, and so must its tasks)."""
    return remote.settings() if remote is not None and remote.usable() else None


def placement_note(placed: dict[str, int]) -> str:
    """How the variant files reached the output: hard links into the cache, or copies."""
    if not placed["copied"]:
        return f"{placed['linked']} variant files hard-linked from the cache (read-only), no model bytes copied"
    return (f"{placed['linked']} variant files hard-linked from the cache, {placed['copied']} copied "
            f"({placed['bytes_copied'] / 1e6:.1f} MB: external data, which onnx will not read through a hard "
            "link, or files the filesystem would not link)")


def validate_existing(out: Path, recipe: Recipe, progress: Progress | None = None, model_spec: str | None = None,
                      remote_cache: str | None = None, remote_cache_readonly: bool | None = None,
                      runtime: str = "native", executor: str | None = None, ray_address: str | None = None) -> Outcome:
    """Re-validate the variants of an existing build directory and rewrite its report. Everything is
    measured again; with a remote cache (as in `build`) the new results are published to it where it
    lacks them, for builds elsewhere to reuse. `executor`, `ray_address`: as in `build`."""
    progress = progress or Progress("quiet")
    out = Path(out)
    if not (out / OUTPUT_MARKER).is_file():
        raise UsageError(f"{out} is not a bertforge build directory (no {OUTPUT_MARKER})")
    with output_lock(out):
        remote = remote_session.from_settings(remote_cache, remote_cache_readonly, progress.message)
        with remote_session.using(remote), started(executor, ray_address, progress,
                                                   usable_settings(remote)) as runner:
            outcome = _validate_existing(out, recipe, progress, model_spec, runner, runtime == "web")
        if remote is not None:
            progress.message(remote.summary())
        return outcome


def _validate_existing(out: Path, recipe: Recipe, progress: Progress, model_spec: str | None, executor: Executor,
                       web: bool = False) -> Outcome:
    listed = listed_variants(out) or list(VARIANTS + EXTRA_VARIANTS)
    check_own_directories(out, listed)  # listed_variants checks its own names; the fallback's too
    variants = [v for v in listed if (out / v / "model.onnx").is_file()]
    if not variants:
        raise UsageError(f"{out} holds no variant directories")
    gone = [v for v in listed if v not in variants]
    if gone:  # validating the rest would pass a build that no longer holds what it built
        raise UsageError(f"{out}: {', '.join(gone)} listed in {OUTPUT_MARKER} but missing (rebuild; "
                             "`bertforge verify` lists every difference)")
    for variant in variants:
        problems = verify_directory(out / variant)
        if problems:
            raise UsageError(f"{out / variant}: {problems[0]}; its files no longer match manifest.json "
                                 "(rebuild it; `bertforge verify` lists every difference)")
    with progress.step("resolve") as info:
        source = resolve(model_spec or recipe.model)
        info["note"] = f"{source.spec} -> {source.path}"
    with progress.step("hash source"):
        source_key = source_artifact(source).key
    report = validate_and_report(out, source, source_key, recipe, variants, progress, warnings_for(recipe),
                                 use_cache=False, web=web, executor=executor)
    progress.message(md_report.terminal_summary(report))
    return Outcome(EXIT_OK if report["gates_passed"] else EXIT_GATE_FAILED, report, out)
