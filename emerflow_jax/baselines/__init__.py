"""Baselines on the shared harness, one file per method (DESIGN §5)."""
