"""Tests of the shrunk cold prior, and the alignment end to end on synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import align, align_diagnostics, closedform, pretrain, prior, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones


def test_top_k_mask_marks_each_rows_k_largest():
  sims = jnp.asarray([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.4, 0.6]])
  np.testing.assert_array_equal(prior.top_k_mask(sims, jnp.asarray(2.0)),
                                [[False, True, True, False], [True, False, False, True]])
  # A traced k, and k clipped to the row length.
  np.testing.assert_array_equal(jax.jit(prior.top_k_mask)(sims, jnp.asarray(9.0)),
                                np.ones((2, 4), bool))


def test_global_factor_is_the_clipped_least_squares_shrink():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(30, 4))
  c = e.mean(0)
  g = c + 0.5 * (e - c) + 0.3 * rng.normal(size=e.shape)
  s = float(prior.global_factor(jnp.asarray(g), jnp.asarray(e), jnp.asarray(c)))
  grid = np.linspace(0, 1, 10001)
  loss = [np.sum((c + t * (g - c) - e) ** 2) for t in grid]
  assert abs(s - grid[int(np.argmin(loss))]) < 2e-4
  # Predictions that point away from the targets get no trust at all.
  anti = c - (e - c)
  assert float(prior.global_factor(jnp.asarray(anti), jnp.asarray(e), jnp.asarray(c))) == 0.0


def test_features_by_hand():
  r_ref = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  e_ref = jnp.asarray([[2.0], [4.0], [10.0]])
  r = jnp.asarray([[1.0, 1.0]])
  g = jnp.asarray([[3.0]])
  f = prior.features(r_ref, e_ref, r, g, jnp.asarray([1.0]), jnp.asarray(2.0),
                     jnp.asarray(2.0))
  # Neighbours: items 0 and 1 (cosine 1/sqrt2 each); their embeddings 2 and 4.
  np.testing.assert_allclose(f, [[1 / np.sqrt(2), 1.0 / 2.0, 4.0 / 2.0]], rtol=1e-5)


def test_gate_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  f = jnp.asarray(rng.normal(size=(20, 3)), jnp.float64 if jax.config.x64_enabled
                  else jnp.float32)
  e = jnp.asarray(rng.normal(size=(20, 4)), f.dtype)
  g = e + jnp.asarray(rng.normal(size=(20, 4)), f.dtype)
  c, scale = e.mean(0), jnp.asarray(1.3, f.dtype)
  theta = {"w": jnp.asarray([0.3, -0.2, 0.5], f.dtype), "b": jnp.asarray(0.1, f.dtype),
           "f_mu": f.mean(0), "f_sd": f.std(0)}
  loss = lambda p: prior.gate_loss(dict(theta, **p), f, g, e, c, scale, 0.05)
  p = {"w": theta["w"], "b": theta["b"]}
  grad = jax.grad(loss)(p)
  eps = 1e-3
  for i in range(3):
    dw = jnp.zeros(3).at[i].set(eps)
    fd = (loss(dict(p, w=p["w"] + dw)) - loss(dict(p, w=p["w"] - dw))) / (2 * eps)
    np.testing.assert_allclose(grad["w"][i], fd, rtol=2e-2, atol=1e-4)
  fd = (loss(dict(p, b=p["b"] + eps)) - loss(dict(p, b=p["b"] - eps))) / (2 * eps)
  np.testing.assert_allclose(grad["b"], fd, rtol=2e-2, atol=1e-4)


def _world(signal_share, n=200, seed=0):
  """Old items whose out-of-fold predictions hold a given share of the target."""
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(n, 4))
  r = rng.normal(size=(n, 6))
  oof = signal_share * e + rng.normal(size=e.shape)
  fold = np.arange(n) % 5
  return (jnp.asarray(x, jnp.float32) for x in (r, e, oof)), fold


@pytest.mark.parametrize("kind", ["global", "gate"])
def test_prior_trusts_informative_predictions_and_falls_back_to_the_mean(kind):
  (r, e, oof), fold = _world(1.0)
  p = prior.fit(kind, r, e, oof, fold)
  s = prior.factor(p, r, oof)
  assert 0.3 < float(s.mean()) < 0.7  # ~ 1 / (1 + 1): half signal, half noise
  shrunk = prior.apply(p, r, oof)
  assert closedform.fvu(shrunk, e) < min(closedform.fvu(oof, e), 1.0)
  # Predictions anti-correlated with the targets: exactly the mean.
  (r, e, oof), fold = _world(-1.0)
  p = prior.fit(kind, r, e, oof, fold)
  np.testing.assert_allclose(prior.apply(p, r, oof), np.broadcast_to(e.mean(0), e.shape),
                             atol=1e-6)


def test_gate_uses_neighbour_agreement():
  # Half the items' predictions are exact, half are noise; only the noisy
  # ones sit in a text region whose neighbours disagree.
  rng = np.random.default_rng(2)
  n = 300
  good = np.arange(n) < n // 2
  e = rng.normal(size=(n, 4))
  r = np.where(good[:, None], np.repeat(e, 2, 1)[:, :6], rng.normal(size=(n, 6)))
  r = r + np.where(good[:, None], 0.0, 5.0)
  oof = np.where(good[:, None], e, rng.normal(size=e.shape))
  r, e, oof = (jnp.asarray(x, jnp.float32) for x in (r, e, oof))
  fold = np.arange(n) % 5
  s = prior.factor(prior.fit("gate", r, e, oof, fold), r, oof)
  assert float(s[good].mean()) > float(s[~good].mean()) + 0.2
  glob = prior.fit("global", r, e, oof, fold)
  assert closedform.fvu(prior.apply(prior.fit("gate", r, e, oof, fold), r, oof), e) < closedform.fvu(
      prior.apply(glob, r, oof), e)


@pytest.fixture(scope="module")
def synthetic_backbone(tmp_path_factory):
  """A DeepFM pretrained on every row of a synthetic world (all items old)."""
  ds = synthetic.make_synthetic(n_users=300, n_items=300, mean_count=80, text_noise=0.3,
                                seed=0)
  model = backbones.make_backbone("deepfm", ds, dim=8, mlp=(16,))
  tables = backbones.make_tables(ds)
  rows = tasks.pack_flat(ds, np.arange(len(ds.labels)))
  params = pretrain.pretrain_backbone(model, tables, rows, jax.random.key(0), epochs=8,
                                      batch_size=256, lr=3e-3,
                                      ckpt_dir=tmp_path_factory.mktemp("bb"),
                                      log=lambda _: None)
  return ds, model, tables, rows, params


def test_informative_text_approaches_the_true_factors(synthetic_backbone):
  ds, model, tables, rows, params = synthetic_backbone
  items = np.arange(ds.n_items)
  e = align.targets(params, tables, items)
  run = lambda v, **kw: align_diagnostics.diagnostics(
      "ridge", align.standardize(v, items), e, items, model, params, tables, rows,
      jax.random.key(1), **kw)
  text = run(ds.item_vectors, shrink="gate")
  factors = run(ds.info["true_item_factors"])
  assert text["heldout_fvu"] < 0.95
  assert text["heldout_auc"] > text["heldout_auc_mean"] + 0.01
  assert text["heldout_auc"] > factors["heldout_auc"] - 0.005
  assert text["heldout_auc_shrunk"] > text["heldout_auc_mean"] + 0.01


@pytest.mark.parametrize("kind", ["ridge", "knn"])
def test_pure_noise_text_falls_back_to_the_mean_embedding(synthetic_backbone, kind):
  ds, model, tables, rows, params = synthetic_backbone
  noise = synthetic.make_synthetic(n_users=300, n_items=300, mean_count=80, text_noise=1e4,
                                   seed=0)  # same world, the text drowned in noise
  assert np.array_equal(noise.labels, ds.labels)
  items = np.arange(ds.n_items)
  d = align_diagnostics.diagnostics(kind, align.standardize(noise.item_vectors, items),
                        align.targets(params, tables, items), items, model, params, tables,
                        rows, jax.random.key(1), shrink="gate")
  assert d["heldout_fvu_shrunk"] < 1.01
  assert d["heldout_auc_shrunk"] >= d["heldout_auc_mean"] - 1e-3
