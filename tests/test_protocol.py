"""Tests for the emerging-item protocol: published counts and structural rules."""

import numpy as np
import pytest

from emerflow_jax import protocol
from emerflow_jax.data import dataset, movielens, synthetic

# The canonical ML-1M split (DESIGN §1): N=200, K=20.
ML1M = {"base_rows": 854_530, "warm_rows": 19_440, "test_rows": 58_409,
        "emerging_items": 972}


# --- published counts --------------------------------------------------------


def test_real_ml100k_has_334_old_and_472_emerging_items(real_data):
  folder = real_data("movielens-100k", "u.data", "u.item", "u.user")
  ds = movielens.load_movielens100k(folder, download=False)
  split = protocol.split_emerging_items(ds, n_max=100, k=10)
  c = split.counts()
  assert c["old_items"] == 334 and c["emerging_items"] == 472
  for p in protocol.WARM_PHASES:
    assert c[f"{p}_rows"] == 472 * 10
  counts = np.bincount(ds.items, minlength=ds.n_items)
  assert c["base_rows"] == counts[counts > 100].sum()
  em = counts[(counts >= 30) & (counts <= 100)]
  assert c["test_rows"] == em.sum() - 30 * len(em)


def _counts_with_sum(rng, n, lo, hi, total):
  """n integer counts in [lo, hi], heavy-tailed, summing exactly to total."""
  extra = total - n * lo
  assert 0 <= extra <= n * (hi - lo)
  w = rng.pareto(1.2, n) + 0.05
  x = np.minimum(np.floor(w / w.sum() * extra).astype(np.int64), hi - lo)
  while x.sum() < extra:
    room = np.flatnonzero(x < hi - lo)
    take = rng.choice(room, min(extra - x.sum(), len(room)), replace=False)
    x[take] += 1
  return lo + x


@pytest.fixture(scope="module")
def ml1m_like():
  """Synthetic world with item counts shaped like ML-1M's (N=200, K=20)."""
  rng = np.random.default_rng(0)
  # Boundary items: 201 (old), 200 and 60 (emerging), 59 and 1 (dropped).
  old = np.r_[_counts_with_sum(rng, 1399, 201, 3428, ML1M["base_rows"] - 201), 201]
  em_total = ML1M["emerging_items"] * 60 + ML1M["test_rows"]
  emerging = np.r_[_counts_with_sum(rng, 970, 60, 200, em_total - 260), 60, 200]
  dropped = np.r_[rng.integers(1, 60, 300), 59, 1]
  counts = rng.permutation(np.r_[old, emerging, dropped])
  ds = synthetic.make_synthetic(n_users=6040, item_counts=counts, seed=0)
  return ds, counts


def test_ml1m_like_counts_reproduce_the_canonical_arithmetic(ml1m_like):
  ds, counts = ml1m_like
  split = protocol.split_emerging_items(ds, n_max=200, k=20)
  c = split.counts()
  assert c["emerging_items"] == ML1M["emerging_items"]
  assert c["base_rows"] == ML1M["base_rows"]
  assert c["test_rows"] == ML1M["test_rows"]
  for p in protocol.WARM_PHASES:
    assert c[f"{p}_rows"] == ML1M["warm_rows"]
    assert split.warm_rows[p].shape == (972, 20)
  assert c["old_items"] == 1400
  # Items below 3K = 60 rows appear nowhere.
  dropped = np.flatnonzero(counts < 60)
  used = np.r_[split.base_rows, split.test_rows,
               *[split.warm_rows[p].ravel() for p in protocol.WARM_PHASES]]
  assert not np.isin(ds.items[used], dropped).any()
  assert len(used) == ds.n_rows - counts[dropped].sum()


def test_real_ml1m_canonical_split(real_data):
  folder = real_data("movielens-1m", "ratings.dat", "movies.dat", "users.dat")
  ds = movielens.load_movielens1m(folder, download=False)
  c = protocol.split_emerging_items(ds, n_max=200, k=20).counts()
  assert c["emerging_items"] == ML1M["emerging_items"]
  assert c["base_rows"] == ML1M["base_rows"]
  assert c["test_rows"] == ML1M["test_rows"]
  for p in protocol.WARM_PHASES:
    assert c[f"{p}_rows"] == ML1M["warm_rows"]


