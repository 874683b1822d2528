"""Packs ragged per-item rows into fixed-shape padded arrays plus masks.

One compiled program then serves every batch: an item with fewer rows than the
width is padded with row 0 and mask 0, an item with more is truncated to its
first ``width`` rows in time order (or a seeded random subset, for meta-training
tasks, so that long histories are sampled rather than cut).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import protocol
from emerflow_jax.data import dataset as dataset_lib

# A packed batch: "users", "items", "labels", "mask", each [n, width].
Packed = dict[str, np.ndarray]


def pack_rows(ds: dataset_lib.Dataset, row_lists: Sequence[np.ndarray],
              width: int, rng: np.random.Generator | None = None) -> Packed:
  """Packs one list of row indices per task into [n_tasks, width] arrays.

  Args:
    ds: the dataset the rows index.
    row_lists: per task, its row indices (time-ordered).
    width: padded width R.
    rng: if given, tasks with more than ``width`` rows keep a random subset
      (kept in time order); otherwise they keep their first ``width`` rows.

  Returns:
    {"users", "items": int32 [n, R], "labels", "mask": float32 [n, R]}.
  """
  n = len(row_lists)
  idx = np.zeros((n, width), np.int64)
  mask = np.zeros((n, width), np.float32)
  for t, rows in enumerate(row_lists):
    rows = np.asarray(rows)
    if len(rows) > width:
      # Sort positions, not row indices: file order need not be time order.
      rows = (rows[np.sort(rng.choice(len(rows), width, replace=False))]
              if rng is not None else rows[:width])
    idx[t, :len(rows)] = rows
    mask[t, :len(rows)] = 1.0
  return {"users": ds.users[idx].astype(np.int32),
          "items": ds.items[idx].astype(np.int32),
          "labels": ds.labels[idx] * mask, "mask": mask}


def pack_flat(ds: dataset_lib.Dataset, rows: np.ndarray) -> Packed:
  """Row arrays for real rows of any shape S (all mask 1).

  Args:
    rows: S row indices: [n] flat test/pretraining rows, or [n_items, K] warm rows.

  Returns:
    {"users", "items": int32 S, "labels", "mask": float32 S}.
  """
  rows = np.asarray(rows)
  return {"users": ds.users[rows].astype(np.int32),
          "items": ds.items[rows].astype(np.int32),
          "labels": ds.labels[rows].astype(np.float32),
          "mask": np.ones(rows.shape, np.float32)}


# A [n_items, K] block of warm-phase rows packs exactly like flat rows.
pack_phase = pack_flat


def build_meta_tasks(ds: dataset_lib.Dataset, split: protocol.Split,
                     support_rows: int, query_rows: int,
                     rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """All (support = chunk j, query = chunk j+1) tasks of the old items.

  Args:
    ds: the dataset.
    split: the split whose ``meta_chunks`` define the tasks.
    support_rows: padded support width (K mimics a warm phase).
    query_rows: padded query width.
    rng: optional generator to subsample long chunks (fresh per epoch).

  Returns:
    {"item": [n_tasks] item index, "support": Packed [n_tasks, support_rows],
    "query": Packed [n_tasks, query_rows]} flattened into keys
    "support/users", ..., "query/mask".
  """
  sup, qry, owner = [], [], []
  for item, chunks in zip(split.old_items, split.meta_chunks):
    for j in range(len(chunks) - 1):
      sup.append(chunks[j])
      qry.append(chunks[j + 1])
      owner.append(item)
  out = {"item": np.asarray(owner, np.int32)}
  for name, lists, width in (("support", sup, support_rows),
                             ("query", qry, query_rows)):
    for k, v in pack_rows(ds, lists, width, rng).items():
      out[f"{name}/{k}"] = v
  return out


def build_flow_tasks(ds: dataset_lib.Dataset, split: protocol.Split, k: int,
                     query_rows: int, rng: np.random.Generator | None = None,
                     n_phases: int = len(protocol.WARM_PHASES),
                     offset: str = "first") -> dict[str, np.ndarray]:
  """One task per old item that replays the protocol: K-row phases, then later rows.

  An emerging item is seen cold, then after each of P warm phases of K rows,
  and is scored on its rows after those.  A flow task cuts an old item's
  time-ordered history the same way: support phase p is rows
  ``s + pK .. s + (p+1)K``, and the query is drawn from the rows after
  ``s + PK`` up to ``s + N`` (the window the validation holdout scores on).

  Args:
    ds: the dataset.
    split: the split whose ``meta_chunks`` hold each old item's rows.
    k: K, rows per phase.
    query_rows: padded query width Q (a seeded random subset when the window
      is longer and ``rng`` is given, else its first Q rows).
    rng: generator for query subsets and random offsets (fresh per epoch).
    n_phases: P.
    offset: "first" (s = 0: the item's first rows, exactly as an emerging
      item) or "random" (s uniform over the positions that leave a full query
      window; needs ``rng``; more distinct tasks per item).

  Returns:
    {"item": [n] item index, "support/{users,items,labels,mask}": [n, P, K],
    "query/{...}": [n, Q]}.
  """
  if offset not in ("first", "random"):
    raise ValueError(f"flow task offset must be first or random, got {offset!r}")
  if offset == "random" and rng is None:
    raise ValueError("offset='random' needs an rng")
  sup, qry, owner = [], [], []
  for item, chunks in zip(split.old_items, split.meta_chunks):
    rows = np.concatenate(chunks)
    if len(rows) <= n_phases * k:
      continue  # no rows left to score on
    s = 0
    if offset == "random":
      s = int(rng.integers(0, max(len(rows) - split.n_max, 0) + 1))
    sup.extend(rows[s + p * k:s + (p + 1) * k] for p in range(n_phases))
    qry.append(rows[s + n_phases * k:s + max(split.n_max, n_phases * k + 1)])
    owner.append(item)
  n = len(owner)
  out = {"item": np.asarray(owner, np.int32)}
  for key, v in pack_rows(ds, sup, k).items():
    out[f"support/{key}"] = v.reshape(n, n_phases, k)
  for key, v in pack_rows(ds, qry, query_rows, rng).items():
    out[f"query/{key}"] = v
  return out


def flow_task_pool(ds: dataset_lib.Dataset, split: protocol.Split, k: int,
                   query_rows: int, n_phases: int = len(protocol.WARM_PHASES)
                   ) -> dict[str, np.ndarray]:
  """Every flow task (offset "first") with its whole query window, built once.

  ``sample_epoch`` then draws each epoch's query subsets and batches from it
  on the device, so that meta-training never repacks tasks on the host.

  Args:
    ds, split, k, n_phases: as for ``build_flow_tasks``.
    query_rows: Q, the query width an epoch samples (the window is at least Q).

  Returns:
    ``build_flow_tasks`` arrays with query width W = max(Q, N - P K) (every
    window whole) and one trailing fully masked task (the padding of
    batches), plus "task_mask" [n + 1] (1 for the n real tasks).
  """
  width = max(query_rows, max(split.n_max, n_phases * k + 1) - n_phases * k)
  full = build_flow_tasks(ds, split, k, width, None, n_phases)
  n = len(full["item"])
  out = {key: np.concatenate([v, np.zeros((1,) + v.shape[1:], v.dtype)])
         for key, v in full.items()}
  out["task_mask"] = (np.arange(n + 1) < n).astype(np.float32)
  return out


def sample_epoch(pool: dict[str, jnp.ndarray], key: jax.Array, query_rows: int,
                 batch_size: int) -> dict[str, jnp.ndarray]:
  """One epoch of batches from a ``flow_task_pool``, on the device.

  Each task keeps a uniformly random, time-ordered subset of Q rows of its
  query window (all of them when the window is shorter), as ``pack_rows``
  does on the host; the tasks are shuffled and cut into equal batches, the
  last one padded with the pool's masked task.

  Args:
    pool: ``flow_task_pool`` arrays, [n + 1, ...].
    key: PRNG key of this epoch.
    query_rows: Q (static).
    batch_size: B (static).

  Returns:
    The pool's keys with leaves [m, B, ...], m = ceil(n / B); query width Q.
  """
  n = pool["item"].shape[0] - 1
  k_rows, k_order = jax.random.split(key)
  mask = pool["query/mask"]
  # Real rows draw a uniform rank, padding ranks last: the Q smallest ranks
  # are a uniform Q-subset of the real rows.
  rank = jnp.where(mask > 0, jax.random.uniform(k_rows, mask.shape), 2.0)
  pick = jnp.sort(jnp.argsort(rank, axis=1)[:, :query_rows], axis=1)
  tasks = {k: jnp.take_along_axis(v, pick, axis=1) if k.startswith("query/") else v
           for k, v in pool.items()}
  m = -(-n // batch_size)
  order = jnp.concatenate([jax.random.permutation(k_order, n),
                           jnp.full((m * batch_size - n,), n, jnp.int32)])
  idx = order.reshape(m, batch_size)
  return {k: v[idx] for k, v in tasks.items()}


def pad_tasks(tasks: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads the task axis to a multiple of ``multiple`` with fully masked tasks.

  Padded tasks carry a zero mask everywhere and ``task_mask`` 0, so they add
  nothing to a loss; a fixed task count keeps jit from recompiling.

  Args:
    tasks: [n, ...] task arrays.
    multiple: the target multiple.

  Returns:
    The padded arrays, with "task_mask" [n_padded].
  """
  n = len(tasks["item"])
  target = -(-n // multiple) * multiple
  out = {}
  for k, v in tasks.items():
    pad = np.zeros((target - n,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad])
  tm = np.zeros(target, np.float32)
  tm[:n] = 1.0
  out["task_mask"] = tm
  return out


def batches(tasks: dict[str, np.ndarray], batch_size: int,
            rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """Shuffles tasks and cuts them into equal batches (the last one padded).

  Args:
    tasks: [n, ...] task arrays.
    batch_size: tasks per batch.
    rng: host generator of the shuffle.

  Returns:
    [batch_size, ...] batches.
  """
  n = len(tasks["item"])
  perm = rng.permutation(n)
  shuffled = {k: v[perm] for k, v in tasks.items()}
  padded = pad_tasks(shuffled, batch_size)
  m = len(padded["item"]) // batch_size
  return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in padded.items()}
          for i in range(m)]
