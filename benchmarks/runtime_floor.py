"""Which onnxruntime releases run each variant of a build: the measurement behind runtime_floor.py.

    python benchmarks/runtime_floor.py OUT WHEEL_OR_VERSION... [--json FILE]

For each onnxruntime given (a wheel file or a version to install), a virtual environment of its own
(numpy < 2 for releases before 1.19, which were built against numpy 1), then every variant of the
build OUT is loaded and run on one sentence there; a variant that fails prints the runtime's first
error line. The table is printed and, with --json, written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

PROBE = r"""
import json, sys
import numpy as np
import onnxruntime as ort
out = {}
ids = np.array([json.loads(sys.argv[2])], dtype=np.int64)
for variant in sys.argv[3:]:
    path = f"{sys.argv[1]}/{variant}/model.onnx"
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
        out[variant] = "ok"
    except Exception as exc:
        out[variant] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
print(json.dumps({"onnxruntime": ort.__version__, "results": out}))
"""


def version_of(spec: str) -> str:
    return Path(spec).name.split("-")[1] if spec.endswith(".whl") else spec


def probe_ids(out: Path, variant: str) -> list[int]:
    """The probe sentence as the build's own tokenizer encodes it (its vocabulary's ids, not bert-base's)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / variant / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer.encode("The capital of France is [MASK].").ids


def probe(out: Path, variants: list[str], spec: str, work: Path) -> dict:
    env_dir = work / f"ort-{version_of(spec)}"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    old = tuple(int(x) for x in version_of(spec).split(".")[:2]) < (1, 19)
    packages = [spec if spec.endswith(".whl") else f"onnxruntime=={spec}", "numpy<2" if old else "numpy"]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    run = subprocess.run([str(python), "-c", PROBE, str(out), json.dumps(probe_ids(out, variants[0])), *variants],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a bertforge build directory")
    parser.add_argument("runtimes", nargs="+", help="onnxruntime wheel files or versions")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    variants = json.loads((args.out / "build.json").read_text())["variants"]
    with tempfile.TemporaryDirectory() as work:
        table = [probe(args.out, variants, spec, Path(work)) for spec in args.runtimes]
    print("variant".ljust(22) + "".join(row["onnxruntime"].ljust(10) for row in table))
    for variant in variants:
        print(variant.ljust(22) + "".join(("ok" if row["results"][variant] == "ok" else "FAILS").ljust(10)
                                          for row in table))
    for row in table:
        for variant, result in row["results"].items():
            if result != "ok":
                print(f"{row['onnxruntime']} {variant}: {result}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
