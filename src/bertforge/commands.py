"""What each `bertforge` command does once its arguments are parsed (cli.py parses and sets the exit code)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bertforge.errors import EXIT_GATE_FAILED, EXIT_OK, UsageError
from bertforge.progress import Progress
from bertforge.stages import VARIANTS
from bertforge.version import __version__


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "model", None):
        overrides["model"] = args.model
    if getattr(args, "variants", None) is not None:  # "" is an empty list (an error), not the default one
        overrides["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if getattr(args, "target", None):
        overrides["target"] = args.target
    return overrides


def _recipe(args: argparse.Namespace, fallback: dict[str, Any] | None = None):
    from bertforge.recipe import load_recipe, parse_recipe

    if args.recipe is None and fallback is not None:
        data = {**fallback, **_overrides(args)}
        recipe = parse_recipe(data, "build.json")
    else:
        recipe = load_recipe(args.recipe, _overrides(args))
    updates: dict[str, Any] = {}
    if getattr(args, "corpus", None):
        updates["validation"] = recipe.validation.model_copy(update={"corpus": args.corpus})
    if getattr(args, "max_sentences", None) is not None:  # 0 is an error, not "no limit"
        base = updates.get("validation", recipe.validation)
        updates["validation"] = base.model_copy(update={"max_sentences": args.max_sentences})
    if getattr(args, "no_latency", False):
        updates["bench"] = recipe.bench.model_copy(update={"enabled": False})
    if updates:
        recipe = parse_recipe({**recipe.model_dump(mode="json"),
                               **{k: v.model_dump(mode="json") for k, v in updates.items()}})
    return recipe


def _progress(args: argparse.Namespace) -> Progress:
    return Progress("quiet" if args.quiet else args.progress)


def cmd_build(args: argparse.Namespace) -> int:
    from bertforge.api import build

    recipe = _recipe(args)
    progress = _progress(args)
    progress.message(f"bertforge {__version__}: building {recipe.model} -> {args.out} "
                     f"({', '.join(recipe.variants)})")
    return build(recipe, Path(args.out), progress, args.remote_cache, args.remote_cache_readonly, args.executor,
                 args.ray_address).exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from bertforge.api import validate_existing
    from bertforge.pipeline import recorded_recipe

    recipe = _recipe(args, recorded_recipe(Path(args.dir)))
    return validate_existing(Path(args.dir), recipe, _progress(args), args.model, args.remote_cache,
                             args.remote_cache_readonly, args.runtime, args.executor, args.ray_address).exit_code


def cmd_resolve(args: argparse.Namespace) -> int:
    from bertforge.sources import resolve, synthetic

    if args.list:
        print("demo: all-MiniLM-L6-v2's real encoder with a fitted MLM head (offline)")
        for name in synthetic.FAMILY:
            print(f"{synthetic.PREFIX}{name}: {synthetic.describe(name)}")
        return EXIT_OK
    if args.spec is None:
        raise UsageError("resolve needs a SPEC (or --list)")
    source = resolve(args.spec)
    print(f"{source.spec}: {source.description}")
    print(source.path)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from bertforge.inspect_model import inspect_model, render

    info = inspect_model(Path(args.dir))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return EXIT_OK


def cmd_package(args: argparse.Namespace) -> int:
    from bertforge.hub_repo import package

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    result = package(Path(args.dir), Path(args.dest), variants, args.int8_target)
    for path, variant in result.files.items():
        print(f"{path:<40} {variant}")
    print(("model_quantized.onnx: " + result.quantized_because) if result.quantized
          else f"no model_quantized.onnx: {result.quantized_because}")
    print(f"wrote {result.dest}/ (README.md, quantize_config.json); upload it with `huggingface-cli upload ID "
          f"{result.dest}`")
    if result.kept_previous is not None:
        print(f"files bertforge did not write were added to {result.dest} meanwhile: the previous package and "
              f"those files are kept whole in {result.kept_previous}", file=sys.stderr)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from bertforge.artifact import MANIFEST, verify_directory
    from bertforge.cpu_target import exact_here
    from bertforge.environment import cpu_class, cpu_flags
    from bertforge.pipeline import OUTPUT_MARKER, listed_variants
    from bertforge.runtime import int8_target_of

    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    targets = [root] if (root / MANIFEST).is_file() else sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    failures = 0
    marker = root / OUTPUT_MARKER
    if marker.is_file():  # a build directory: every variant the build wrote must still be there
        for name in listed_variants(root):
            if not (root / name / MANIFEST).is_file():
                failures += 1
                print(f"{root / name}: MISSING (listed in {OUTPUT_MARKER})")
    elif not targets:
        raise UsageError(f"{root} holds no {MANIFEST} (not a variant or build directory)")
    for target in targets:
        try:
            problems = verify_directory(target)
            int8_target = int8_target_of(target)
        except UsageError as exc:  # an unreadable manifest is a changed file, not a crash
            problems, int8_target = [str(exc)], None
        failures += bool(problems)
        where = "" if int8_target is None else f"  (int8 target {int8_target}: " + (
            "exact on this CPU)" if exact_here(int8_target)
            else f"NOT exact on this CPU, {cpu_class()})" if cpu_flags()
            else "exact on this CPU only if it has VNNI or AMX: its flags cannot be read here)")
        print(f"{target}: {'ok' if not problems else 'CHANGED'}{where}")
        for problem in problems:
            print(f"  {problem}")
    return EXIT_GATE_FAILED if failures else EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from bertforge.comparison import Tolerances, compare_reports, load_report, render

    tol = Tolerances(agreement=args.agreement_tolerance, latency=args.latency_tolerance)
    result = compare_reports(load_report(Path(args.run_a)), load_report(Path(args.run_b)), tol,
                             allow_different=args.allow_different)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return EXIT_GATE_FAILED if result["regressions"] else EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    import bertforge.cache_admin as cache_admin

    store = None
    if args.remote_cache:  # its failures are RemoteError: one line, exit 3
        import bertforge.remote_cache.admin as admin
        from bertforge.remote_cache.store import RemoteStore

        store = RemoteStore(args.remote_cache)
    if args.action == "verify":
        if store is not None:
            problems, hashed = admin.verify(store)
            checked = f"{hashed} blobs rehashed in {store.shown}"
        else:
            problems, checked = cache_admin.verify(), f"{len(cache_admin.entries())} entries checked"
        if args.json:
            print(json.dumps({"damaged": problems, "checked": checked}, indent=2))
        else:
            print("\n".join([*problems, f"{checked}: {len(problems)} damaged"]))
        return EXIT_GATE_FAILED if problems else EXIT_OK
    blobs = None
    if args.action == "list":
        listed = admin.entries(store) if store is not None else cache_admin.entries()
    elif store is not None:
        listed, blobs = admin.prune(store, args.older_than, args.max_size, args.dry_run)
    else:
        listed = cache_admin.prune(args.older_than, args.max_size, args.dry_run)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in listed], indent=2))
    else:
        if args.action == "prune":
            print(("would remove" if args.dry_run else "removed") + ":")
        print(cache_admin.render(listed, f"{store.shown}/stages" if store is not None else None))
        if blobs:
            print(f"and {blobs} blobs no entry names any more")
    return EXIT_OK


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from bertforge.predict import fill_mask

    answers = fill_mask(Path(args.dir), args.text, args.top_k)
    if args.json:
        print(json.dumps([[p.as_dict() for p in found] for found in answers], indent=2, ensure_ascii=False))
        return EXIT_OK
    for index, found in enumerate(answers, 1):
        if len(answers) > 1:
            print(f"[MASK] {index} of {len(answers)}")
        width = max(len(p.token_str) for p in found)
        for p in found:
            print(f"{p.score:8.4f}  {p.token_str:<{width}}  {p.sequence}")
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from bertforge.artifact import MANIFEST, write_json_atomic, write_text_atomic
    from bertforge.optimizers.int8_auto.analyze import analyze
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.pipeline import OUTPUT_MARKER
    from bertforge.report.sensitivity_table import render_markdown

    root = Path(args.dir)
    export_dir = root / "fp32" if (root / "fp32" / "model.onnx").is_file() else root
    if not (export_dir / "model.onnx").is_file() or not (export_dir / "config.json").is_file():
        raise UsageError(f"{root} holds no fp32 export (OUT/fp32/model.onnx): build with the fp32 variant first")
    # the results go beside the variants, never into one: a variant holds what its manifest lists
    target = root
    if export_dir == root and (root / MANIFEST).is_file():
        if not (root.parent / OUTPUT_MARKER).is_file():
            raise UsageError(f"{root} is a variant directory: give its build directory (sensitivity.json would "
                             "change a verified variant)")
        target = root.parent
    progress = _progress(args)
    with progress.step("sensitivity") as info:
        section = Int8AutoConfig(block_size=args.block_size, calibration_corpus=args.corpus)
        result = analyze(export_dir, section, progress=progress.update)
        info["note"] = f"{len(result['groups'])} groups, {result['calibration_positions']} positions"
    write_json_atomic(target / "sensitivity.json", result)
    write_text_atomic(target / "sensitivity.md", render_markdown(result))
    print(json.dumps(result, indent=2) if args.json else render_markdown(result))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from bertforge.bench import bench_directories, dump
    from bertforge.stages import EXTRA_VARIANTS

    root = Path(args.dir)
    if (root / "model.onnx").is_file():
        variants = {root.name: root}
    else:
        variants = {v: root / v for v in VARIANTS + EXTRA_VARIANTS if (root / v / "model.onnx").is_file()}
    if not variants:
        raise UsageError(f"{root} holds no model.onnx nor variant directories")
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError(f"bench needs --repeats >= 1 and --warmup >= 0 (got {args.repeats} and {args.warmup})")
    shapes = [(b, s) for b in (1, 8) for s in (128, 32)]
    results = bench_directories(variants, shapes, args.warmup, args.repeats, with_memory=not args.no_memory,
                                progress=_progress(args))
    if args.json:
        print(dump(results))
        return EXIT_OK
    timed = {row["repeats"] for table in results["shapes"].values() for row in table.values()}
    print(f"threads {results['threads']}; p50 / p90 ms over {'/'.join(map(str, sorted(timed)))} repeats "
          f"(--repeats {args.repeats}, rounded up to whole blocks), variants in turns of blocks")
    for shape, table in results["shapes"].items():
        print(f"{shape}:")
        for name, row in table.items():
            print(f"  {name:<14} p50 {row['p50_ms']:8.2f}  p90 {row['p90_ms']:8.2f}  "
                  f"{row['throughput_seq_s']:8.1f} seq/s")
    for name in variants:
        memory = results["memory_mb"].get(name)
        extra = f", peak RSS {memory:.0f} MB" if memory else ""
        print(f"{name:<14} size {results['size_bytes'][name] / 1e6:.1f} MB{extra}")
    return EXIT_OK
