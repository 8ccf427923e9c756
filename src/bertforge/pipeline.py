"""The pipeline: the stage table (read off stages.SPECS), the stage cache, lineage, the assembled output.

A stage never calls another stage; this module decides what runs, in which order, from which parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bertforge.artifact import (
    MANIFEST,
    Artifact,
    atomic_directory,
    link_or_copy_tree,
    make_read_only,
    owned_scratch,
    read_manifest,
    sha256_file,
    unlisted_files,
    verify_directory,
    write_json_atomic,
    write_manifest,
)
from bertforge.cache import cache_root, file_lock, shared_lock, stage_key, use_lock_path
from bertforge.code_digest import code_digest
from bertforge.crash_log import one_line
from bertforge.environment import cpu_class
from bertforge.errors import BertforgeError, EntryGone, ModelFileError, StageError, UsageError
from bertforge.exporter import export
from bertforge.json_files import read_json
from bertforge.memory import release_freed_memory
from bertforge.onnx_files import MODEL_DATA_FILE, external_data_above, model_bytes
from bertforge.progress import Progress, reporting
from bertforge.recipe import Recipe
from bertforge.remote_cache import session as remote_session
from bertforge.remote_cache.entries import Fetched
from bertforge.sources import ResolvedSource
from bertforge.stages import SPECS

# stage name -> its module, and variant -> (stage, parent variant or None for the source checkpoint,
# the recipe section configuring it): both read off stages.SPECS
STAGES: dict[str, ModuleType] = {}
VARIANT_PLAN: dict[str, tuple[str, str | None, str]] = {}
for _spec in SPECS:
    _module = importlib.import_module(f"bertforge.{_spec.stage}")
    STAGES[_module.NAME] = _module
    VARIANT_PLAN[_spec.name] = (_module.NAME, _spec.parent, _spec.section)
OUTPUT_MARKER = "build.json"


@dataclass
class StageRun:
    artifact: Artifact
    cached: bool
    seconds: float
    # why a cache entry under this key was not trusted and the stage ran again (None: it was fine or absent)
    rebuilt_because: str | None = None
    # what came from the remote cache, verified (None: the local cache had it, or it was built here)
    fetched: Fetched | None = None


@dataclass(frozen=True)
class Built:
    """A variant a task built (or found cached) somewhere else, for build_variants."""

    key: str
    cached: bool
    seconds: float
    rebuilt_because: str | None = None
    where: str = ""  # the node


@dataclass
class BuildState:
    source: ResolvedSource
    source_key: str = ""
    artifacts: dict[str, StageRun] = field(default_factory=dict)


# checkpoint path and its files' (name, size, mtime) -> its key: a process hashes a checkpoint once while
# its files stay as they are (a Ray worker checks it for every validation shard it runs)
_source_keys: dict[tuple[Any, ...], str] = {}


def source_artifact(source: ResolvedSource) -> Artifact:
    """The checkpoint as the root of the lineage; its key is the hash of its files' contents.

    Only the path inside the checkpoint is checked for a `.cache` folder (huggingface_hub's download
    metadata): the checkpoint itself usually lives under ~/.cache.
    """
    files = [p for p in sorted(source.path.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(source.path).parts]
    if not files:
        raise UsageError(f"{source.path} holds no files to build from")
    stamp = (str(source.path), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _source_keys:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(source.path).as_posix().encode())
            digest.update(sha256_file(path).encode())
        _source_keys[stamp] = digest.hexdigest()[:20]
    return Artifact(path=source.path, key=_source_keys[stamp], stage="source", parent=None)


def lineage_of(artifact: Artifact) -> list[dict[str, str]]:
    if artifact.stage == "source":
        return [{"stage": "source", "key": artifact.key}]
    return read_manifest(artifact.path)["lineage"]


def stage_inputs(stage: str, parent: Artifact, config: Any) -> dict[str, Any]:
    """What a stage reads besides its parent and config (file contents, measurements of this machine),
    from its module's optional `key_inputs(parent, config)`; the stage's `run` receives the same dict."""
    module = STAGES[stage]
    return module.key_inputs(parent, config) if hasattr(module, "key_inputs") else {}


def key_of_stage(stage: str, parent: Artifact, config: Any, inputs: dict[str, Any]) -> str:
    """Parent key, stage@VERSION, config, library versions (stage_key), the digest of the stage's code
    and every bertforge module it imports, and the inputs it declares; an int8 stage adds the CPU class
    (its plan, calibration and record of where it was built are this class's), and so does fusion at
    opt_level 99, whose layout optimizations onnxruntime fits to the CPU that saved the file."""
    module = STAGES[stage]
    extra = {"code": code_digest(module.__name__), "inputs": inputs, "external_data_above": external_data_above()}
    if module.NAME.startswith("int8") or getattr(config, "opt_level", None) == 99:
        extra["cpu_class"] = cpu_class()
    return stage_key(parent.key, module.NAME, module.VERSION, config.model_dump(mode="json"), extra=extra)


def run_stage(stage: str, parent: Artifact, config: Any, hold: contextlib.ExitStack | None = None) -> StageRun:
    """The stage's artifact from the cache when a complete, intact entry exists, else built now.

    A hit is verified against its manifest (every file present, same size and sha256); a damaged or
    partial entry is rebuilt under the same key, and the reason returned. `hold`: the build's stack, on
    which the entry's use lock is held (shared) until the build ends, so `cache prune` skips it.

    With a remote cache (remote_cache.session.using), a local miss is looked up there and, when found,
    fetched with every file verified; an entry this machine has and the remote lacks is published to it."""
    module = STAGES[stage]
    config_data = config.model_dump(mode="json")
    inputs = stage_inputs(stage, parent, config)
    key = key_of_stage(stage, parent, config, inputs)
    target = cache_root() / "stages" / f"{stage}-{key}"
    remote = remote_session.current()
    artifact = Artifact(path=target, key=key, stage=stage, parent=parent.key)
    with entry_lock(stage, key, hold):
        found = cached_entry(artifact)
        if isinstance(found, StageRun):
            return found
        start = time.monotonic()
        with atomic_directory(target) as tmp, owned_scratch(cache_root() / "tmp", f"{stage}-"):
            try:
                metadata = (module.run(parent.path, tmp, config, inputs) if hasattr(module, "key_inputs")
                            else module.run(parent.path, tmp, config))
            except ModelFileError as exc:  # a model this stage wrote or read from the cache: the build's fault
                raise StageError(f"stage {stage}: {exc}") from exc
            except BertforgeError:
                raise
            except Exception as exc:  # a library's error inside the stage: one line, exit 3, traceback logged
                raise StageError(one_line(f"stage {stage}", exc)) from exc
            seconds = time.monotonic() - start
            release_freed_memory()  # the stage's models are garbage now; the next stage starts from a low RSS
            write_manifest(tmp, key=key, stage=stage, stage_version=module.VERSION, parent=parent.key,
                           config=config_data, lineage=lineage_of(parent) + [{"stage": stage, "key": key}],
                           metadata=metadata, seconds=seconds)
            make_read_only(tmp)  # output directories hard-link these files
        if remote is not None:
            remote.share_stage(target)
        return StageRun(artifact, False, seconds, found)


@contextlib.contextmanager
def entry_lock(stage: str, key: str, hold: contextlib.ExitStack | None = None) -> Iterator[None]:
    """The entry's build lock; with `hold`, its use lock too, taken first and kept on that stack (prune
    cannot remove the entry from here on)."""
    if hold is not None:
        hold.enter_context(shared_lock(use_lock_path(f"{stage}-{key}")))
    with file_lock(cache_root() / "locks" / f"{stage}-{key}.lock"):
        yield


def cached_entry(artifact: Artifact) -> StageRun | str | None:
    """The entry under the artifact's key as a hit (verified locally, or fetched from the remote cache
    with every file verified); else why a local entry was not trusted (a string), or None: not there.
    Call under entry_lock."""
    target, stage, key = artifact.path, artifact.stage, artifact.key
    remote = remote_session.current()
    damaged = None
    if target.exists():
        problems = verify_directory(target)
        if not problems:  # its files are as listed: the listing must also be this entry's own
            named = read_manifest(target)
            if (named.get("stage"), named.get("key")) != (stage, key):
                problems = [f"its manifest names the entry {named.get('stage')}-{named.get('key')}"]
        if not problems:
            with contextlib.suppress(PermissionError):  # another user's entry in a shared cache
                os.utime(target)  # its last use, for `bertforge cache prune` (cache_admin.py)
            make_read_only(target)  # an entry written before entries were made read-only
            if remote is not None:
                remote.share_stage(target)
            return StageRun(artifact, True, 0.0)
        damaged = f"cache entry {target.name} failed verification ({problems[0]}" + (
            f", and {len(problems) - 1} more" if len(problems) > 1 else "") + "); rebuilt"
    start = time.monotonic()
    if remote is not None and (fetched := remote.fetch_stage(stage, key, target)) is not None:
        return StageRun(artifact, True, time.monotonic() - start, fetched=fetched)
    return damaged


def built_elsewhere(stage: str, key: str, parent: Artifact | None,
                    hold: contextlib.ExitStack | None = None) -> StageRun:
    """The entry another process built under `key` (a Ray task: ray_executor.py), taken from this
    machine's cache or the remote one, verified as any hit; its key is the builder's, not recomputed
    here, so a kernel-cost measurement (int8-auto's key input) is not repeated on this machine."""
    artifact = Artifact(path=cache_root() / "stages" / f"{stage}-{key}", key=key, stage=stage,
                        parent=parent.key if parent else None)
    with entry_lock(stage, key, hold):
        found = cached_entry(artifact)
    if not isinstance(found, StageRun):
        raise EntryGone(f"stage {stage}: the entry {stage}-{key} a Ray task built is neither in this machine's "
                         "cache nor in a remote cache" + (f" ({found})" if found else "") +
                         "; nodes on other machines share entries through --remote-cache")
    return found


def required_variants(requested: tuple[str, ...]) -> list[str]:
    needed: list[str] = []
    for variant in requested:
        chain = []
        while variant is not None:
            chain.append(variant)
            variant = VARIANT_PLAN[variant][1]
        for item in reversed(chain):
            if item not in needed:
                needed.append(item)
    return needed


def build_variants(recipe: Recipe, source: ResolvedSource, progress: Progress,
                   hold: contextlib.ExitStack | None = None,
                   elsewhere: Callable[[], dict[str, Built]] | None = None) -> BuildState:
    """Every variant the recipe needs, from the cache or built; with `hold`, each entry used stays
    locked against `cache prune` until that stack closes. `elsewhere`: builds them in other processes
    (the Ray executor) after the weights check and returns their keys and times; the entries are then
    taken by those keys."""
    state = BuildState(source)
    with progress.step("hash source") as info:
        root = source_artifact(source)
        state.source_key = root.key
        info["note"] = root.key
    with progress.step("check weights") as info:
        info["cached"] = check_weights_once(root)
    built = elsewhere() if elsewhere is not None else {}
    for variant in required_variants(recipe.variants):
        stage, parent_variant, section = VARIANT_PLAN[variant]
        parent = root if parent_variant is None else state.artifacts[parent_variant].artifact
        with progress.step(variant) as info, reporting(progress.update):
            run = None
            if variant in built:
                done = built[variant]
                try:
                    found = built_elsewhere(stage, done.key, parent, hold)
                    run = StageRun(found.artifact, done.cached, done.seconds, done.rebuilt_because, found.fetched)
                except EntryGone as gone:
                    # between the task's end (it held the entry) and this process taking the entry's use
                    # lock, a `cache prune` may have removed it: build it here rather than fail the build
                    progress.message(f"warning: {variant}: {gone}; building it in this process")
                    del built[variant]
            if run is None:
                run = run_stage(stage, parent, getattr(recipe, section), hold)
            info["cached"] = run.cached
            size = model_bytes(run.artifact.path) / 1e6
            info["note"] = f"{size:.1f} MB  key {run.artifact.key}" + (
                f"  fetched from the remote cache, {run.fetched.files} files verified" if run.fetched else "") + (
                f"  {'found' if run.cached else f'built in {run.seconds:.1f} s'} on {built[variant].where}"
                if variant in built and built[variant].where else "")
        if run.rebuilt_because:
            progress.message(f"warning: {variant}: {run.rebuilt_because}")
        state.artifacts[variant] = run
    return state


def check_weights_once(root: Artifact) -> bool:
    """export.check_weights before any stage, once per checkpoint content and check code (a warm build
    does not load the model again); returns whether an earlier check was reused."""
    import bertforge.results_cache as results_cache

    key = results_cache.key_for("weights-check", {"source": root.key, "code": code_digest(export.__name__)})
    if results_cache.load("weights-check", key) is not None:
        return True
    export.check_weights(root.path)
    results_cache.store("weights-check", key, {"checked": root.key})
    return False


# what bertforge writes into a build directory besides its variants (`bertforge sensitivity OUT` the last two)
REPORT_FILES = ("report.md", "report.html", "report.json", "sensitivity.json", "sensitivity.md")


def listed_variants(out: Path) -> list[str]:
    """The variants a build directory's build.json lists, each a registry name: data read from a build
    never names a path (a listed '../elsewhere' would steer reads and writes out of the build)."""
    from bertforge.stages import BY_NAME

    listed = read_json(out / OUTPUT_MARKER).get("variants")
    if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
        raise UsageError(f"{out / OUTPUT_MARKER}: 'variants' is not a list of variant names")
    strange = [v for v in listed if v not in BY_NAME]
    if strange:
        raise UsageError(f"{out / OUTPUT_MARKER} lists {strange[0]!r}, which is no bertforge variant; "
                         "the file was edited or is not bertforge's")
    check_own_directories(out, listed)
    return listed


def check_own_directories(out: Path, names: list[str]) -> None:
    """Each variant directory named in `out` is the build's own: no link, nothing resolving outside it
    (validate rewrites their cards and manifests)."""
    for name in names:
        if (out / name).is_symlink() or not (out / name).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"{out / name} is a symbolic link or lies outside {out}; a build's variant "
                             "directories are its own")


