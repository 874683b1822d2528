"""rule.choose_step_scale: the rule's step size rescaled by CV over each item's own rows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import meta, rule
from emerflow_jax.models import scoring

import test_posterior

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
CFG = meta.MetaConfig(inner_steps=4, rule="adam", phase_alpha=False)


def _world(n_items=40, k=9, offset=0.0, seed=0):
  """``test_posterior``'s world (a frozen backbone, rows drawn from true item
  embeddings), with starting embeddings ``offset`` away from the truth in a
  random direction per item."""
  model, params, tables, true, _, batch = test_posterior._pool_world(n_items, k, seed=seed)
  direction = np.random.default_rng(seed + 1).normal(size=(n_items, 8))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  emb = true + offset * jnp.asarray(direction, jnp.float32)
  return model, {"params": params, "tables": tables}, emb, batch


def _choose(model, frozen, emb, batch, alpha, folds=3):
  mp = {"log_alpha": jnp.log(jnp.asarray(alpha, jnp.float32))}
  return rule.choose_step_scale(mp, model, CFG, frozen, emb, batch, 0,
                                jnp.asarray(SCALES, jnp.float32), folds=folds)


def test_the_vmapped_cv_equals_a_loop_over_scales_folds_and_items():
  model, frozen, emb, batch = _world(n_items=6, k=5, offset=2.0)
  batch["mask"] = batch["mask"].at[2, 3:].set(0.0)  # an item with fewer rows
  alpha, folds = 0.05, 2
  _, got = _choose(model, frozen, emb, batch, alpha, folds=folds)
  loss_fn = lambda e, r: scoring.item_loss(model, frozen["params"], frozen["tables"], e, r)
  total = np.zeros(len(SCALES))
  for si, s in enumerate(SCALES):
    for i in range(6):
      valid = np.flatnonzero(np.asarray(batch["mask"][i]))
      for f in range(folds):
        held = valid[np.arange(len(valid)) % folds == f]       # the item's j-th row: fold j % F
        sup = np.setdiff1d(valid, held)
        rows = {k: batch[k][i, sup] for k in ("users", "items", "labels", "mask")}
        e = rule.adapt(loss_fn, emb[i], rows, jnp.asarray(s * alpha), CFG.inner_steps,
                       rule="adam")
        logits = scoring.item_logits(model, frozen["params"], frozen["tables"], e,
                                     {k: batch[k][i, held] for k in ("users", "items")})
        total[si] += float(jnp.sum(optax.sigmoid_binary_cross_entropy(
            logits, batch["labels"][i, held])))
  want = total[SCALES.index(1.0)] - total
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_a_step_too_small_for_the_population_is_scaled_up_and_a_right_one_is_kept():
  # Items start far from the truth and the rule barely moves them: bigger steps
  # score the held-out rows clearly better.
  model, frozen, emb, batch = _world(n_items=60, k=20, offset=8.0)
  scale, gains = _choose(model, frozen, emb, batch, alpha=0.02)
  assert float(scale) > 1.0 and float(gains[SCALES.index(float(scale))]) > 0
  # Items already at the truth: no larger step can help on held-out rows.
  model, frozen, emb, batch = _world(n_items=60, k=20, offset=0.0)
  scale, _ = _choose(model, frozen, emb, batch, alpha=0.05)
  assert float(scale) <= 1.0


def test_padded_rows_change_nothing_wherever_they_sit():
  model, frozen, emb, batch = _world(n_items=12, k=6, offset=3.0)
  want = _choose(model, frozen, emb, batch, alpha=0.02)
  pad = {k: jnp.concatenate([v[:, :2], v], 1) for k, v in batch.items()}  # in front
  pad["labels"] = pad["labels"].at[:, :2].set(1.0 - batch["labels"][:, :2])
  pad["mask"] = pad["mask"].at[:, :2].set(0.0)
  got = _choose(model, frozen, emb, pad, alpha=0.02)
  assert float(got[0]) == float(want[0])
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-4)


def test_scaled_multiplies_every_step_size():
  mp = {"log_alpha": jnp.log(jnp.asarray([0.01, 0.02])), "other": 1}
  out = rule.scaled(mp, jnp.asarray(4.0))
  np.testing.assert_allclose(np.exp(np.asarray(out["log_alpha"])), [0.04, 0.08], rtol=1e-6)
  assert out["other"] == 1 and np.allclose(np.exp(mp["log_alpha"]), [0.01, 0.02])


def _choose_forward(model, frozen, emb, prev, batch, alpha):
  mp = {"log_alpha": jnp.log(jnp.asarray(alpha, jnp.float32))}
  return rule.choose_step_scale_forward(mp, model, CFG, frozen, emb, prev, batch, 0,
                                        jnp.asarray(SCALES, jnp.float32))


def _two_phases(n_items=60, k=10, offset=0.0, seed=0):
  """``_world`` with the rows split in two: the previous phase's and this one's."""
  model, frozen, emb, batch = _world(n_items, 2 * k, offset, seed)
  prev = {key: v[:, :k] for key, v in batch.items()}
  now = {key: v[:, k:] for key, v in batch.items()}
  return model, frozen, emb, prev, now


def test_the_forward_cv_equals_a_loop_over_scales_and_items():
  model, frozen, emb, prev, now = _two_phases(n_items=6, k=4, offset=2.0)
  prev["mask"] = prev["mask"].at[2, 2:].set(0.0)   # fewer rows in the previous phase
  now["mask"] = now["mask"].at[4, 3:].set(0.0)     # ... and in this one
  alpha = 0.05
  _, got = _choose_forward(model, frozen, emb, prev, now, alpha)
  loss_fn = lambda e, r: scoring.item_loss(model, frozen["params"], frozen["tables"], e, r)
  total = np.zeros(len(SCALES))
  for si, s in enumerate(SCALES):
    for i in range(6):
      old = np.flatnonzero(np.asarray(prev["mask"][i]))
      new = np.flatnonzero(np.asarray(now["mask"][i]))
      rows = {key: prev[key][i, old] for key in ("users", "items", "labels", "mask")}
      e = rule.adapt(loss_fn, emb[i], rows, jnp.asarray(s * alpha), CFG.inner_steps,
                     rule="adam")
      logits = scoring.item_logits(model, frozen["params"], frozen["tables"], e,
                                   {key: now[key][i, new] for key in ("users", "items")})
      total[si] += float(jnp.sum(optax.sigmoid_binary_cross_entropy(
          logits, now["labels"][i, new])))
  want = total[SCALES.index(1.0)] - total
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_a_step_that_undershoots_the_next_rows_is_scaled_up_and_a_right_one_is_kept():
  model, frozen, emb, prev, now = _two_phases(offset=8.0)
  scale, gains = _choose_forward(model, frozen, emb, prev, now, alpha=0.02)
  assert float(scale) > 1.0 and float(gains[SCALES.index(float(scale))]) > 0
  model, frozen, emb, prev, now = _two_phases(offset=0.0)
  scale, _ = _choose_forward(model, frozen, emb, prev, now, alpha=0.05)
  assert float(scale) <= 1.0


def test_the_forward_cv_compiles_once_for_both_phases():
  model, frozen, emb, prev, now = _two_phases(n_items=12, k=5, offset=3.0)
  mp = {"log_alpha": jnp.log(jnp.full((3,), 0.05, jnp.float32))}
  cfg = meta.MetaConfig(inner_steps=4, rule="adam", phase_alpha=True)
  before = rule.choose_step_scale_forward._cache_size()
  for prev_phase in (0, 1):
    jax.block_until_ready(rule.choose_step_scale_forward(
        mp, model, cfg, frozen, emb, prev, now, jnp.asarray(prev_phase, jnp.int32),
        jnp.asarray(SCALES, jnp.float32)))
  assert rule.choose_step_scale_forward._cache_size() == before + 1
