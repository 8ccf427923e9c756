"""`bertforge package OUT DEST`: a build as a model repository laid out the way model hubs and
transformers.js expect, loadable unchanged by transformers.js (Node and browser), optimum and onnxruntime.

    DEST/config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt
    DEST/onnx/model.onnx             fp32                        transformers.js dtype "fp32" (its default on CPU)
    DEST/onnx/model_fp16.onnx        fp16                        dtype "fp16"
    DEST/onnx/model_quantized.onnx   the int8 variant to ship    dtype "q8" (its default in the browser)
    DEST/onnx/model_<variant>.onnx   every other variant         transformers.js option model_file_name
    DEST/quantize_config.json        what each file is and how it was made
    DEST/README.md                   the repository's card: hub metadata, measurements, how to load each file
    DEST/bertforge-report.json       the build's report.json

The int8 variant packaged as model_quantized.onnx is the fastest one whose gates passed with top-1
agreement at or above the target (latency from the report; the smallest where none was measured), and,
where its agreement on onnxruntime-web was measured (`bertforge validate --runtime web`), only one that
answers as native onnxruntime does on at least WEB_AGREEMENT_MIN of the positions. Files are copies,
never links into the cache: the repository is the user's to edit and upload.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge.artifact import atomic_directory, sha256_file, write_json_atomic, write_text_atomic
from bertforge.errors import UsageError
from bertforge.json_files import read_json
from bertforge.onnx_files import LOADER_FILES, MODEL_DATA_FILE, uses_external_data
from bertforge.pipeline import OUTPUT_MARKER, listed_variants
from bertforge.stages import BY_NAME

DTYPE_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
QUANTIZED_FILE = "model_quantized.onnx"
WEB_AGREEMENT_MIN = 0.995
MARKER = "quantize_config.json"
REPORT_COPY = "bertforge-report.json"


@dataclass
class Packaged:
    dest: Path
    files: dict[str, str] = field(default_factory=dict)  # onnx/<file> -> variant
    quantized: str | None = None
    quantized_because: str = ""
    kept_previous: Path | None = None  # where a previous package holding files of yours was kept whole


def file_name(variant: str, quantized: str | None) -> str:
    if variant in DTYPE_FILES:
        return DTYPE_FILES[variant]
    if variant == quantized:
        return QUANTIZED_FILE
    return f"model_{variant.replace('-', '_')}.onnx"


def choose_quantized(report: dict[str, Any], variants: list[str], top1_min: float) -> tuple[str | None, str]:
    """The int8 variant for model_quantized.onnx and why; None (and why not) when none qualifies."""
    int8 = [v for v in variants if v.startswith("int8") and not BY_NAME[v].extra]
    if not int8:
        return None, "no int8 variant was packaged"
    entries = report["variants"]
    qualified, refused = [], []
    for name in int8:
        entry = entries[name]
        top1 = entry["metrics"].get("top1_agreement", 0.0)
        web = entry.get("web", {}).get("top1_vs_native")
        if not entry.get("passed"):
            refused.append(f"{name}: gates failed")
        elif top1 < top1_min:
            refused.append(f"{name}: top-1 {top1:.1%} < {top1_min:.1%}")
        elif web is not None and web < WEB_AGREEMENT_MIN:
            refused.append(f"{name}: answers as native onnxruntime on only {web:.1%} of positions on onnxruntime-web")
        else:
            qualified.append(name)
    if not qualified:
        return None, "no int8 variant qualifies (" + "; ".join(refused) + ")"

    def speed(name: str) -> tuple[float, int]:
        latency = entries[name].get("latency") or {}
        return (latency.get("p50_ms", float("inf")), entries[name]["size_bytes"])

    best = min(qualified, key=speed)
    entry = entries[best]
    how = (f"the fastest ({entry['latency']['p50_ms']:.1f} ms p50)" if entry.get("latency", {}).get("p50_ms")
           else "the smallest (no latency measured)")
    web = entry.get("web", {}).get("top1_vs_native")
    return best, (f"{best}: {how} int8 variant whose gates passed with top-1 agreement "
                  f"{entry['metrics']['top1_agreement']:.1%} >= {top1_min:.1%}"
                  + (f", answering as native onnxruntime on {web:.1%} of positions on onnxruntime-web" if web
                     is not None else "; its agreement on onnxruntime-web was not measured "
                     "(bertforge validate --runtime web)"))


def foreign_in_package(dest: Path) -> list[str]:
    """The files in a package directory bertforge did not write: beside its own at the top, in onnx/ any
    its quantize_config.json does not list (with their external data), and a README.md edited since."""
    if not (dest / MARKER).is_file():
        return sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    config = read_json(dest / MARKER)
    files = config.get("files")
    listed = {Path(path).name for path in files} if isinstance(files, dict) else set()
    ours = {MARKER, REPORT_COPY, "README.md", "onnx", *LOADER_FILES}
    theirs = sorted(p.name for p in dest.iterdir() if p.name not in ours)
    onnx_dir = dest / "onnx"
    if onnx_dir.is_dir():
        theirs += sorted(f"onnx/{p.name}" for p in onnx_dir.iterdir()
                         if p.name not in listed and p.name.removesuffix("_data") not in listed)
    card = dest / "README.md"
    if card.is_file() and config.get("card_sha256") not in (None, sha256_file(card)):
        theirs.append("README.md (edited since bertforge wrote it)")
    return theirs


def check_destination(dest: Path, out: Path) -> None:
    if dest.is_symlink():
        raise UsageError(f"package destination {dest} is a symbolic link; name the directory it points to "
                         f"({dest.resolve()})")
    if dest.resolve() == out.resolve() or dest.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"package destination {dest} is inside the build {out}; choose a folder outside it")
    if Path.cwd().resolve().is_relative_to(dest.resolve()):
        raise UsageError(f"package destination {dest} is the current directory or holds it; choose another")
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MARKER).is_file())):
        raise UsageError(f"package destination {dest} exists and is not a bertforge package; choose another or "
                         "remove it")
    theirs = foreign_in_package(dest) if dest.is_dir() else []
    if theirs:
        raise UsageError(f"package destination {dest} holds files bertforge did not write ({', '.join(theirs[:3])}"
                         "); packaging again would replace them: move them or choose another destination")


def package(out: Path, dest: Path, variants: list[str] | None = None, top1_min: float = 0.95) -> Packaged:
    """Assemble the build `out` into the repository `dest` (replaced in one step when complete)."""
    from bertforge.report.hub_card import repo_card

    out, dest = Path(out), Path(dest)
    if not (out / OUTPUT_MARKER).is_file() or not (out / "report.json").is_file():
        raise UsageError(f"{out} is not a finished bertforge build (no {OUTPUT_MARKER} or report.json)")
    built = listed_variants(out)
    chosen = list(variants or built)
    missing = [v for v in chosen if v not in built]
    if missing:
        raise UsageError(f"{out} holds no {', '.join(missing)} (it holds {', '.join(built)})")
    if not 0 < top1_min <= 1:
        raise UsageError("--int8-target must be a top-1 agreement in (0, 1], e.g. 0.95")
    check_destination(dest, out)
    report = read_json(out / "report.json")
    quantized, because = choose_quantized(report, chosen, top1_min)
    result = Packaged(dest, quantized=quantized, quantized_because=because)

    def kept(old: Path) -> None:
        result.kept_previous = old

    with atomic_directory(dest, foreign=foreign_in_package, kept=kept) as staging:
        source = out / ("fp32" if "fp32" in chosen else chosen[0])
        for name in LOADER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        (staging / "onnx").mkdir()
        for variant in chosen:
            name = file_name(variant, quantized)
            copy_model(out / variant, staging / "onnx" / name)
            result.files[f"onnx/{name}"] = variant
        shutil.copyfile(out / "report.json", staging / REPORT_COPY)
        write_text_atomic(staging / "README.md", repo_card(out, report, result))
        # the card's hash: packaging again refuses to replace a README.md edited since
        write_json_atomic(staging / MARKER, {**quantize_config(out, report, result),
                                             "card_sha256": sha256_file(staging / "README.md")})
    return result


def copy_model(variant_dir: Path, target: Path) -> None:
    """model.onnx as `target`; a model with external data is saved again so that its data file is named
    after `target` (the name inside the graph must match the file beside it)."""
    if not uses_external_data(variant_dir):
        shutil.copyfile(variant_dir / "model.onnx", target)
        return
    import onnx

    model = onnx.load(str(variant_dir / "model.onnx"))
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{target.name}_data")
    del model
    assert not (target.parent / MODEL_DATA_FILE).exists()


def quantize_config(out: Path, report: dict[str, Any], result: Packaged) -> dict[str, Any]:
    """What each packaged file is: its variant, how it was made (the recipe section and what the stage
    recorded), its measured agreement, and the runtime it needs."""
    from bertforge.artifact import read_manifest
    from bertforge.report.hub_card import floor_of

    files = {}
    for path, variant in result.files.items():
        manifest = read_manifest(out / variant)
        spec = BY_NAME[variant]
        entry = report["variants"][variant]
        files[path] = {
            "variant": variant,
            "what": spec.summary,
            "recipe": manifest.get("recipe", {}).get(spec.section),
            "metadata": manifest.get("metadata", {}),
            "top1_agreement": entry["metrics"].get("top1_agreement"),
            "ref_top1_in_top5": entry["metrics"].get("ref_top1_in_top5"),
            "web": entry.get("web"),
            "needs": floor_of(out, report, variant).as_dict(),
        }
    return {"tool": "bertforge", "model": report["model"]["spec"], "quantized": result.quantized,
            "quantized_because": result.quantized_because, "files": files}
