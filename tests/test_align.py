"""Tests of stage 2: the mapper, its inputs, and its training."""

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import align, protocol, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones, layers


def _setup():
  ds = synthetic.make_synthetic(n_users=80, n_items=60, mean_count=40, seed=1)
  split = protocol.split_emerging_items(ds, n_max=30, k=4)
  model = backbones.make_backbone("widedeep", ds, dim=4, mlp=(8,))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(0))
  return ds, split, model, tables, params


def test_standardize_uses_only_fit_items():
  v = np.arange(12, dtype=np.float32).reshape(6, 2)
  out = align.standardize(v, np.array([0, 1, 2]))
  np.testing.assert_allclose(out[:3].mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(out[:3].std(0), 1 / np.sqrt(2), rtol=1e-4)
  # Changing a non-fit item changes only that item's row.
  v2 = v.copy()
  v2[5] = 100
  out2 = align.standardize(v2, np.array([0, 1, 2]))
  np.testing.assert_array_equal(out[:5], out2[:5])


def test_side_embeddings_match_backbone_field_embedding():
  ds, _, model, tables, params = _setup()
  items = jnp.arange(5)
  side = align.item_side_embeddings(params, tables, items)
  users = jnp.zeros(5, jnp.int32)
  x = backbones.gather_inputs(tables, users, items)
  stack = layers.FieldEmbedding(model.vocab_sizes, 4).apply(
      {"params": params["params"]["embed"]}, x)
  keys = [k for k, _ in model.vocab_sizes]
  want = [stack[:, keys.index(k)] for k in sorted(tables)
          if k.startswith("item/") and k != backbones.ITEM_ID]
  np.testing.assert_allclose(side, jnp.concatenate(want, -1), rtol=1e-6)


def test_train_mapper_fits_targets_and_resumes(tmp_path):
  ds, split, model, tables, params = _setup()
  # Give the targets structure the mapper can learn from the text vectors.
  table = backbones.item_embedding_table(params)
  proj = jax.random.normal(jax.random.key(5), (ds.item_vectors.shape[1], 4)) * 0.05
  ids = np.asarray(tables[backbones.ITEM_ID])
  table = table.at[ids].set(jnp.asarray(ds.item_vectors) @ proj)
  params["params"]["embed"][backbones.ITEM_ID_PARAM] = table
  r = align.standardize(ds.item_vectors, split.old_items)
  mapper = align.Mapper(out_dim=4, hidden=(16,))
  rows = tasks.pack_flat(ds, split.base_rows)
  kw = dict(lr=3e-3, lam=0.1, batch_rows=64, weight_decay=0.0)

  def mse(phi):
    pred = mapper.apply(phi, jnp.asarray(r[split.old_items]))
    return float(jnp.mean(jnp.sum((pred - table[ids[split.old_items]]) ** 2, -1)))

  phi0 = mapper.init(jax.random.key(0), jnp.asarray(r[:2]))
  full = align.train_mapper(mapper, model, params, tables, r, None, split.old_items,
                            rows, jax.random.key(2), steps=60,
                            ckpt_dir=tmp_path / "a", **kw)
  assert mse(full) < 0.5 * mse(phi0)
  align.train_mapper(mapper, model, params, tables, r, None, split.old_items, rows,
                     jax.random.key(2), steps=30, ckpt_dir=tmp_path / "b", **kw)
  resumed = align.train_mapper(mapper, model, params, tables, r, None,
                               split.old_items, rows, jax.random.key(2), steps=60,
                               ckpt_dir=tmp_path / "b", **kw)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
