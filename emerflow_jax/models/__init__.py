"""Flax backbones used as pure functions (DESIGN §6)."""