# --- structure on a handmade dataset -----------------------------------------

N, K = 10, 2
# item -> row count: 0 and 5 are old (12, 11 > N), 1, 2, 4 emerging (9, 6 = 3K,
# 10 = N), 3 dropped (5 < 3K).
SIZES = {0: 12, 1: 9, 2: 6, 3: 5, 4: 10, 5: 11}


@pytest.fixture(scope="module")
def handmade(make_dataset):
  """Rows in shuffled file order, with many equal timestamps."""
  rng = np.random.default_rng(7)
  items = np.repeat(list(SIZES), list(SIZES.values()))
  perm = rng.permutation(len(items))
  items = items[perm]
  times = rng.integers(0, 4, size=len(items)).astype(np.float64)  # lots of ties
  return make_dataset(items, times)


def _sorted_rows(ds, item):
  rows = np.flatnonzero(ds.items == item)
  return rows[np.lexsort((rows, ds.times[rows]))]  # by time, then row index


def test_old_emerging_and_dropped_items(handmade):
  split = protocol.split_emerging_items(handmade, n_max=N, k=K)
  np.testing.assert_array_equal(split.old_items, [0, 5])
  np.testing.assert_array_equal(split.emerging_items, [1, 2, 4])
  assert len(split.meta_chunks) == 2


def test_phases_are_time_ordered_with_row_index_tie_break(handmade):
  ds = handmade
  split = protocol.split_emerging_items(ds, n_max=N, k=K)
  for e, item in enumerate(split.emerging_items):
    got = np.r_[[r for p in protocol.WARM_PHASES for r in split.warm_rows[p][e]],
                split.test_rows[split.test_owner == e]]
    np.testing.assert_array_equal(got, _sorted_rows(ds, item))
    # Warm rows never come after any of the item's test rows in time.
    warm = np.r_[[split.warm_rows[p][e] for p in protocol.WARM_PHASES]].ravel()
    test = split.test_rows[split.test_owner == e]
    if len(test):
      assert ds.times[warm].max() <= ds.times[test].min()
  np.testing.assert_array_equal(ds.items[split.test_rows],
                                split.emerging_items[split.test_owner])


def test_equal_timestamps_keep_file_order(make_dataset):
  ds = make_dataset(np.zeros(8, np.int32), np.zeros(8))
  split = protocol.split_emerging_items(ds, n_max=8, k=2)
  np.testing.assert_array_equal(split.warm_rows["warm_a"], [[0, 1]])
  np.testing.assert_array_equal(split.warm_rows["warm_c"], [[4, 5]])
  np.testing.assert_array_equal(split.test_rows, [6, 7])


def test_no_row_in_two_places_and_dropped_rows_nowhere(handmade):
  ds = handmade
  split = protocol.split_emerging_items(ds, n_max=N, k=K)
  parts = [split.base_rows, split.test_rows] + [
      split.warm_rows[p].ravel() for p in protocol.WARM_PHASES]
  used = np.concatenate(parts)
  assert len(np.unique(used)) == len(used)
  np.testing.assert_array_equal(np.sort(used), np.flatnonzero(ds.items != 3))
  assert set(ds.items[split.base_rows]) == {0, 5}


def test_meta_chunks_are_four_time_ordered_chunks_of_each_old_item(handmade):
  ds = handmade
  split = protocol.split_emerging_items(ds, n_max=N, k=K)
  for item, chunks in zip(split.old_items, split.meta_chunks):
    assert len(chunks) == 4
    np.testing.assert_array_equal(np.concatenate(chunks), _sorted_rows(ds, item))
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == SIZES[item]
  # base_rows are the old items' rows, each item's block in time order.
  np.testing.assert_array_equal(
      split.base_rows, np.r_[_sorted_rows(ds, 0), _sorted_rows(ds, 5)])


