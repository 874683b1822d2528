"""One key for everything cached, and safe publishing of what is cached.

Every artifact a run keeps on disk (a pretrained backbone, an alignment, a
meta-trained rule, a per-seed result, a sweep trial) lives under a name that
is a hash of exactly the config sections it depends on, plus the code's
``FORMAT_VERSION`` and whatever else it was computed from (a seed, the key of
the backbone it was built on).  A rerun with a changed config therefore finds
what is still valid under the same name and recomputes the rest under a new
one: nothing stale is ever read back.

Concurrent runs that share a cache (sweep workers, a compare grid, several
hosts on a shared file system) serialise on an advisory file lock per artifact
(``locked``); the JSON/npz writers publish by rename, so a reader sees either
nothing or a whole file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Iterator, Sequence

import ml_collections

# Bump when the layout or meaning of a cached artifact changes: every key
# changes with it, so old artifacts are never mistaken for new ones.
FORMAT_VERSION = 3

# Fields that locate files but do not change what is computed.
PATH_FIELDS = (("data", "dir"), ("data", "download"), ("optim", "cache_dir"),
               ("enrich", "cache_dir"))
# Fields that set how often a stage checkpoints: a resumed run is bit-exact
# whichever checkpoint it resumes from, so they change nothing computed either.
CADENCE_FIELDS = (("optim", "ckpt_every_s"),)
# Left out of every key and of every config comparison.
UNKEYED_FIELDS = PATH_FIELDS + CADENCE_FIELDS


def _plain(config: ml_collections.ConfigDict | dict) -> dict:
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str))


def select(config: ml_collections.ConfigDict | dict,
           sections: Sequence[str]) -> dict[str, Any]:
  """The named top-level sections (or fields) of ``config``, without ``UNKEYED_FIELDS``.

  Args:
    config: a run config.
    sections: top-level names, e.g. ("data", "model", "optim", "backbone").

  Returns:
    {name: plain JSON value}; a name the config lacks maps to None.
  """
  d = _plain(config)
  out = {s: d.get(s) for s in sorted(set(sections))}
  for section, field in UNKEYED_FIELDS:
    if isinstance(out.get(section), dict):
      out[section].pop(field, None)
  return out


def key(config: ml_collections.ConfigDict | dict, sections: Sequence[str],
        **extra: Any) -> str:
  """A 12-hex-digit hash of ``sections`` of ``config``, ``extra`` and the format.

  Args:
    config: a run config.
    sections: the top-level config sections the artifact depends on.
    **extra: anything else it depends on (seed, parent artifact keys, ...).

  Returns:
    The key, stable across processes and machines.
  """
  blob = json.dumps({"v": FORMAT_VERSION, "config": select(config, sections),
                     "extra": extra}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def restrict(config: ml_collections.ConfigDict,
             sections: Sequence[str]) -> ml_collections.ConfigDict:
  """A locked copy of ``config`` holding only ``sections``.

  A method sees only the sections its cache keys cover, so reading an
  undeclared section fails loudly instead of silently escaping the key.

  Args:
    config: a run config.
    sections: the top-level sections to keep; those absent from ``config``
      are skipped.

  Returns:
    A new locked ConfigDict with just those sections.
  """
  d = config.to_dict()
  return ml_collections.ConfigDict({s: d[s] for s in sections if s in d}).lock()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive advisory lock on ``<path>.lock`` (blocks until free).

  Two processes that need the same artifact at the same moment: the first
  builds it while the second waits, then the second finds it complete.
  The processes of one multi-process JAX system build it together (their
  collectives would deadlock on one lock), so each takes its own lock.
  """
  suffix = ".lock"
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized():
    suffix = f".p{jax.process_index()}.lock"
  lock = pathlib.Path(os.fspath(path) + suffix)
  lock.parent.mkdir(parents=True, exist_ok=True)
  with open(lock, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
