"""The emerging-item protocol (DESIGN §1): old/emerging split, phases, meta chunks.

Everything here is NumPy on row indices into a `Dataset`; nothing looks at
features.  Leakage rule: an emerging item's future never shapes its inputs.
The split itself uses each item's total count (that is the protocol's
definition of "emerging"), but no model ever sees that count: timestamps only
order rows, and the phases are cut by position in that order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emerflow_jax.data import dataset as dataset_lib

PHASES = ("cold", "warm_a", "warm_b", "warm_c")
WARM_PHASES = ("warm_a", "warm_b", "warm_c")


@dataclasses.dataclass
class Split:
  """An old/emerging split.

  Attributes:
    n_max: N, old items have more than N rows.
    k: K, rows per warm phase.
    old_items: [n_old] item indices.
    emerging_items: [n_em] item indices, in increasing order.
    base_rows: [n_base] row indices of all old-item rows (time-ordered per item).
    warm_rows: phase name -> [n_em, K] row indices; row e holds the K rows of
      emerging_items[e] for that phase, in time order.
    test_rows: [n_test] row indices (emerging items' rows after the 3K warm rows).
    test_owner: [n_test] position in emerging_items of each test row's item.
    meta_chunks: per old item (same order as old_items), 4 arrays of
      time-ordered row indices (chunks a, b, c, d).
  """
  n_max: int
  k: int
  old_items: np.ndarray
  emerging_items: np.ndarray
  base_rows: np.ndarray
  warm_rows: dict[str, np.ndarray]
  test_rows: np.ndarray
  test_owner: np.ndarray
  meta_chunks: list[list[np.ndarray]]

  def counts(self) -> dict[str, int]:
    """Sizes a paper table reports."""
    out = {"old_items": len(self.old_items),
           "emerging_items": len(self.emerging_items),
           "base_rows": len(self.base_rows), "test_rows": len(self.test_rows)}
    for p in WARM_PHASES:
      out[f"{p}_rows"] = int(self.warm_rows[p].size)
    return out


def rows_by_item(items: np.ndarray, times: np.ndarray,
                 n_items: int) -> list[np.ndarray]:
  """Groups row indices by item, each group ordered by (time, row index).

  The row-index tie-break keeps the order of equal timestamps as in the file,
  so the split is deterministic.

  Args:
    items: [R] item index of each row.
    times: [R] timestamp of each row.
    n_items: number of items; indices in ``items`` are < n_items.

  Returns:
    n_items arrays of row indices, [rows of item i] each (empty for an item
    with no row).
  """
  order = np.lexsort((np.arange(len(items)), times, items))
  bounds = np.searchsorted(items[order], np.arange(n_items + 1))
  return [order[bounds[i]:bounds[i + 1]] for i in range(n_items)]


def split_emerging_items(ds: dataset_lib.Dataset, n_max: int, k: int,
                         n_chunks: int = 4) -> Split:
  """Splits a dataset into old and emerging items (DESIGN §1).

  Args:
    ds: the dataset.
    n_max: N; items with > N rows are old.
    k: K; items with 3K..N rows are emerging, fewer are dropped.
    n_chunks: meta chunks per old item (4: a, b, c, d).

  Returns:
    The Split.
  """
  if not 0 < 3 * k <= n_max:
    raise ValueError(f"need 0 < 3K <= N, got K={k}, N={n_max}")
  bad = np.flatnonzero(~np.isfinite(ds.times))
  if len(bad):  # NaN has no place in a time order: the phases would be arbitrary
    raise dataset_lib.DataError(
        f"{ds.name}: {len(bad)} rows have a non-finite time (first: row {bad[0]})")
  groups = rows_by_item(ds.items, ds.times, ds.n_items)
  sizes = np.asarray([len(g) for g in groups])
  old = np.flatnonzero(sizes > n_max)
  emerging = np.flatnonzero((sizes >= 3 * k) & (sizes <= n_max))
  base_rows = (np.concatenate([groups[i] for i in old]) if len(old)
               else np.zeros(0, np.int64))
  warm = {p: np.stack([groups[i][j * k:(j + 1) * k] for i in emerging])
          if len(emerging) else np.zeros((0, k), np.int64)
          for j, p in enumerate(WARM_PHASES)}
  tests = [groups[i][3 * k:] for i in emerging]
  test_rows = np.concatenate(tests) if tests else np.zeros(0, np.int64)
  test_owner = np.repeat(np.arange(len(emerging)), [len(t) for t in tests])
  chunks = [np.array_split(groups[i], n_chunks) for i in old]
  return Split(n_max=n_max, k=k, old_items=old, emerging_items=emerging,
               base_rows=base_rows, warm_rows=warm, test_rows=test_rows,
               test_owner=test_owner, meta_chunks=chunks)


@dataclasses.dataclass
class Holdout:
  """Old items held out for model selection, treated like emerging items.

  Their first 3K time-ordered rows are warm_a/b/c and the next rows (up to
  N - 3K, as for a real emerging item) are the validation test rows.  They are
  removed from pretraining and meta-training, so validation never sees the
  emerging items' test rows and never trains on its own targets.
  """
  items: np.ndarray
  warm_rows: dict[str, np.ndarray]
  test_rows: np.ndarray
  test_owner: np.ndarray


def carve_validation(split: Split, ds: dataset_lib.Dataset, fraction: float,
                     seed: int, pick: str = "random") -> tuple[Split, Holdout | None]:
  """Moves a ``fraction`` of old items into a validation Holdout.

  ``pick`` is "random" (uniform) or "fewest_rows": the old items with the
  fewest rows (ties broken at random), the old items most like emerging ones.

  Args:
    split: the split to carve from.
    ds: the dataset.
    fraction: share of ``split.old_items`` to hold out (rounded to a count).
    seed: seed of the draw.
    pick: "random" or "fewest_rows".

  Returns:
    (the split without those items in base_rows / meta_chunks, the Holdout or
    None when fraction is 0).
  """
  n_val = int(round(fraction * len(split.old_items)))
  if n_val == 0:
    return split, None
  rng = np.random.default_rng(seed)
  groups = rows_by_item(ds.items, ds.times, ds.n_items)
  if pick == "random":
    chosen = rng.choice(len(split.old_items), n_val, replace=False)
  elif pick == "fewest_rows":
    sizes = np.asarray([len(groups[i]) for i in split.old_items])
    chosen = np.lexsort((rng.random(len(sizes)), sizes))[:n_val]
  else:
    raise ValueError(f"pick must be random or fewest_rows, got {pick!r}")
  pick = np.zeros(len(split.old_items), bool)
  pick[chosen] = True
  val_items = split.old_items[pick]
  k = split.k
  warm = {p: np.stack([groups[i][j * k:(j + 1) * k] for i in val_items])
          for j, p in enumerate(WARM_PHASES)}
  tests = [groups[i][3 * k:split.n_max] for i in val_items]
  holdout = Holdout(items=val_items, warm_rows=warm,
                    test_rows=np.concatenate(tests),
                    test_owner=np.repeat(np.arange(n_val), [len(t) for t in tests]))
  keep = ~pick
  kept_old = split.old_items[keep]
  new = dataclasses.replace(
      split, old_items=kept_old,
      base_rows=np.concatenate([groups[i] for i in kept_old]),
      meta_chunks=[c for c, m in zip(split.meta_chunks, keep) if m])
  return new, holdout


def without_emerging(split: Split) -> Split:
  """``split`` with every emerging item and its rows removed (tuning runs).

  Model selection must never read a test row; a split without them makes
  that structural rather than a convention.
  """
  empty = np.zeros(0, np.int64)
  return dataclasses.replace(
      split, emerging_items=empty, test_rows=empty, test_owner=empty,
      warm_rows={p: np.zeros((0, split.k), np.int64) for p in split.warm_rows})


def chunk_items(ds: dataset_lib.Dataset, split: Split, items: np.ndarray,
                n_chunks: int = 4) -> Split:
  """A copy of ``split`` whose meta-tasks come from ``items`` instead.

  Each item's time-ordered rows are cut into ``n_chunks`` chunks, as for old
  items; used when meta-training runs on old items held out of pretraining.

  Args:
    ds: the dataset.
    split: the split to copy.
    items: [m] item ids that become ``old_items``.
    n_chunks: meta chunks per item.

  Returns:
    The Split with ``old_items`` = ``items`` and their ``meta_chunks``; its
    base_rows are unchanged.
  """
  groups = rows_by_item(ds.items, ds.times, ds.n_items)
  return dataclasses.replace(
      split, old_items=np.asarray(items),
      meta_chunks=[np.array_split(groups[i], n_chunks) for i in items])