def test_split_does_not_depend_on_file_order_when_times_differ(make_dataset):
  rng = np.random.default_rng(3)
  items = np.repeat(list(SIZES), list(SIZES.values()))
  times = rng.permutation(len(items)).astype(np.float64)  # distinct
  perm = rng.permutation(len(items))
  a = protocol.split_emerging_items(make_dataset(items, times), N, K)
  b = protocol.split_emerging_items(make_dataset(items[perm], times[perm]), N, K)
  # Same (time) sequence per phase: rows differ only by the permutation.
  for p in protocol.WARM_PHASES:
    np.testing.assert_array_equal(times[a.warm_rows[p]],
                                  times[perm][b.warm_rows[p]])
  np.testing.assert_array_equal(times[a.test_rows], times[perm][b.test_rows])


def test_invalid_n_and_k_are_rejected(handmade):
  with pytest.raises(ValueError, match="3K <= N"):
    protocol.split_emerging_items(handmade, n_max=5, k=2)
  with pytest.raises(ValueError):
    protocol.split_emerging_items(handmade, n_max=10, k=0)


def test_non_finite_times_are_a_clear_error(make_dataset):
  ds = make_dataset([0, 0, 0, 1], [1.0, 2.0, 3.0, 4.0])
  ds.times = ds.times.copy()
  ds.times[2] = np.nan
  with pytest.raises(dataset.DataError, match="non-finite time"):
    protocol.split_emerging_items(ds, n_max=3, k=1)


# --- validation carve ---------------------------------------------------------


def test_carve_validation_removes_held_out_items(tiny_ds, tiny_split):
  split, hold = protocol.carve_validation(tiny_split, tiny_ds, 0.25, seed=1)
  n_old = len(tiny_split.old_items)
  assert len(hold.items) == round(0.25 * n_old)
  assert len(split.old_items) + len(hold.items) == n_old
  assert not np.isin(hold.items, split.old_items).any()
  assert not np.isin(tiny_ds.items[split.base_rows], hold.items).any()
  assert len(split.meta_chunks) == len(split.old_items)
  for item, chunks in zip(split.old_items, split.meta_chunks):
    assert set(tiny_ds.items[np.concatenate(chunks)]) == {item}
  # Held-out items look like emerging ones: first 3K rows warm, then <= N-3K test.
  k, n = tiny_split.k, tiny_split.n_max
  for h, item in enumerate(hold.items):
    rows = _sorted_rows(tiny_ds, item)
    for j, p in enumerate(protocol.WARM_PHASES):
      np.testing.assert_array_equal(hold.warm_rows[p][h], rows[j * k:(j + 1) * k])
    np.testing.assert_array_equal(hold.test_rows[hold.test_owner == h],
                                  rows[3 * k:n])
  # The emerging items are untouched.
  np.testing.assert_array_equal(split.test_rows, tiny_split.test_rows)


def test_carve_validation_is_seeded_and_zero_is_a_no_op(tiny_ds, tiny_split):
  _, a = protocol.carve_validation(tiny_split, tiny_ds, 0.25, seed=1)
  _, b = protocol.carve_validation(tiny_split, tiny_ds, 0.25, seed=1)
  np.testing.assert_array_equal(a.items, b.items)
  same, none = protocol.carve_validation(tiny_split, tiny_ds, 0.0, seed=1)
  assert none is None and same is tiny_split


def test_carve_validation_can_pick_the_old_items_with_fewest_rows(tiny_ds, tiny_split):
  sizes = {int(i): int((tiny_ds.items == i).sum()) for i in tiny_split.old_items}
  rest, held = protocol.carve_validation(tiny_split, tiny_ds, 0.25, seed=0,
                                         pick="fewest_rows")
  assert len(held.items) == 2
  assert max(sizes[int(i)] for i in held.items) <= min(sizes[int(i)] for i in rest.old_items)
  assert not np.isin(tiny_ds.items[rest.base_rows], held.items).any()
  with pytest.raises(ValueError, match="fewest_rows"):
    protocol.carve_validation(tiny_split, tiny_ds, 0.25, seed=0, pick="largest")
