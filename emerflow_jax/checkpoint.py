"""All checkpointing, around Orbax ``CheckpointManager``.

A train state is one pytree ``{"params", "opt_state", "step", "rng"}`` (any
pytree of arrays works).  Workdir paths are made absolute; saving waits for the
write to finish so that a killed process never leaves a step that looks
complete but is not (Orbax writes to a temporary directory and renames it).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from emerflow_jax import sharding


class Checkpointer:
  """Saves and restores one pytree under ``directory``, keeping the last few.

  Usage::

    ckpt = Checkpointer(workdir / "backbone")
    state, start = ckpt.restore_or(state)    # resumes from the latest step
    ...
    ckpt.save(step, state)
    ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, force: bool = True) -> None:
    """Writes ``state`` as ``step`` and blocks until it is on disk.

    Args:
      step: the step number to save under (made an int).
      state: the pytree of arrays to save.
      force: save even when Orbax's save policy would skip this step.
    """
    state = _global_if_multiprocess(state)
    self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)
    self._manager.wait_until_finished()

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Restores the given (or latest) step into the structure of ``template``.

    Args:
      template: a pytree with the saved state's structure, shapes and dtypes.
      step: the step to restore; None restores the latest.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: when nothing is saved under ``directory``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    local = jax.tree.map(_is_local, template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            _global_if_multiprocess(template))
    out = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if jax.process_count() == 1:
      return out
    # Back to this process's own copy where the caller gave a local array.
    return jax.tree.map(lambda x, loc: x.addressable_data(0) if loc else x, out, local)

  def restore_or(self, template: Any) -> tuple[Any, int | None]:
    """Returns (latest state, its step) or (template, None) if nothing saved."""
    step = self.latest_step()
    if step is None:
      return template, None
    return self.restore(template, step), step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_local(x: Any) -> bool:
  return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def _global_if_multiprocess(state: Any) -> Any:
  """Host-local leaves -> arrays replicated over every process's devices.

  Orbax writes only global arrays when several processes save together.  A
  host-local leaf (a stage trained on one device per process) holds the same
  value on every process (same data, seeds and program), so process 0's copy
  is the one written.
  """
  if jax.process_count() == 1:
    return state
  mesh = sharding.task_mesh()
  return jax.tree.map(lambda x: sharding.replicate(x, mesh) if _is_local(x) else x,
                      state)


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Atomically writes a small .npz of results (rename after a full write).

  Args:
    path: the .npz file written.
    **arrays: named arrays to store.
  """
  path = os.fspath(path)
  tmp = f"{path}.{uuid.uuid4().hex}.tmp.npz"  # own name: see results.write_json_atomic
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
  """Reads a .npz written by save_arrays, or None if it does not exist."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}
