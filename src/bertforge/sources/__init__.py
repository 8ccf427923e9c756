"""Where weights come from: a model spec resolves to a checked local checkpoint directory (spec.py);
checkpoint.py checks one, hub.py fetches one, demo.py and synthetic.py make the offline ones."""

from bertforge.sources.spec import DEFAULT_MODEL, ResolvedSource, resolve

__all__ = ["DEFAULT_MODEL", "ResolvedSource", "resolve"]
