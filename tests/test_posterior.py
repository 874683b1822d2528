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
