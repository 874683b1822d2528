"""Tests for models/emerg_gnn.py: EmerG's GNN backbone and its item-graph hook."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import pretrain, tasks, warmup
from emerflow_jax.models import backbones, emerg_gnn


@pytest.fixture(scope="module")
def world(tiny_ds, random_params):
  model = backbones.make_backbone("emerg_gnn", tiny_ds, dim=4)
  tables = backbones.make_tables(tiny_ds)
  return model, tables, random_params(model, tables, seed=1)


def _rows(seed: int, n: int = 8):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 60, n), jnp.int32),
          jnp.asarray(rng.integers(0, 40, n), jnp.int32))


def test_factory_builds_the_gnn(world, tiny_ds):
  model, _, params = world
  assert isinstance(model, emerg_gnn.EmerGGNN) and model.kind == "emerg_gnn"
  f = len(tiny_ds.user_fields) + len(tiny_ds.item_fields)
  assert model.n_fields == f and model.graph_size == 3 * f * f
  assert emerg_gnn.global_graph(params).shape == (3, f, f)
  assert backbones.item_embedding_table(params).shape == (tiny_ds.n_items + 1, 4)


def test_default_graph_is_the_global_graph(world):
  model, tables, params = world
  u, i = _rows(0)
  none = backbones.score(model, params, tables, u, i)
  ids = jnp.take(backbones.item_embedding_table(params), backbones.item_ids(tables, i), 0)
  with_id = backbones.score(model, params, tables, u, i, ids)
  g = jnp.broadcast_to(emerg_gnn.global_graph(params), (8,) + emerg_gnn.global_graph(params).shape)
  with_graph = backbones.score(model, params, tables, u, i, emerg_gnn.item_input(ids, g))
  np.testing.assert_allclose(with_id, none, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(with_graph, none, rtol=1e-6, atol=1e-7)


def test_an_item_graph_changes_only_its_own_rows(world):
  model, tables, params = world
  u, i = _rows(1)
  ids = jnp.take(backbones.item_embedding_table(params), backbones.item_ids(tables, i), 0)
  g = jnp.broadcast_to(emerg_gnn.global_graph(params), (8,) + emerg_gnn.global_graph(params).shape)
  g2 = g.at[3].add(jax.random.normal(jax.random.key(0), g.shape[1:]))
  a = backbones.score(model, params, tables, u, i, emerg_gnn.item_input(ids, g))
  b = backbones.score(model, params, tables, u, i, emerg_gnn.item_input(ids, g2))
  changed = np.abs(np.asarray(a - b)) > 1e-6
  assert changed[3] and not changed[np.arange(8) != 3].any()


def test_wrong_item_input_width_raises(world):
  model, tables, params = world
  u, i = _rows(2)
  with pytest.raises(ValueError, match="emerg_gnn: item_emb has width 7"):
    backbones.score(model, params, tables, u, i, jnp.zeros((8, 7)))


def test_grad_wrt_item_graph_matches_finite_differences(world):
  model, tables, params = world
  u, i = _rows(3)
  labels = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
  rng = np.random.default_rng(4)
  width = model.dim + model.graph_size
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    rep = jnp.asarray(rng.normal(size=(8, width)), jnp.float64)
    v = jnp.asarray(rng.normal(size=(8, width)), jnp.float64)

    def loss(r):
      return backbones.bce_loss(backbones.score(model, p64, tables, u, i, r), labels)

    g = jax.jit(jax.grad(loss))(rep)
    f = jax.jit(loss)
    h = 1e-6
    fd = (f(rep + h * v) - f(rep - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6)
    assert abs(float(fd)) > 1e-4
    assert float(jnp.abs(g[:, model.dim:]).max()) > 1e-6  # the graph part matters


def test_vmapped_score_equals_per_item_loop(world):
  model, tables, params = world
  rng = np.random.default_rng(5)
  users = jnp.asarray(rng.integers(0, 60, (5, 6)), jnp.int32)
  items = jnp.asarray(np.repeat(rng.integers(0, 40, (5, 1)), 6, 1), jnp.int32)
  reps = jnp.asarray(rng.normal(size=(5, model.dim + model.graph_size)), jnp.float32)
  fn = lambda r, uu, ii: backbones.score(model, params, tables, uu, ii,
                                         jnp.broadcast_to(r, uu.shape + r.shape))
  batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0)))(reps, users, items)
  loop = np.stack([np.asarray(jax.jit(fn)(reps[j], users[j], items[j])) for j in range(5)])
  np.testing.assert_allclose(batched, loop, rtol=1e-5, atol=1e-6)


def test_pretrains_and_the_shared_warmup_runs_on_it(tiny_ds, tiny_split, tmp_path):
  """The harness path every other method (EmerFlow included) takes: d-wide embeddings."""
  model = backbones.make_backbone("emerg_gnn", tiny_ds, dim=4)
  tables = backbones.make_tables(tiny_ds)
  rows = tasks.pack_flat(tiny_ds, tiny_split.base_rows)
  params = pretrain.pretrain_backbone(model, tables, rows, jax.random.key(0), epochs=5,
                                      batch_size=64, lr=1e-3, ckpt_dir=tmp_path / "bb",
                                      log=lambda _: None)
  logits = backbones.score(model, params, tables, jnp.asarray(rows["users"]),
                           jnp.asarray(rows["items"]))
  loss = float(backbones.bce_loss(logits, jnp.asarray(rows["labels"])))
  untrained = backbones.init_params(model, tables, jax.random.key(0))
  loss0 = float(backbones.bce_loss(backbones.score(
      model, untrained, tables, jnp.asarray(rows["users"]), jnp.asarray(rows["items"])),
      jnp.asarray(rows["labels"])))
  assert loss < loss0 - 0.005
  batch = {k: jnp.asarray(v) for k, v in
           tasks.pack_phase(tiny_ds, tiny_split.warm_rows["warm_a"]).items()}
  emb = jnp.zeros((batch["users"].shape[0], 4))
  out = warmup.finetune(model, params, tables, emb, batch, steps=3, lr=1e-2)
  assert out.shape == emb.shape and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out).max()) > 0