def recorded_recipe(out: Path) -> dict[str, Any] | None:
    """The recipe a build directory's build.json records (None: no build.json), for `validate`."""
    marker = out / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text("utf-8"))["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{marker}: not a bertforge build.json ({type(exc).__name__}: {exc})") from None


def foreign_files(out: Path) -> list[str]:
    """The files in a build directory bertforge did not write: beside its own at the top, and inside each
    variant directory those its manifest does not list (a rebuild replaces the whole tree)."""
    if not (out / OUTPUT_MARKER).is_file():
        return sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    variants = listed_variants(out)
    ours = {OUTPUT_MARKER, *REPORT_FILES, *variants}
    theirs = sorted(p.name for p in out.iterdir() if p.name not in ours)
    for name in variants:
        folder = out / name
        if folder.is_dir() and (folder / MANIFEST).is_file():
            theirs += [f"{name}/{rel}" for rel in unlisted_files(folder)]
        elif folder.exists():
            theirs.append(f"{name}/ (no manifest.json)")
    return theirs


def check_output_dir(out: Path, what: str = "output") -> None:
    """Refuse to replace a directory bertforge did not write, or one holding files it did not write
    (they would be lost with the old build, its variant directories included), a symbolic link (the
    link would be replaced, not what it points to), or the directory the command runs in."""
    if out.is_symlink():
        raise UsageError(f"{what} {out} is a symbolic link; name the directory it points to ({out.resolve()})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file())):
        raise UsageError(f"{what} {out} exists and is not a bertforge output directory; choose another --out "
                         "or remove it")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UsageError(f"{what} {out} is the current directory or holds it; choose another --out")
    if out.is_dir() and (out / OUTPUT_MARKER).is_file():
        theirs = foreign_files(out)
        if theirs:
            raise UsageError(f"{what} {out} holds files bertforge did not write ({', '.join(theirs[:3])}"
                             f"{', ...' if len(theirs) > 3 else ''}); a rebuild would replace them: move them or "
                             "choose another --out")


def assemble_variant(run: StageRun, dest: Path, recipe: Recipe) -> dict[str, int]:
    """The variant's directory under the output: its files hard-linked from the cache entry (copied where
    the filesystem will not link), its own manifest.json with the recipe added."""
    # onnx.load refuses external data with more than one link ("potential hardlink attack", onnx 1.23),
    # so a model's external data is copied; everything else is linked
    counts = link_or_copy_tree(run.artifact.path, dest, skip=(MANIFEST,), copy=(MODEL_DATA_FILE,))
    manifest = read_manifest(run.artifact.path)
    manifest["recipe"] = recipe.model_dump(mode="json")
    write_json_atomic(dest / MANIFEST, manifest)
    return counts


def write_marker(out: Path, recipe: Recipe, source: ResolvedSource, variants: list[str]) -> None:
    recorded = recipe.model_dump(mode="json")
    if source.kind == "local":  # `validate` reads the model from here, from whatever directory it runs in
        recorded["model"] = str(source.path)  # resolved by check_checkpoint
    write_json_atomic(out / OUTPUT_MARKER, {"tool": "bertforge", "model": source.spec,
                                            "checkpoint": str(source.path), "variants": variants,
                                            "recipe": recorded})
