"""Tests of stage 2: the mapper, its inputs, and its training."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emerflow_jax import align, align_diagnostics, closedform, protocol, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones, layers
from experiments.configs import common


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


# Closed-form maps, their cross-validation and the diagnostics.

def _regression(n=60, big_d=12, d=3, noise=0.1, seed=0):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(n, big_d)).astype(np.float32)
  e = (r @ rng.normal(size=(big_d, d)) + 0.5 + noise * rng.normal(size=(n, d)))
  return jnp.asarray(r), jnp.asarray(e.astype(np.float32))


def _np_ridge(r, e, lam):
  r, e = np.asarray(r, np.float64), np.asarray(e, np.float64)
  rc, ec = r - r.mean(0), e - e.mean(0)
  return np.linalg.solve(rc.T @ rc + lam * np.eye(r.shape[1]), rc.T @ ec)


def test_ridge_equals_normal_equations_for_wide_and_tall_inputs():
  for n, big_d in ((60, 12), (20, 50)):  # n > D and n < D (the ML-100K case)
    r, e = _regression(n=n, big_d=big_d)
    for lam in (0.1, 10.0):
      p = closedform.fit_ridge(r, e, lam)["linear"]
      np.testing.assert_allclose(p["w"], _np_ridge(r, e, lam), rtol=2e-3, atol=2e-4)
      want = (np.asarray(r[:4]) - np.asarray(r).mean(0)) @ _np_ridge(r, e, lam) + np.asarray(
          e).mean(0)
      np.testing.assert_allclose(align.apply("ridge", {"linear": p}, r[:4]), want,
                                 rtol=2e-3, atol=2e-4)


def test_huge_lambda_predicts_the_mean():
  r, e = _regression()
  p = closedform.fit_ridge(r, e, 1e9)
  np.testing.assert_allclose(align.apply("ridge", p, r), np.broadcast_to(e.mean(0), e.shape),
                             atol=1e-4)


def test_lowrank_projects_the_ridge_map_on_its_top_output_directions():
  r, e = _regression(d=4)
  w = _np_ridge(r, e, 1.0)
  rc = np.asarray(r, np.float64) - np.asarray(r).mean(0)
  _, _, vt = np.linalg.svd(rc @ w, full_matrices=False)
  for rank in (1, 2):
    got = closedform.fit_lowrank(r, e, 1.0, rank)["linear"]["w"]
    np.testing.assert_allclose(got, w @ vt[:rank].T @ vt[:rank], rtol=2e-3, atol=2e-4)
    assert np.linalg.matrix_rank(np.asarray(got), tol=1e-4) == rank
  full = closedform.fit_lowrank(r, e, 1.0, 4)["linear"]["w"]
  np.testing.assert_allclose(full, w, rtol=2e-3, atol=2e-4)


def test_knn_is_a_masked_softmax_average_of_the_nearest_old_items():
  rng = np.random.default_rng(1)
  r = jnp.asarray(rng.normal(size=(10, 5)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  sims = np.asarray(q / jnp.linalg.norm(q, axis=-1, keepdims=True)) @ np.asarray(
      r / jnp.linalg.norm(r, axis=-1, keepdims=True)).T
  p = closedform.fit_knn(r, e, 3, 0.2)
  got = np.asarray(align.apply("knn", p, q))
  for i in range(4):
    top = np.argsort(-sims[i])[:3]
    w = np.exp(sims[i, top] / 0.2)
    np.testing.assert_allclose(got[i], (w / w.sum()) @ np.asarray(e)[top], rtol=1e-4,
                               atol=1e-5)
  # k=1 returns the nearest item's embedding; an item outside every top-3
  # (its embedding changed) changes nothing.
  np.testing.assert_allclose(align.apply("knn", closedform.fit_knn(r, e, 1, 0.2), q),
                             np.asarray(e)[np.argmax(sims, 1)], rtol=1e-5)
  far = int(np.setdiff1d(np.arange(10), np.argsort(-sims, 1)[:, :3])[0])
  p2 = closedform.fit_knn(r, e.at[far].set(100.0), 3, 0.2)
  np.testing.assert_allclose(align.apply("knn", p2, q), got, rtol=1e-6)


def test_fit_cv_picks_the_lambda_with_the_lowest_out_of_fold_fvu():
  r, e = _regression(n=50, big_d=40, noise=2.0)
  key = jax.random.key(3)
  _, chosen, score = closedform.fit_cv("ridge", r, e, key, folds=5)
  fold = closedform.fold_ids(50, 5, key)
  assert sorted(np.bincount(fold)) == [10] * 5
  rn, en = np.asarray(r, np.float64), np.asarray(e, np.float64)
  scores = []
  for lam in closedform.LAMBDAS:
    pred = np.zeros_like(en)
    for f in range(5):
      tr, te = fold != f, fold == f
      pred[te] = (rn[te] - rn[tr].mean(0)) @ _np_ridge(rn[tr], en[tr], lam) + en[tr].mean(0)
    scores.append(((pred - en) ** 2).sum() / ((en - en.mean(0)) ** 2).sum())
  assert chosen["ridge_lambda"] == closedform.LAMBDAS[int(np.argmin(scores))]
  np.testing.assert_allclose(score, min(scores), rtol=1e-3)
  # A given lambda is kept, not searched.
  assert closedform.fit_cv("ridge", r, e, key, ridge_lambda=7.0)[1] == {"ridge_lambda": 7.0}


def test_mapper_applies_closed_forms_per_item_and_in_batch_without_recompiling():
  r, e = _regression()
  mapper = align.Mapper(out_dim=3)
  for kind in ("ridge", "lowrank", "knn"):
    for shrink in ("none", "global", "gate"):
      phi, _ = closedform.fit_phi(kind, r, e, jax.random.key(0), shrink=shrink)
      batch = mapper.apply(phi, r[:6])
      one = jax.vmap(lambda x: mapper.apply(phi, x))(r[:6])  # per-item, as meta vmaps
      np.testing.assert_allclose(one, batch, rtol=1e-5, atol=1e-6)
      if shrink == "none":
        np.testing.assert_allclose(batch, align.apply(kind, phi["params"]["closed"], r[:6]),
                                   rtol=1e-6)
  calls = []
  f = jax.jit(lambda p, x: (calls.append(1), mapper.apply(p, x))[1])
  f(phi, r[:6])
  f(jax.tree.map(lambda a: a + 0, phi), r[6:12])
  assert len(calls) == 1


def test_fit_mlp_lowers_the_mse_and_apply_rebuilds_its_mapper():
  r, e = _regression()
  phi = align.fit_mlp(r, e, jax.random.key(0), hidden=(8,), steps=200, lr=1e-2)
  assert closedform.fvu(align.apply("mlp", phi, r), e) < 0.5
  want = align.Mapper(out_dim=3, hidden=(8,)).apply(phi, r)
  np.testing.assert_array_equal(align.apply("mlp", phi, r), want)


def test_diagnostics_on_an_exact_text_recover_the_own_embedding():
  ds, split, model, tables, params = _setup()
  items = np.asarray(split.old_items)
  e = align.targets(params, tables, items)
  rows = tasks.pack_flat(ds, split.base_rows)
  d = align_diagnostics.diagnostics("ridge", e, e, items, model, params, tables, rows, jax.random.key(0),
                        folds=3, ridge_lambda=1e-8)
  assert d["heldout_fvu"] < 1e-3 and d["n_rows"] == len(split.base_rows)
  assert abs(d["heldout_auc"] - d["heldout_auc_own"]) < 1e-3
  with np.testing.assert_raises(ValueError):  # rows of items it was not given
    align_diagnostics.diagnostics("ridge", e[:-1], e[:-1], items[:-1], model, params, tables, rows,
                      jax.random.key(0), folds=3, ridge_lambda=1e-8)


def test_kind_options_default_to_what_the_config_sets_and_raise_under_other_kinds():
  cfg = common.base_config("synthetic", n_max=100, k=10).align
  for name, (kinds, default) in align.KIND_OPTIONS.items():
    value = cfg[name]
    assert (tuple(value) if isinstance(value, list) else value) == default, name
    assert set(kinds) <= set(align.KINDS), name
  align.check_options(cfg)  # the defaults pass under every kind
  for kind in align.KINDS:
    align.check_options(ml_collections.ConfigDict(dict(cfg.to_dict(), kind=kind)))
  bad = {"lowrank": {"steps": 20, "lam": 0.5, "hidden": (8,), "knn_k": 5},
         "mlp": {"rank": 3, "shrink": "gate", "folds": 3},
         "knn": {"ridge_lambda": 10.0}, "ridge": {"rank": 2, "knn_temperature": 0.1}}
  for kind, options in bad.items():
    for name, value in options.items():
      c = ml_collections.ConfigDict(dict(cfg.to_dict(), kind=kind, **{name: value}))
      with pytest.raises(ValueError, match=f"align.{name}="):
        align.check_options(c)
  ok = ml_collections.ConfigDict(dict(cfg.to_dict(), kind="lowrank", rank=3, ridge_lambda=1.0))
  align.check_options(ok)
  with pytest.raises(ValueError, match="align.kind must be one of"):
    align.check_options(ml_collections.ConfigDict(dict(cfg.to_dict(), kind="pca")))
