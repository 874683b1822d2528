"""Tests for packing ragged per-item rows into padded arrays with masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import protocol, tasks
from emerflow_jax.models import backbones


def test_pack_rows_pads_truncates_and_masks(tiny_ds):
  rows = [np.arange(3), np.arange(10, 17), np.zeros(0, np.int64)]
  p = tasks.pack_rows(tiny_ds, rows, width=5)
  assert {k: v.shape for k, v in p.items()} == {
      "users": (3, 5), "items": (3, 5), "labels": (3, 5), "mask": (3, 5)}
  np.testing.assert_array_equal(p["mask"].sum(1), [3, 5, 0])
  # Truncation keeps the first rows in order.
  np.testing.assert_array_equal(p["users"][1], tiny_ds.users[10:15])
  np.testing.assert_array_equal(p["users"][0, :3], tiny_ds.users[:3])
  # Padded labels are zero, real labels are the data's.
  assert np.all(p["labels"][p["mask"] == 0] == 0)
  np.testing.assert_array_equal(p["labels"][0, :3], tiny_ds.labels[:3])
  assert p["users"].dtype == np.int32 and p["mask"].dtype == np.float32


def test_pack_rows_with_rng_keeps_a_time_ordered_random_subset(make_dataset):
  # User index == row index, so the packed users name the kept rows.  The file
  # lists rows newest first: time order is decreasing row index.
  ds = make_dataset(np.zeros(40), np.arange(40)[::-1], users=np.arange(40))
  rows = np.arange(34, 4, -1)  # one item's rows, in time order
  p = tasks.pack_rows(ds, [rows], width=8, rng=np.random.default_rng(0))
  q = tasks.pack_rows(ds, [rows], width=8, rng=np.random.default_rng(1))
  kept = p["users"][0]
  assert p["mask"].sum() == 8 and len(set(kept)) == 8
  assert set(kept) <= set(rows)
  assert np.all(np.diff(ds.times[kept]) > 0)  # time order is kept
  assert not np.array_equal(kept, q["users"][0])  # a fresh subset per rng
  assert not np.array_equal(kept, rows[:8])  # not simply the first rows


def test_pack_phase_and_pack_flat_shapes(tiny_ds, tiny_split):
  phase = tasks.pack_phase(tiny_ds, tiny_split.warm_rows["warm_a"])
  assert phase["users"].shape == (len(tiny_split.emerging_items), tiny_split.k)
  assert np.all(phase["mask"] == 1)
  np.testing.assert_array_equal(phase["items"][:, 0], tiny_split.emerging_items)
  flat = tasks.pack_flat(tiny_ds, tiny_split.test_rows)
  assert flat["labels"].shape == (len(tiny_split.test_rows),)
  np.testing.assert_array_equal(flat["labels"], tiny_ds.labels[tiny_split.test_rows])


def test_build_meta_tasks_pairs_consecutive_chunks(tiny_ds, tiny_split):
  t = tasks.build_meta_tasks(tiny_ds, tiny_split, support_rows=6, query_rows=9)
  n_old = len(tiny_split.old_items)
  assert t["item"].shape == (3 * n_old,)
  assert t["support/users"].shape == (3 * n_old, 6)
  assert t["query/mask"].shape == (3 * n_old, 9)
  for i, (item, chunks) in enumerate(zip(tiny_split.old_items,
                                         tiny_split.meta_chunks)):
    for j in range(3):
      task = 3 * i + j
      assert t["item"][task] == item
      sup, qry = chunks[j], chunks[j + 1]
      assert t["support/mask"][task].sum() == min(len(sup), 6)
      assert t["query/mask"][task].sum() == min(len(qry), 9)
      n = int(min(len(sup), 6))
      np.testing.assert_array_equal(t["support/users"][task, :n],
                                    tiny_ds.users[sup[:n]])
      m = t["query/mask"][task] > 0
      assert np.all(t["query/items"][task][m] == item)


def test_pad_tasks_adds_fully_masked_tasks(tiny_ds, tiny_split):
  t = tasks.build_meta_tasks(tiny_ds, tiny_split, 4, 4)
  n = len(t["item"])
  p = tasks.pad_tasks(t, 7)
  target = -(-n // 7) * 7
  assert len(p["item"]) == target and target % 7 == 0
  np.testing.assert_array_equal(p["task_mask"], np.r_[np.ones(n), np.zeros(target - n)])
  assert np.all(p["support/mask"][n:] == 0) and np.all(p["query/mask"][n:] == 0)
  for k in t:
    np.testing.assert_array_equal(p[k][:n], t[k])


def test_batches_cover_every_task_exactly_once():
  n = 23
  t = {"item": np.arange(1, n + 1, dtype=np.int32),
       "support/mask": np.ones((n, 3), np.float32)}
  out = tasks.batches(t, batch_size=5, rng=np.random.default_rng(0))
  assert len(out) == 5 and all(len(b["item"]) == 5 for b in out)
  real = np.concatenate([b["item"][b["task_mask"] > 0] for b in out])
  np.testing.assert_array_equal(np.sort(real), t["item"])
  pads = np.concatenate([b["item"][b["task_mask"] == 0] for b in out])
  assert len(pads) == 2 and np.all(pads == 0)
  first = [int(b["item"][0]) for b in out]
  again = [int(b["item"][0]) for b in tasks.batches(t, 5, np.random.default_rng(0))]
  assert first == again  # seeded shuffle


def test_masks_really_mask(tiny_ds, tiny_split, tiny_backbone):
  """Changing users/labels of padded rows leaves a masked loss unchanged."""
  bb = tiny_backbone
  rows = [c[0] for c in tiny_split.meta_chunks[:4]]
  width = max(len(r) for r in rows) + 3
  p = {k: jnp.asarray(v) for k, v in tasks.pack_rows(tiny_ds, rows, width).items()}
  assert float(p["mask"].min()) == 0.0

  @jax.jit
  def loss(batch):
    logits = backbones.score(bb.model, bb.params, bb.tables, batch["users"],
                             batch["items"])
    return backbones.bce_loss(logits, batch["labels"], batch["mask"])

  pad = p["mask"] == 0
  changed = dict(p, users=jnp.where(pad, 17, p["users"]),
                 items=jnp.where(pad, 3, p["items"]),
                 labels=jnp.where(pad, 1.0, p["labels"]))
  assert float(loss(changed)) == pytest.approx(float(loss(p)), rel=1e-6)
  # ...while changing a real row does change it (the check can fail).
  real = dict(p, labels=p["labels"].at[0, 0].set(1.0 - p["labels"][0, 0]))
  assert abs(float(loss(real)) - float(loss(p))) > 1e-4


def test_build_flow_tasks_replay_the_protocol_on_old_items(tiny_ds, tiny_split):
  k, q = 3, 50
  t = tasks.build_flow_tasks(tiny_ds, tiny_split, k, q)
  groups = protocol.rows_by_item(tiny_ds.items, tiny_ds.times, tiny_ds.n_items)
  assert t["support/users"].shape == (len(t["item"]), 3, k)
  assert t["query/mask"].shape == (len(t["item"]), q)
  for n, item in enumerate(t["item"]):
    rows = groups[item]
    for p in range(3):  # phase p = the item's rows pK .. (p+1)K, in time order
      np.testing.assert_array_equal(t["support/users"][n, p],
                                    tiny_ds.users[rows[p * k:(p + 1) * k]])
    window = rows[3 * k:tiny_split.n_max]  # as a validation item's test rows
    m = t["query/mask"][n] > 0
    assert m.sum() == min(len(window), q)
    np.testing.assert_array_equal(t["query/users"][n][m], tiny_ds.users[window[:m.sum()]])


def test_build_flow_tasks_random_offsets_stay_inside_the_history(tiny_ds, tiny_split):
  k = 2
  t = tasks.build_flow_tasks(tiny_ds, tiny_split, k, 4, np.random.default_rng(1),
                             offset="random")
  assert np.all(t["support/mask"] == 1)
  assert np.all(t["query/mask"].sum(1) > 0)
  assert np.all(t["support/items"] == t["item"][:, None, None])
  with pytest.raises(ValueError, match="first or random"):
    tasks.build_flow_tasks(tiny_ds, tiny_split, k, 4, offset="middle")
  with pytest.raises(ValueError, match="needs an rng"):
    tasks.build_flow_tasks(tiny_ds, tiny_split, k, 4, offset="random")


def test_sample_epoch_draws_query_subsets_and_batches_every_task_once(tiny_ds, tiny_split):
  k, q, b = 3, 6, 3
  pool = tasks.flow_task_pool(tiny_ds, tiny_split, k, q)
  whole = tasks.build_flow_tasks(tiny_ds, tiny_split, k, pool["query/mask"].shape[1])
  n = len(whole["item"])
  assert pool["task_mask"].tolist() == [1.0] * n + [0.0]
  assert pool["query/mask"][:n].sum() == whole["query/mask"].sum()  # windows whole
  assert not pool["support/mask"][n].any() and not pool["query/mask"][n].any()
  sample = jax.jit(tasks.sample_epoch, static_argnums=(2, 3))
  ep = jax.tree.map(np.asarray, sample(pool, jax.random.key(0), q, b))
  m = -(-n // b)
  assert ep["query/users"].shape == (m, b, q) and ep["support/users"].shape == (m, b, 3, k)
  real = ep["task_mask"].reshape(-1) > 0
  assert real.sum() == n and sorted(ep["item"].reshape(-1)[real]) == sorted(whole["item"])
  # Each real task keeps min(Q, window) of its own window's rows, in time order.
  pos = {int(i): t for t, i in enumerate(whole["item"])}
  for bi in range(m):
    for j in range(b):
      if not ep["task_mask"][bi, j]:
        assert not ep["query/mask"][bi, j].any()
        continue
      t = pos[int(ep["item"][bi, j])]
      np.testing.assert_array_equal(ep["support/users"][bi, j], whole["support/users"][t])
      window = whole["query/users"][t][whole["query/mask"][t] > 0]
      got = ep["query/users"][bi, j][ep["query/mask"][bi, j] > 0]
      assert len(got) == min(q, len(window))
      where = [int(np.flatnonzero(window == u)[0]) for u in got] if len(set(window)) == len(
          window) else None
      if where is not None:
        assert where == sorted(where)  # a time-ordered subset
      assert set(got) <= set(window)
  # Another key draws other subsets and another order; the same key, the same.
  again = jax.tree.map(np.asarray, sample(pool, jax.random.key(0), q, b))
  other = jax.tree.map(np.asarray, sample(pool, jax.random.key(1), q, b))
  jax.tree.map(np.testing.assert_array_equal, ep, again)
  assert not np.array_equal(ep["query/users"], other["query/users"])
