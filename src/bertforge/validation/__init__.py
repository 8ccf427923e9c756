"""Validation against the PyTorch reference at the [MASK] positions of real text."""
