"""Cold build of every synthetic BERT-family member, one at a time: wall time, peak RSS, sizes, gates.

Each member is built by `bertforge build` in its own process, from an empty cache (the synthetic
checkpoint is made in that cache too), with the standard variants, validation and latency. The
process's peak resident set comes from the kernel's accounting for that child (os.wait4), its
stage times from the build's own JSON-lines progress. Writes benchmarks/FAMILY.md and
benchmarks/family.json from what it measured; a regression in generality or memory shows up as a
changed row.

    python benchmarks/family.py [--members bert-base-uncased,bert-large-cased] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertforge import __version__
from bertforge.environment import library_versions, machine_info
from bertforge.sources.synthetic import FAMILY, PREFIX

ROOT = Path(__file__).resolve().parent.parent
STANDARD = "fp32,fused,fp16,int8-dynamic,int8-static"


def log(text: str) -> None:
    print(f"[family {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def build_member(name: str, variants: str, workdir: Path) -> dict:
    """One cold build in a child process; its exit code, wall time, peak RSS and report."""
    cache, out, events = workdir / "cache", workdir / "out", workdir / "progress.jsonl"
    env = {**os.environ, "BERTFORGE_CACHE": str(cache)}
    command = [sys.executable, "-m", "bertforge", "build", "--model", PREFIX + name, "--variants", variants,
               "--out", str(out), "--progress", "jsonl"]
    start = time.monotonic()
    with open(events, "w", encoding="utf-8") as sink:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    steps = {}
    for line in events.read_text("utf-8").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "step_end":
                steps[event["step"]] = round(event["seconds"], 1)
    row = {"member": name, "exit": child.returncode, "wall_s": round(seconds, 1),
           "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # Linux reports KiB
           "steps_s": steps}
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text("utf-8"))
        row["gates_passed"] = report["gates_passed"]
        row["masked_positions"] = report["corpus"]["masked_positions"]
        row["variants"] = {
            variant: {"mb": round(entry["size_bytes"] / 1e6, 1), "passed": entry["passed"],
                      "top1": entry["metrics"].get("top1_agreement"),
                      "p50_ms": entry["latency"].get("p50_ms")}
            for variant, entry in report["variants"].items()}
    else:
        row["error"] = events.read_text("utf-8").strip().splitlines()[-1:]
    return row


def render(results: dict) -> str:
    variants = results["variants"].split(",")
    machine = results["machine"]
    lines = [
        "# BERT family: cold builds on this machine",
        "",
        "Written by `benchmarks/family.py` from its own measurements; do not edit by hand.",
        "",
        f"Machine: {machine['cpu']}; {machine['physical_cores']} physical cores; "
        f"{results['memory_gb']} GB RAM. bertforge {results['bertforge']} (commit at the start: {results['commit']}); "
        f"onnxruntime {results['libraries']['onnxruntime']}, torch {results['libraries']['torch']}. "
        f"Variants: {', '.join(variants)}. Each member: `bertforge build --model synthetic:NAME` from an empty "
        "cache (the checkpoint made in it), validation on the built-in corpus and latency included, one build "
        "at a time. Peak RSS: the build process's maximum resident set (kernel accounting). Weights are "
        "seeded random (bert-base-uncased's real vocabulary where the member is uncased, a derived vocabulary "
        "of the right size otherwise): agreement numbers measure numerical fidelity only.",
        "",
        "| member | layers × hidden, vocab | commit | exit | gates | wall s | peak RSS GB | validate s | "
        + " | ".join(f"{v} MB" for v in variants) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(variants),
    ]
    for row in results["members"]:
        member = FAMILY[row["member"]]
        shape = f"{member.layers} × {member.hidden}, {member.vocab_size:,}"
        sizes = [f"{row['variants'][v]['mb']:.1f}" if v in row.get("variants", {}) else "-" for v in variants]
        gates = "pass" if row.get("gates_passed") else ("fail" if "gates_passed" in row else "-")
        validate = row["steps_s"].get("validate", 0)
        lines.append(f"| {row['member']} | {shape} | {row.get('commit', '-')} | {row['exit']} | {gates} | "
                     f"{row['wall_s']:.0f} | "
                     f"{row['peak_rss_gb']:.2f} | {validate:.0f} | " + " | ".join(sizes) + " |")
    lines += ["", "Stage times (s):", ""]
    for row in results["members"]:
        steps = ", ".join(f"{step} {s}" for step, s in row["steps_s"].items() if s >= 1)
        lines.append(f"- {row['member']}: {steps}")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when the tracked files differ from it."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT).returncode != 0
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default=",".join(FAMILY), help="comma-separated synthetic names")
    parser.add_argument("--variants", default=STANDARD)
    parser.add_argument("--workdir", type=Path, default=None, help="where the caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    members = [m for m in args.members.split(",") if m]
    unknown = [m for m in members if m not in FAMILY]
    if unknown:
        print(f"family.py: unknown members {unknown}; known: {', '.join(FAMILY)}", file=sys.stderr)
        return 2
    import psutil

    results = {"bertforge": __version__, "commit": git_commit(), "machine": machine_info(),
               "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "libraries": library_versions(),
               "variants": args.variants, "members": []}
    for name in members:
        log(f"{name}: building {args.variants}")
        commit = git_commit()  # per member: the builds run the working tree, which may move during a long run
        workdir = Path(tempfile.mkdtemp(prefix=f"bertforge-family-{name}-", dir=args.workdir))
        try:
            row = build_member(name, args.variants, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # a bert-large build leaves ~9 GB
        row["commit"] = commit
        log(f"{name}: exit {row['exit']}, {row['wall_s']} s, peak RSS {row['peak_rss_gb']} GB")
        results["members"].append(row)
        # written after every member, so a long run that is stopped keeps what it measured
        (args.out / "family.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (args.out / "FAMILY.md").write_text(render(results), encoding="utf-8")
    return 0 if all(row["exit"] == 0 for row in results["members"]) else 1


if __name__ == "__main__":
    sys.exit(main())
