"""posterior: leave-one-out ridge against explicit refits, and the regeneration blend."""

import numpy as np
import jax.numpy as jnp

from emerflow_jax import posterior


def _data(n=30, dim_in=6, dim_out=3, seed=0):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(n, dim_in)).astype(np.float64)
  e = r @ rng.normal(size=(dim_in, dim_out)) + 0.3 * rng.normal(size=(n, dim_out)) + 2.0
  return r, e


def _ridge_fit_predict(r, e, lam, x):
  """Ridge with an unpenalised intercept (centred inputs), fitted from scratch."""
  mu_r, mu_e = r.mean(0), e.mean(0)
  w = np.linalg.solve((r - mu_r).T @ (r - mu_r) + lam * np.eye(r.shape[1]),
                      (r - mu_r).T @ (e - mu_e))
  return (x - mu_r) @ w + mu_e


def test_loo_equals_refitting_without_each_row():
  r, e = _data()
  lam = 3.0
  got = np.asarray(posterior.loo_ridge(jnp.asarray(r), jnp.asarray(e), jnp.asarray(lam)))
  want = np.stack([_ridge_fit_predict(np.delete(r, i, 0), np.delete(e, i, 0), lam,
                                      r[i:i + 1])[0] for i in range(len(r))])
  # The intercept's leverage is the centred-OLS 1/n: exact up to the shift of
  # the centring itself, which is O(1/n) smaller still.
  np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02)
  # ... and far from the in-sample fit, which has seen row i.
  insample = _ridge_fit_predict(r, e, lam, r)
  assert np.abs(got - insample).mean() > 5 * np.abs(got - want).mean()


def test_loo_without_intercept_shift_is_exact_for_centred_data():
  r, e = _data()
  r, e = r - r.mean(0), e - e.mean(0)
  lam = 1.0
  got = np.asarray(posterior.loo_ridge(jnp.asarray(r), jnp.asarray(e), jnp.asarray(lam)))
  hat = r @ np.linalg.solve(r.T @ r + lam * np.eye(r.shape[1]), r.T)
  h = np.diag(hat) + 1.0 / len(r)
  want = (hat @ e - h[:, None] * e) / (1 - h)[:, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32


def test_regenerate_blends_with_the_prediction_from_other_items_only():
  r, e = _data(n=40)
  old, new = slice(0, 30), slice(30, 40)
  noisy = e[new] + np.random.default_rng(1).normal(size=e[new].shape)
  kept = posterior.regenerate(jnp.asarray(r[old]), jnp.asarray(e[old]),
                              jnp.asarray(r[new]), jnp.asarray(noisy), 10.0, 1.0)
  np.testing.assert_array_equal(kept, jnp.asarray(noisy))  # keep = 1: off
  out = np.asarray(posterior.regenerate(jnp.asarray(r[old]), jnp.asarray(e[old]),
                                        jnp.asarray(r[new]), jnp.asarray(noisy), 10.0, 0.5))
  loo = np.asarray(posterior.loo_ridge(jnp.asarray(r), jnp.asarray(np.concatenate(
      [e[old], noisy])), jnp.asarray(10.0)))[30:]
  np.testing.assert_allclose(out, 0.5 * noisy + 0.5 * loo, rtol=1e-5, atol=1e-5)
  # Content predicts the truth better than the noisy adapted embedding does.
  assert np.mean((out - e[new]) ** 2) < np.mean((noisy - e[new]) ** 2)


def test_choose_lambda_prefers_strong_penalties_for_pure_noise():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(50, 20))
  e = rng.normal(size=(50, 4))  # text says nothing about the embedding
  assert posterior.choose_lambda(r, e) >= 1e3
  r2, e2 = _data(n=200, dim_in=5)  # informative: a light penalty
  assert posterior.choose_lambda(r2, e2) <= 10.0


