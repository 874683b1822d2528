"""Tests for baselines/gme.py: neighbour lists, masked attention, no future rows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_baselines_emerg
from emerflow_jax import tasks
from emerflow_jax.baselines import gme


def _gen_and_inputs(seed: int = 0, n: int = 3, dim: int = 6):
  rng = np.random.default_rng(seed)
  gen = gme.GMEA(att_dim=4, hidden=8, out=4)
  z = jnp.asarray(rng.normal(size=(dim,)), jnp.float32)
  nbr = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
  params = gen.init(jax.random.key(seed), z, nbr, jnp.ones((n,)))
  params = jax.tree.map(lambda a: a * 50.0, params)  # weights large enough to matter
  return gen, params, z, nbr, rng


def test_padding_neighbours_changes_nothing():
  gen, params, z, nbr, rng = _gen_and_inputs()
  out = gen.apply(params, z, nbr, jnp.ones((3,)))
  garbage = jnp.asarray(rng.normal(size=(5, z.shape[0])) * 100, jnp.float32)
  padded = jnp.concatenate([nbr, garbage])
  mask = jnp.concatenate([jnp.ones((3,)), jnp.zeros((5,))])
  np.testing.assert_allclose(gen.apply(params, z, padded, mask), out, rtol=1e-6, atol=1e-7)
  # Padding in the middle, other garbage: the same.
  mixed = jnp.stack([nbr[0], garbage[0] * 3, nbr[1], nbr[2], garbage[1]])
  np.testing.assert_allclose(
      gen.apply(params, z, mixed, jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0])), out,
      rtol=1e-6, atol=1e-7)
  # ... and the gradient does not reach padded neighbours.
  g = jax.grad(lambda zn: gen.apply(params, z, zn, mask).sum())(padded)
  assert float(jnp.abs(g[3:]).max()) == 0.0 and float(jnp.abs(g[:3]).max()) > 0


def test_neighbours_matter_and_order_does_not():
  gen, params, z, nbr, _ = _gen_and_inputs(seed=1)
  out = gen.apply(params, z, nbr, jnp.ones((3,)))
  perm = jnp.asarray([2, 0, 1])
  np.testing.assert_allclose(gen.apply(params, z, nbr[perm], jnp.ones((3,))), out,
                             rtol=1e-5, atol=1e-6)
  # Unmasking a neighbour changes the result (the mask is not ignored).
  alone = gen.apply(params, z, nbr, jnp.zeros((3,)))
  assert float(jnp.abs(alone - out).max()) > 1e-4
  # With every neighbour masked only the item itself is attended.
  np.testing.assert_allclose(alone, gen.apply(params, z, nbr[:1] * 7, jnp.zeros((1,))),
                             rtol=1e-6, atol=1e-7)


def test_neighbours_share_attributes_from_old_items_only(tiny_ds, tiny_split):
  pool = tiny_split.old_items
  idx, mask = gme.build_neighbours(tiny_ds, pool, 4)
  assert idx.shape == mask.shape == (tiny_ds.n_items, 4)
  shared = gme.shared_attributes(tiny_ds, np.arange(tiny_ds.n_items), pool)
  for i in range(tiny_ds.n_items):
    real = idx[i][mask[i] > 0]
    assert np.isin(real, pool).all() and i not in real
    # Most shared first, and each really shares a value.
    s = shared[i][np.searchsorted(pool, real)] if len(real) else np.zeros(0)
    assert (s > 0).all() and (np.diff(s) <= 0).all()
  assert mask.sum() > 0


def test_shared_attributes_by_hand(make_dataset):
  ds = make_dataset(items=[0, 1, 2, 3], times=[0, 1, 2, 3], n_items=4)
  genres = np.asarray([[1, 2, 0], [2, 3, 0], [4, 0, 0], [1, 2, 3]], np.int32)
  year = np.asarray([5, 5, 6, 0], np.int32)
  ds = dataclasses.replace(
      ds, item_fields=dict(ds.item_fields, genres=genres, year=year),
      vocab_sizes=dict(ds.vocab_sizes, **{"item/genres": 5, "item/year": 7}))
  got = gme.shared_attributes(ds, np.asarray([0, 2]), np.asarray([1, 2, 3]))
  # item 0 vs 1: genre 2 + year 5; vs 2: nothing; vs 3: genres 1, 2 (year 0 is padding).
  np.testing.assert_array_equal(got, [[2, 0, 2], [0, 2, 0]])  # (self not excluded here)
  idx, mask = gme.build_neighbours(ds, np.asarray([1, 2, 3]), 3)
  np.testing.assert_array_equal(idx[0][mask[0] > 0], [1, 3])  # tie: lower index first
  np.testing.assert_array_equal(idx[3][mask[3] > 0], [1])  # genres 2, 3 (0 excluded: not in pool)


def test_fit_cold_refine_and_no_future_rows(tiny_ds, tiny_split, tiny_context, tmp_path):
  """gme on DeepFM; garbling everything after warm_a changes nothing up to warm_a."""
  later = np.concatenate([tiny_split.warm_rows["warm_b"].ravel(),
                          tiny_split.warm_rows["warm_c"].ravel(), tiny_split.test_rows])
  rng = np.random.default_rng(0)
  labels, users = tiny_ds.labels.copy(), tiny_ds.users.copy()
  labels[later] = 1.0 - labels[later]
  users[later] = rng.integers(0, tiny_ds.n_users, len(later))
  garbled = dataclasses.replace(tiny_ds, labels=labels, users=users)
  items = tiny_split.emerging_items
  outs = []
  for name, ds in (("clean", tiny_ds), ("garbled", garbled)):
    ctx = dataclasses.replace(tiny_context(**{"gme.epochs": 2, "gme.batch_tasks": 8}),
                              ds=ds, workdir=tmp_path / name)
    method = gme.GME()
    state = method.fit(ctx)
    cold = method.cold(ctx, state, items)
    batch = {k: np.asarray(v) for k, v in
             tasks.pack_phase(ds, tiny_split.warm_rows["warm_a"]).items()}
    warm, _ = method.refine(ctx, state, cold, batch, items, 0)
    outs.append((np.asarray(cold), np.asarray(warm)))
  assert outs[0][0].shape == (len(items), 4) and np.isfinite(outs[0][1]).all()
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  assert not np.array_equal(outs[0][0], outs[0][1])
  assert len({tuple(np.round(r, 7)) for r in outs[0][0]}) > 1  # item-specific


@pytest.mark.background(make_argv=lambda p, w: test_baselines_emerg.binary_argv(
    p["config"], "gme", p["backbone"], w))  # runs while the other tests run (conftest.py)
@pytest.mark.parametrize("config,backbone", [("synthetic", "deepfm"),
                                             ("disgenet", "widedeep"),
                                             ("repodb", "emerg_gnn")])
def test_binary(config, backbone, request, background_run):
  """experiments.run --config.method=gme on smoke configs (with EmerG's
  MovieLens-100K run, every dataset and backbone kind once)."""
  if config in test_baselines_emerg.REAL:
    request.getfixturevalue("real_data")(*test_baselines_emerg.REAL[config])
  test_baselines_emerg.check_binary(background_run, "gme", backbone)
