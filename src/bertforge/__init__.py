"""bertforge: turn a BERT masked-LM into validated, deployable ONNX artifacts."""

import os

from bertforge.version import __version__

# Keep a build from writing outside its output and cache directories. onnxruntime records a
# telemetry event (deviceid, onnxruntime.db) under ~/.cache/Microsoft for every process that
# loads it; ORT_DISABLE_TELEMETRY=1 stops it. BERTFORGE_ALLOW_TELEMETRY=1 leaves the libraries' defaults.
if os.environ.get("BERTFORGE_ALLOW_TELEMETRY") != "1":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# torch makes its compile cache (`torchinductor_<user>` in the temp directory) the moment torch._dynamo
# is imported, which exporting does; bertforge compiles nothing, so that folder goes under its cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    from bertforge.cache_dir import cache_root

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "torchinductor")


# The Python API. Each function imports what it needs when called: `import bertforge` stays light,
# and bertforge.fill_mask never imports torch.

def build(out, recipe=None, *, model: str | None = None, variants: list[str] | None = None,
          progress: str = "quiet", remote_cache: str | None = None, remote_cache_readonly: bool | None = None,
          executor: str | None = None, ray_address: str | None = None, **sections):
    """Build, validate and report every variant of a model into `out`, like `bertforge build`.

    recipe: a YAML path, a `bertforge.recipe.Recipe`, or None (the defaults); `model`, `variants` and
    any recipe section given as a keyword (e.g. `int8_auto={"target": {"top1_min": 0.97}}`) override
    it. `remote_cache`: an fsspec URL of a shared stage cache (default $BERTFORGE_REMOTE_CACHE), only read
    with `remote_cache_readonly`. `executor="ray"` runs the stages, validation shards and latency as Ray
    tasks, on the cluster at `ray_address` (default $RAY_ADDRESS, else a local instance started for the
    build; docs/SCALING.md). Returns `bertforge.api.Outcome` (exit_code as the CLI's, the report
    dict, the out path). A bad recipe or input raises `bertforge.errors.UsageError`/`SourceError`; a
    failed gate does not raise: `outcome.exit_code` is 1 and `outcome.report["gates_passed"]` False."""
    from pathlib import Path

    from bertforge import api
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe, load_recipe, overridden

    overrides = {"model": model, "variants": variants, **sections}
    if isinstance(recipe, Recipe):
        given = {key: value for key, value in overrides.items() if value is not None}
        recipe = overridden(recipe, given) if given else recipe
    else:
        recipe = load_recipe(recipe, overrides)
    return api.build(recipe, Path(out), Progress(progress), remote_cache, remote_cache_readonly, executor,
                     ray_address)


def validate(out, recipe=None, *, model: str | None = None, progress: str = "quiet", remote_cache: str | None = None,
             remote_cache_readonly: bool | None = None, runtime: str = "native", executor: str | None = None,
             ray_address: str | None = None):
    """Re-validate an existing build directory and rewrite its report, like `bertforge validate`;
    the recipe defaults to the one `out/build.json` recorded; fresh results are published to the remote
    cache (as in `build`); `runtime="web"` also measures each variant on onnxruntime-web (wasm, in Node);
    `executor`, `ray_address`: as in `build`.
    Returns `bertforge.api.Outcome`."""
    from pathlib import Path

    from bertforge import api
    from bertforge.pipeline import recorded_recipe
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe, load_recipe, parse_recipe

    if not isinstance(recipe, Recipe):
        recorded = recorded_recipe(Path(out)) if recipe is None else None
        recipe = parse_recipe(recorded) if recorded is not None else load_recipe(recipe)
    return api.validate_existing(Path(out), recipe, Progress(progress), model, remote_cache, remote_cache_readonly,
                                 runtime, executor, ray_address)


def compare(run_a, run_b, *, agreement_tolerance: float = 0.005, latency_tolerance: float = 0.25,
            allow_different: bool = False) -> dict:
    """B's regressions against A, like `bertforge compare` (its --json output as a dict): "regressions"
    empty means no regression. Reports of different models, corpora or schemas raise UsageError
    unless `allow_different`."""
    from pathlib import Path

    from bertforge.comparison import Tolerances, compare_reports, load_report

    return compare_reports(load_report(Path(run_a)), load_report(Path(run_b)),
                           Tolerances(agreement=agreement_tolerance, latency=latency_tolerance),
                           allow_different=allow_different)


def package(out, dest, *, variants: list[str] | None = None, int8_target: float = 0.95):
    """A build as a model repository in `dest`, like `bertforge package`: transformers.js, optimum and
    onnxruntime load it unchanged. Returns `bertforge.hub_repo.Packaged` (files, the int8 variant packaged
    as onnx/model_quantized.onnx and why)."""
    from pathlib import Path

    from bertforge.hub_repo import package as run

    return run(Path(out), Path(dest), variants, int8_target)


def fill_mask(directory, text: str, top_k: int = 5):
    """Top-k `Prediction`s (score, token, token_str, sequence) at each [MASK] of `text` from a variant
    directory, with onnxruntime and tokenizers only; one list per [MASK]."""
    from bertforge.predict import fill_mask as run

    return run(directory, text, top_k)


__all__ = ["__version__", "build", "compare", "fill_mask", "package", "validate"]