def _pool_world(n_items=120, k=8, shift=0.0, seed=0, label_seed=None):
  """A frozen backbone, rows whose labels it draws from the true embeddings,
  and the true embeddings moved by one shared ``shift`` (what a population of
  new items might need)."""
  import jax  # pylint: disable=g-import-not-at-top
  from emerflow_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from emerflow_jax.models import backbones, scoring  # pylint: disable=g-import-not-at-top
  ds = synthetic.make_synthetic(n_users=60, n_items=n_items, mean_count=20, seed=seed)
  model = backbones.make_backbone("deepfm", ds, dim=8, mlp=(8,))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  true = jnp.asarray(2.0 * rng.normal(size=(n_items, 8)), jnp.float32)
  if label_seed is not None:  # the same world, other rows
    rng = np.random.default_rng(label_seed)
  users = jnp.asarray(rng.integers(0, ds.n_users, size=(n_items, k)), jnp.int32)
  items = jnp.repeat(jnp.arange(n_items, dtype=jnp.int32)[:, None], k, 1)
  raw = {"users": users, "items": items}
  logits = jax.vmap(scoring.item_logits, in_axes=(None, None, None, 0, 0))(
      model, params, tables, true, raw)
  labels = (rng.random(size=(n_items, k)) < np.asarray(jax.nn.sigmoid(logits))).astype(
      np.float32)
  batch = dict(raw, labels=jnp.asarray(labels), mask=jnp.ones((n_items, k), jnp.float32))
  emb = true - shift * jnp.ones((8,), jnp.float32)
  return model, params, tables, true, emb, batch


def _bce(model, params, tables, emb, batch):
  """Mean BCE of the rows of ``batch`` (all valid) under item embeddings ``emb``."""
  import jax  # pylint: disable=g-import-not-at-top
  from emerflow_jax.models import scoring  # pylint: disable=g-import-not-at-top
  return float(jnp.mean(jax.vmap(scoring.item_loss, in_axes=(None, None, None, 0, 0))(
      model, params, tables, emb, batch)))


def _pool(model, params, tables, emb, batch, prior=None, lambdas=posterior.POOL_LAMBDAS,
          seed=0):
  import jax  # pylint: disable=g-import-not-at-top
  prior = jnp.zeros((emb.shape[0], 0)) if prior is None else prior
  return posterior.pooled_correction(model, params, tables, emb, prior, batch,
                                     jax.random.key(seed), steps=50, lr=0.05,
                                     lambdas=jnp.asarray(lambdas, jnp.float32), folds=5)


def test_pooled_correction_recovers_a_shared_shift_and_leaves_none_alone():
  model, params, tables, true, emb, batch = _pool_world(shift=1.5)
  out, lam = _pool(model, params, tables, emb, batch)
  assert np.isfinite(float(lam))  # CV over items found the shift worth fitting
  # Fresh rows of the same items (the same world, other draws) score better:
  # the correction closes a good part of the gap to the true embeddings.
  *_, fresh = _pool_world(shift=1.5, k=16, label_seed=7)
  before, after, best = (_bce(model, params, tables, e, fresh) for e in (emb, out, true))
  assert after < before and (after - best) < 0.6 * (before - best)
  # Every item moves by the same vector (no prior: a shift only).
  moved = np.asarray(out - emb)
  np.testing.assert_allclose(moved, np.broadcast_to(moved[0], moved.shape), atol=1e-5)
  # Without a shift the population has nothing in common to correct.
  model, params, tables, true, emb, batch = _pool_world(shift=0.0)
  out, lam = _pool(model, params, tables, emb, batch)
  assert float(lam) == np.inf
  np.testing.assert_array_equal(np.asarray(out), np.asarray(emb))


def test_pooled_correction_ignores_padded_rows():
  model, params, tables, _, emb, batch = _pool_world(shift=1.0)
  want, _ = _pool(model, params, tables, emb, batch)
  padded = {k: jnp.concatenate([v, v[:, :3]], 1) for k, v in batch.items()}
  padded["labels"] = padded["labels"].at[:, -3:].set(1.0 - batch["labels"][:, :3])
  padded["mask"] = padded["mask"].at[:, -3:].set(0.0)
  got, _ = _pool(model, params, tables, emb, padded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_fold_fit_by_weights_equals_the_fit_on_that_fold_s_items_alone():
  """The CV fits every fold at once through item weights; each equals a plain fit."""
  from emerflow_jax.models import scoring  # pylint: disable=g-import-not-at-top
  model, params, tables, true, emb, batch = _pool_world(n_items=40, shift=1.0)
  prior = true[:, :3] - true[:, :3].mean(0)
  keep = np.arange(40) % 4 != 1
  rows = scoring.prepare(model, params, tables, batch)
  sub = {k: v[keep] for k, v in batch.items()}
  got = posterior._fit_correction(model, params, tables, emb, prior, rows,
                                  jnp.asarray(keep, jnp.float32), 30, 0.05, 1e-3)
  want = posterior._fit_correction(model, params, tables, emb[keep], prior[keep],
                                   scoring.prepare(model, params, tables, sub),
                                   jnp.ones(int(keep.sum())), 30, 0.05, 1e-3)
  for a, b in zip(jax_leaves(got), jax_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
