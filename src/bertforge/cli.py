"""bertforge's command line: parse, call the API, set the exit code.

Exit codes: 0 success; 1 a validation gate failed (or `compare` found a regression, or `verify`
found a changed file); 2 usage or configuration error; 3 a build step failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from bertforge.commands import (
    cmd_bench,
    cmd_build,
    cmd_cache,
    cmd_compare,
    cmd_fill_mask,
    cmd_inspect,
    cmd_package,
    cmd_resolve,
    cmd_sensitivity,
    cmd_validate,
    cmd_verify,
)
from bertforge.cpu_target import TARGETS
from bertforge.errors import EXIT_BUILD_FAILED, EXIT_USAGE, BertforgeError
from bertforge.executor import EXECUTORS
from bertforge.progress import MODES
from bertforge.stages import SPECS, VARIANTS
from bertforge.version import __version__

EPILOG = "exit codes: 0 ok, 1 a gate failed / regression / verify mismatch, 2 usage or config error, 3 build failed"


def at_least_one(text: str) -> int:
    """A count flag's value: an integer of 1 or more (argparse names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bertforge", description="Turn a BERT masked-LM into validated ONNX "
                                  "artifacts: export, fusion, fp16, int8; parity and top-k agreement at [MASK] "
                                  "positions, gated; one comparison report.", epilog=EPILOG)
    top.add_argument("--version", action="version", version=f"bertforge {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def progress_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--progress", choices=MODES, default="auto",
                       help="live status (bar), one line per step (plain), JSON lines for CI logs (jsonl)")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and gate failures")

    def recipe_flags(p: argparse.ArgumentParser, variants: bool = True) -> None:
        p.add_argument("--recipe", help="YAML recipe (configs/*.yaml); flags below override its fields")
        p.add_argument("--model", help="model spec: a hub id (default bert-base-uncased), a local checkpoint "
                       "directory, 'demo' (offline real weights) or 'synthetic:bert-base-uncased'")
        if variants:  # validate checks every variant its build lists
            p.add_argument("--variants", help="comma-separated subset of " + ",".join(VARIANTS) + "; extra: "
                           + ", ".join(f"{s.name} ({s.summary})" for s in SPECS if s.extra))
        p.add_argument("--corpus", help="validation sentences: 'builtin' or a UTF-8 text file, one a line")
        p.add_argument("--max-sentences", type=at_least_one, help="validate on the first N sentences only")
        p.add_argument("--no-latency", action="store_true", help="skip the latency measurement in the report")

    def remote_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--remote-cache", metavar="URL",
                       help="a stage cache shared through object storage, any fsspec URL (s3://bucket/prefix, "
                       "gs://..., file:///shared/dir); default $BERTFORGE_REMOTE_CACHE. Entries are fetched with "
                       "every file verified, and published; credentials come from the storage library's own "
                       "sources (for S3 the AWS_* variables and ~/.aws)")
        p.add_argument("--remote-cache-readonly", action="store_true", default=None,
                       help="fetch and verify from the remote cache, never write to it (untrusted jobs such as "
                       "pull requests from forks); also $BERTFORGE_REMOTE_CACHE_READONLY=1")

    def executor_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--executor", choices=EXECUTORS, default=os.environ.get("BERTFORGE_EXECUTOR") or "local",
                       help="where the work runs: local (default, this process) or ray (stages, validation shards "
                       "and latency as Ray tasks; pip install 'bertforge[ray]'); also $BERTFORGE_EXECUTOR")
        p.add_argument("--ray-address", metavar="HOST:PORT",
                       help="with --executor ray: the Ray cluster to join (default $RAY_ADDRESS; with neither, a "
                       "local Ray instance is started for this command)")

    build = sub.add_parser("build", help="export, optimize, validate and report", epilog=EPILOG,
                           description="Build every variant of a model, validate each against PyTorch at "
                           "[MASK] positions, write OUT/<variant>/ and OUT/report.{md,html,json}.")
    recipe_flags(build)
    build.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    build.add_argument("--target", choices=TARGETS,
                       help="int8 target: portable (default; the same integers on every CPU) or vnni (full-range "
                       "weights, exact on VNNI/AMX/ARM64 only)")
    remote_flags(build)
    executor_flags(build)
    progress_flags(build)
    build.set_defaults(func=cmd_build)

    validate = sub.add_parser("validate", help="re-validate an existing build directory", epilog=EPILOG,
                              description="Re-run validation and gates on DIR's variants; rewrites its report. "
                              "Uses the recipe recorded in DIR/build.json unless --recipe is given.")
    validate.add_argument("dir", help="a directory written by bertforge build")
    validate.add_argument("--runtime", choices=("native", "web"), default="native",
                          help="web: also run every variant on onnxruntime-web (wasm, in Node; installed with npm "
                          "into the cache on first use) and report where its top-1 differs from native "
                          "onnxruntime's (report.json's `web`, each card; `bertforge package` reads it)")
    recipe_flags(validate, variants=False)
    remote_flags(validate)
    executor_flags(validate)
    progress_flags(validate)
    validate.set_defaults(func=cmd_validate)

    res = sub.add_parser("resolve", help="print the local checkpoint directory a model spec resolves to",
                         description="Resolve SPEC (hub id, directory, demo, synthetic:NAME) to a "
                         "local Hugging Face checkpoint; the last line printed is its path.")
    res.add_argument("spec", nargs="?")
    res.add_argument("--list", action="store_true", help="name the offline models (demo and synthetic:NAME)")
    res.set_defaults(func=cmd_resolve)

    ins = sub.add_parser("inspect", help="op histogram, precision mix, fused ops, opset, size of a model")
    ins.add_argument("dir", help="a variant directory or a model.onnx file")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    pkg = sub.add_parser("package", help="a build as a model repository for a hub, transformers.js and optimum",
                         description="Copy a build into DEST laid out as a model hub repository: config and "
                         "tokenizer at the root, onnx/model.onnx (fp32), onnx/model_fp16.onnx, "
                         "onnx/model_quantized.onnx (the int8 variant to ship) and onnx/model_<variant>.onnx, a "
                         "README.md card with hub metadata and quantize_config.json. transformers.js, optimum and "
                         "onnxruntime load it unchanged; nothing is uploaded.", epilog=EPILOG)
    pkg.add_argument("dir", help="a directory written by bertforge build")
    pkg.add_argument("dest", help="the repository folder to write (replaced in one step when complete)")
    pkg.add_argument("--variants", help="comma-separated subset of the build's variants (default: all)")
    pkg.add_argument("--int8-target", type=float, default=0.95, metavar="TOP1",
                     help="model_quantized.onnx is the fastest int8 variant whose gates passed with top-1 agreement "
                     ">= this (default 0.95)")
    pkg.set_defaults(func=cmd_package)

    ver = sub.add_parser("verify", help="check files against manifest.json (a variant or a build directory)")
    ver.add_argument("dir")
    ver.set_defaults(func=cmd_verify)

    cmp_ = sub.add_parser("compare", help="two builds side by side; exit 1 when B regresses",
                          description="Variant by variant: size, latency and every metric of RUN_A and RUN_B "
                          "with deltas. Exits 1 when B regresses beyond the tolerances or lacks a variant of A; "
                          "exits 2 when the two reports are of different models, corpora or schemas.")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--json", action="store_true", help="machine-readable output")
    cmp_.add_argument("--agreement-tolerance", type=float, default=0.005,
                      help="allowed absolute drop of top-1/top-5 agreement and cosine (default 0.005)")
    cmp_.add_argument("--latency-tolerance", type=float, default=0.25,
                      help="allowed relative increase of p50 latency (default 0.25)")
    cmp_.add_argument("--allow-different", action="store_true",
                      help="compare reports of different models, corpora or schemas anyway (named in the output)")
    cmp_.set_defaults(func=cmd_compare)

    sen = sub.add_parser("sensitivity", help="per-group INT8 sensitivity of a build (KL, top-1, ms per scheme)",
                         description="Quantize each group (per layer: QKV, attention output, FFN up, FFN down; the "
                         "head's transform; the tied embedding table) alone under each int8 scheme (int8-dynamic, "
                         "int8-smooth, int8-token, int8-outlier, int8-blockwise); "
                         "compare with the fp32 graph at [MASK] positions of a calibration split (not the "
                         "validation corpus); time each group per scheme. Writes DIR/sensitivity.{json,md}.")
    sen.add_argument("dir", help="a build directory with an fp32 variant, or an fp32 variant directory")
    sen.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=16,
                     help="int8-blockwise block size (default 16)")
    sen.add_argument("--corpus", default="calibration",
                     help="calibration sentences: 'calibration' (default, the built-in calibration set) or a "
                     "UTF-8 text file, one a line")
    sen.add_argument("--json", action="store_true")
    progress_flags(sen)
    sen.set_defaults(func=cmd_sensitivity)

    ben = sub.add_parser("bench", help="latency p50/p90, throughput, peak RSS and size of variants",
                         description="Batch 1 and 8 x sequence 128 and 32, threads = physical cores, onnxruntime's "
                         "default (spinning) thread pools; variants timed in turns of 2 untimed and 5 "
                         "timed calls.")
    ben.add_argument("dir", help="a build directory or one variant directory")
    ben.add_argument("--repeats", type=int, default=20)
    ben.add_argument("--warmup", type=int, default=3)
    ben.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    ben.add_argument("--json", action="store_true")
    progress_flags(ben)
    ben.set_defaults(func=cmd_bench)

    fil = sub.add_parser("fill-mask", help="top-k predictions at each [MASK] of a text, from one variant",
                         description="Fill-mask from a variant directory with onnxruntime and tokenizers only "
                         "(no torch): score, token, token_str and sequence, as optimum's fill-mask pipeline "
                         "gives them. Any variant, int8-dynamic-masked included.")
    fil.add_argument("dir", help="a variant directory, e.g. out/demo/int8-dynamic")
    fil.add_argument("text", help="a sentence with one or more [MASK]")
    fil.add_argument("--top-k", type=at_least_one, default=5, help="predictions per [MASK] (default 5)")
    fil.add_argument("--json", action="store_true", help="a JSON list per [MASK], the pipeline's fields")
    fil.set_defaults(func=cmd_fill_mask)

    cac = sub.add_parser("cache", help="list, prune or verify the stage cache (local, or remote with --remote-cache)",
                         description="Entries of $BERTFORGE_CACHE/stages (or of the remote cache at --remote-cache "
                         "URL) with their size and last use (a cache hit counts as a use). prune removes entries "
                         "unused for --older-than DAYS, then the least recently used until the rest fit in "
                         "--max-size GB; an entry a local build holds is skipped, and a remote entry's blobs go "
                         "once no entry names them. verify rehashes every file of every entry: exit 1 when one "
                         "is damaged.")
    cac.add_argument("action", choices=("list", "prune", "verify"))
    cac.add_argument("--remote-cache", metavar="URL",
                     help="act on this remote cache (an fsspec URL), not the local one")
    cac.add_argument("--older-than", type=float, metavar="DAYS", help="prune: entries unused for this many days")
    cac.add_argument("--max-size", type=float, metavar="GB", help="prune: keep at most this many GB of entries")
    cac.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    cac.add_argument("--json", action="store_true")
    cac.set_defaults(func=cmd_cache)
    return top


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, a container stopped), unwound like Ctrl-C so nothing half-written stays."""


# set by the handler: a library that catches the Terminated it raised and raises its own error instead
# (a C extension importing at that moment gives "ImportError: initialization failed") must still end
# the run as terminated, not as a failed build
_sigterm_received = False


def _on_sigterm(signum, frame) -> None:
    global _sigterm_received
    _sigterm_received = True
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from bertforge.crash_log import one_line

    global _sigterm_received
    _sigterm_received = False
    args = parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is handled below, not at interpreter exit
        return code
    except Terminated:
        return _terminated()
    except BertforgeError as exc:
        if _sigterm_received:
            return _terminated()
        print(f"bertforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bertforge: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`bertforge compare --json | head`): exit as a tool killed by SIGPIPE
        # would, without a traceback, and with stdout on /dev/null so the exit-time flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:  # not a gate failure: exit 3, one line, the traceback in a log file
        if _sigterm_received:
            return _terminated()
        print(f"bertforge: error: {one_line(args.command, exc)}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated() -> int:
    import signal

    print("bertforge: terminated (SIGTERM); nothing half-written was kept", file=sys.stderr)
    return 128 + signal.SIGTERM


def main_entry() -> None:
    try:
        sys.exit(main())
    except SystemExit as exc:  # argparse exits 2 on usage errors, which is our usage code too
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        sys.exit(code)
