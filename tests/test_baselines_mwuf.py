"""MWUF: the shift reads the right users (item -> its users, only rows seen)."""

import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import protocol, tasks, train
from emerflow_jax.baselines import mwuf


@pytest.fixture
def ctx(tiny_context):
  """The shared tiny world and its pretrained DeepFM."""
  return tiny_context(**{"mwuf.epochs": 2, "mwuf.batch_size": 128})


def test_user_sums_group_users_under_their_item():
  # Rows (user, item): (0, 1), (2, 1), (3, 0).  Item 1's users are {0, 2};
  # keyed the swapped way, position 1 would instead collect the rows of user 1
  # (none) and position 0 the items of user 0.
  table = jnp.asarray(np.arange(4 * 2, dtype=np.float32).reshape(4, 2))
  users, owners = jnp.asarray([0, 2, 3]), jnp.asarray([1, 1, 0])
  sums, counts = mwuf.user_sums(table[users], owners, jnp.ones(3), 2)
  means = mwuf.user_means(sums, counts, jnp.zeros(2))
  np.testing.assert_allclose(means, [table[3], (table[0] + table[2]) / 2])
  np.testing.assert_allclose(counts, [1, 2])
  swapped, _ = mwuf.user_sums(table[owners], users, jnp.ones(3), 2)
  assert not np.allclose(swapped, sums)


def test_old_item_user_means_use_each_items_own_rows(ctx):
  data, _ = mwuf.training_data(ctx)
  ds, rows = ctx.ds, ctx.split.base_rows
  # Old items whose index is also a user with rows, so the swap is defined.
  both = [p for p, i in enumerate(ctx.split.old_items)
          if np.any(ds.users[rows] == i)]
  assert len(both) >= 2
  for pos in (both[0], both[-1]):
    item = ctx.split.old_items[pos]
    its_users = ds.users[rows[ds.items[rows] == item]]
    want = mwuf.user_vectors(ctx.params, ctx.tables, jnp.asarray(its_users)).mean(0)
    np.testing.assert_allclose(data["user_mean"][pos], want, rtol=1e-5, atol=1e-7)
    # The swapped map (rows grouped by user, user index read as an item) differs.
    swapped = mwuf.user_vectors(ctx.params, ctx.tables,
                                jnp.asarray(ds.items[rows[ds.users[rows] == item]]))
    assert not np.allclose(swapped.mean(0), want)


def test_emerging_items_see_only_warm_rows_so_far(ctx):
  method = mwuf.MWUF()
  state = method.fit(ctx)
  sp = ctx.split
  items = sp.emerging_items
  emb = method.cold(ctx, state, items)
  assert "seen" not in state  # nothing is known about emerging items when cold
  seen_rows = np.zeros((len(items), 0), np.int64)
  for p, phase in enumerate(protocol.WARM_PHASES):
    emb, state = method.refine(ctx, state, emb, tasks.pack_phase(ctx.ds, sp.warm_rows[phase]),
                               items, p)
    seen_rows = np.concatenate([seen_rows, sp.warm_rows[phase]], 1)
    want = mwuf.user_vectors(ctx.params, ctx.tables,
                             jnp.asarray(ctx.ds.users[seen_rows])).mean(1)
    seen = state["seen"]
    np.testing.assert_allclose(seen["counts"], seen_rows.shape[1])
    np.testing.assert_allclose(seen["sums"] / seen["counts"][:, None], want,
                               rtol=1e-5, atol=1e-7)


def test_end_to_end_finite_auc(ctx):
  method = mwuf.MWUF()
  state = method.fit(ctx)
  sp = ctx.split
  out, _ = train.evaluate_items(method, ctx, state, sp.emerging_items, sp.warm_rows,
                                sp.test_rows, sp.test_owner)
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in out["auc"].values())
  assert all(np.isfinite(v) for v in out["f1"].values())
