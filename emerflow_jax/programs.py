"""Compiled programs that outlive one call, and their release after each run.

Jitted programs are cached so that the seeds of a run trace them once
(``cached``: an ``lru_cache`` whose entries hold ``jax.jit`` functions).  A
process that runs many runs (a grid, a tuning study) would keep every
program of every run: on Linux each compiled XLA:CPU program holds memory
maps, and after a few hundred runs a grid process hit the kernel's map limit
(``vm.max_map_count``) and aborted ("LLVM compilation error: Cannot allocate
memory").  ``release`` drops them all (ours and JAX's own caches);
``train.train_and_evaluate`` calls it when a run ends, so a run's seeds share
programs and runs do not.  The persistent compilation cache on disk is not
touched: the next run reloads from it instead of compiling.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

_CACHES: list[Any] = []


def cached(maxsize: int | None = None) -> Callable[[Callable[..., Any]], Any]:
  """``functools.lru_cache(maxsize)`` whose entries ``release`` drops."""
  def wrap(fn):
    c = functools.lru_cache(maxsize=maxsize)(fn)
    _CACHES.append(c)
    return c
  return wrap


def release() -> None:
  """Drops every cached program: the ``cached`` functions' and JAX's caches."""
  for c in _CACHES:
    c.cache_clear()
  jax.clear_caches()
