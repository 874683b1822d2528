"""Data parallelism over item tasks: one mesh axis, "tasks" (DESIGN §4, Scaling).

Meta-training tasks and warm-up items are independent given the (small,
replicated) meta parameters and the frozen backbone, so the only axis worth
sharding is the task/item axis.  Everything else is replicated::

    mesh = sharding.task_mesh()                      # all devices, axis "tasks"
    batch = sharding.shard_tasks(batch, mesh)        # [B, ...] split over devices
    frozen = sharding.replicate(frozen, mesh)        # a full copy on every device

The same code runs on one device (a trivial mesh), on N CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), on a GPU, and on
several hosts after ``jax.distributed.initialize()``
(``maybe_initialize_distributed``, which the binaries call): there
``jax.devices()`` lists every host's devices, every process builds the same
global batch from the same seed, and ``jax.make_array_from_callback`` keeps
only the shards of its own devices (docs/scaling.md).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TASK_AXIS = "tasks"


# The coordinator settings, as environment variables (docs/scaling.md).
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def maybe_initialize_distributed(env: Mapping[str, str] | None = None,
                                 timeout_s: int = 300, refuse: str = "") -> bool:
  """Joins this process to a multi-process JAX system when asked to.

  Every process of the system runs the same command with the same config and
  ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
  ``JAX_NUM_PROCESSES`` and its own ``JAX_PROCESS_ID`` (0 ... N-1) in its
  environment.  None of them set: a single process, nothing to do.  Call it
  first in a binary's ``main``, before anything touches a JAX device.

  Args:
    env: the settings (default: ``os.environ``).
    timeout_s: how long to wait for every process to join.
    refuse: non-empty: why this command cannot run as several JAX processes
      (it is raised when the settings ask for more than one).

  Returns:
    True when this process is now part of a multi-process system.

  Raises:
    ValueError: some settings but not all are given, they are malformed, or
      ``refuse`` is set and more than one process is asked for.
  """
  env = os.environ if env is None else env
  names = (ENV_ADDRESS, ENV_PROCESSES, ENV_PROCESS_ID)
  given = {k: env.get(k, "") for k in names}
  if not any(given.values()):
    return False
  missing = [k for k, v in given.items() if not v]
  if missing:
    raise ValueError(f"multi-process JAX needs {', '.join(names)}; missing "
                     f"{', '.join(missing)}")
  try:
    n, i = int(given[ENV_PROCESSES]), int(given[ENV_PROCESS_ID])
  except ValueError as e:
    raise ValueError(f"{ENV_PROCESSES} and {ENV_PROCESS_ID} must be integers: "
                     f"{given}") from e
  if not 0 <= i < n:
    raise ValueError(f"{ENV_PROCESS_ID}={i} is not in [0, {ENV_PROCESSES}={n})")
  if n == 1:
    return False
  if refuse:
    raise ValueError(f"{ENV_PROCESSES}={n}, but {refuse}")
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address=given[ENV_ADDRESS],
                               num_processes=n, process_id=i,
                               initialization_timeout=int(timeout_s))
  return True


ENV_XLA_CACHE = "EMERFLOW_XLA_CACHE"


def setup_compilation_cache(env: Mapping[str, str] | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache for an experiment binary.

  A tuning grid starts hundreds of runs of the same programs: each run builds
  fresh jitted closures, so without a cache each compiles again (seconds per
  program on CPU).  The cache keys a compiled program by its HLO and the
  compiler's options, so a hit changes no result.  Every program is cached,
  however quick to compile.  The folder is not capped: JAX's size cap evicts
  by access-time files that processes sharing the folder (a grid's settings
  side by side, pytest-xdist workers) race on; delete the folder to reclaim
  it (122 MB after the whole tuned grid).

  Where: ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own variable), else
  ``$EMERFLOW_XLA_CACHE``, else ``$XDG_CACHE_HOME/emerflow_jax/xla`` (default
  ``~/.cache``).  ``EMERFLOW_XLA_CACHE=0`` turns it off.

  Args:
    env: the environment (default: ``os.environ``).

  Returns:
    The cache folder, or None when turned off.
  """
  env = os.environ if env is None else env
  folder = env.get("JAX_COMPILATION_CACHE_DIR") or env.get(ENV_XLA_CACHE, "")
  if folder == "0":
    return None
  if not folder:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "emerflow_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
      env.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(
      env.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))
  return folder


def is_main_process() -> bool:
  """True on process 0, the one that writes files no collective write covers."""
  return jax.process_index() == 0


def task_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "tasks" over ``devices`` (default: every device).

  After ``jax.distributed.initialize()`` the default spans all hosts.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (TASK_AXIS,))


def task_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (task/item) axis over the mesh; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def padded_size(n: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh size that holds ``n`` tasks.

  Args:
    n: tasks.
    mesh: the device mesh.

  Returns:
    The padded count.
  """
  size = mesh.size
  return -(-n // size) * size


def pad_leading(tree: Any, multiple: int) -> Any:
  """Pads the leading axis of every array in ``tree`` with zeros to a multiple.

  Zero rows are inert by construction: a padded task has ``task_mask`` 0 and
  row ``mask`` 0, so it adds nothing to a loss or a gradient, and a padded
  warm-up item has mask 0, so its (zero) embedding never moves.

  Args:
    tree: arrays with a common leading axis.
    multiple: the target multiple.

  Returns:
    ``tree`` with the leading axis zero-padded.
  """
  def pad(x):
    x = np.asarray(gather(x))
    n = x.shape[0]
    extra = -(-n // multiple) * multiple - n
    if not extra:
      return x
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])
  return jax.tree.map(pad, tree)


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Already global (it spans hosts): reshard on the devices, never via host.
    if x.sharding == sharding:
      return x
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  # Every process holds the same global array; each keeps its own shards.
  # Unlike device_put, this is also correct when the mesh spans several hosts.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_tasks(tree: Any, mesh: Mesh) -> Any:
  """Pads the leading axis to a multiple of the mesh size and splits it.

  Args:
    tree: arrays with a common leading task/item axis [B, ...] (NumPy or JAX).
    mesh: from ``task_mesh``.

  Returns:
    The same tree of global ``jax.Array`` of shape [B', ...], B' =
    ``padded_size(B, mesh)``, sharded along the leading axis.
  """
  sharding = task_sharding(mesh)
  tree = pad_leading(tree, mesh.size)
  return jax.tree.map(lambda x: _global_array(x, sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of every array of ``tree`` on every device of the mesh.

  Args:
    tree: arrays.
    mesh: the device mesh.

  Returns:
    The replicated tree.
  """
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: _global_array(x, sharding), tree)


def gather(tree: Any) -> Any:
  """Global arrays -> NumPy arrays with the full value, on every process.

  A replicated array is read from this process's own copy; a sharded one that
  spans hosts is all-gathered, a collective: every process must call this.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
