"""Keeps experiment logs readable: progress lines, not checkpoint-library chatter."""

from __future__ import annotations

import logging

_NOISY = ("orbax", "tensorstore", "jax/_src")


class _DropNoisy(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return not any(f"/{n}" in path for n in _NOISY)


def quiet_third_party() -> None:
  """Drops INFO lines that Orbax and friends log through absl."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropNoisy())
  logging.getLogger("absl").addFilter(_DropNoisy())
