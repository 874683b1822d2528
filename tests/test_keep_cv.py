"""posterior.choose_keep: the share of content regeneration chosen by CV over each item's own rows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import meta, posterior, rule
from emerflow_jax.models import scoring

import test_posterior

KEEPS = (0.0, 0.25, 0.5, 0.75, 1.0)
CFG = meta.MetaConfig(inner_steps=4, rule="adam", phase_alpha=False)
LAM = 1.0


def _world(n_new=60, k=8, n_old=150, text="informative", start="mean", seed=0):
  """A frozen backbone whose rows are drawn from true item embeddings; old items
  keep their true embeddings, new ones start at ``start`` ("mean": the old
  items' mean, "truth": their own). Text vectors are a linear image of the
  true embedding plus a little noise ("informative") or pure noise ("noise")."""
  model, params, tables, true, _, batch = test_posterior._pool_world(
      n_old + n_new, k, seed=seed)
  rng = np.random.default_rng(seed + 7)
  if text == "informative":
    r = np.asarray(true) @ rng.normal(size=(8, 12)) + 0.1 * rng.normal(size=(len(true), 12))
  else:
    r = rng.normal(size=(len(true), 12))
  r = jnp.asarray(r, jnp.float32)
  new = slice(n_old, None)
  emb = (jnp.broadcast_to(true[:n_old].mean(0), (n_new, 8)) if start == "mean"
         else true[new])
  rows = {key: v[new] for key, v in batch.items()}
  frozen = {"params": params, "tables": tables}
  return model, frozen, emb, rows, r[:n_old], true[:n_old], r[new]


def _choose(model, frozen, emb, rows, r_old, e_old, r_new, alpha=0.05, folds=3):
  mp = {"log_alpha": jnp.log(jnp.asarray(alpha, jnp.float32))}
  return posterior.choose_keep(mp, model, CFG, frozen, emb, rows, 0,
                               jnp.asarray(KEEPS, jnp.float32), folds, r_old, e_old, r_new,
                               LAM)


def test_the_vmapped_cv_equals_a_loop_over_folds_items_and_shares():
  model, frozen, emb, rows, r_old, e_old, r_new = _world(n_new=6, k=5, n_old=20)
  rows["mask"] = rows["mask"].at[2, 3:].set(0.0)  # an item with fewer rows
  alpha, folds = 0.05, 2
  _, got = _choose(model, frozen, emb, rows, r_old, e_old, r_new, alpha, folds)
  loss_fn = lambda e, r: scoring.item_loss(model, frozen["params"], frozen["tables"], e, r)
  total = np.zeros(len(KEEPS))
  for f in range(folds):
    held, adapted = [], []
    for i in range(6):
      valid = np.flatnonzero(np.asarray(rows["mask"][i]))
      h = valid[np.arange(len(valid)) % folds == f]           # the item's j-th row: fold j % F
      held.append(h)
      sup = {k: rows[k][i, np.setdiff1d(valid, h)] for k in ("users", "items", "labels", "mask")}
      adapted.append(rule.adapt(loss_fn, emb[i], sup, jnp.asarray(alpha), CFG.inner_steps,
                                rule="adam"))
    adapted = jnp.stack(adapted)
    # Each new item predicted from every other item, old ones and the other adapted new ones.
    loo = posterior.loo_ridge(jnp.concatenate([r_old, r_new]),
                              jnp.concatenate([e_old, adapted]), jnp.asarray(LAM))[len(r_old):]
    for ki, k in enumerate(KEEPS):
      for i in range(6):
        logits = scoring.item_logits(model, frozen["params"], frozen["tables"],
                                     k * adapted[i] + (1 - k) * loo[i],
                                     {key: rows[key][i, held[i]] for key in ("users", "items")})
        total[ki] += float(jnp.sum(optax.sigmoid_binary_cross_entropy(
            logits, rows["labels"][i, held[i]])))
  want = total[KEEPS.index(1.0)] - total
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)


def test_text_that_predicts_the_embedding_is_blended_in_and_noise_is_not():
  # New items start at the mean and the rule barely moves them in a few rows:
  # text that predicts their embeddings scores held-out rows clearly better.
  world = _world(text="informative", start="mean")
  keep, gains = _choose(*world, alpha=0.01)
  assert float(keep) < 1.0 and float(gains[KEEPS.index(float(keep))]) > 0
  # New items already at their truth and text that knows nothing: any blend
  # pulls them away, so no regeneration.
  keep, gains = _choose(*_world(text="noise", start="truth"), alpha=0.01)
  assert float(keep) == 1.0 and np.all(np.asarray(gains)[:-1] < 0)


def test_padded_rows_change_nothing_wherever_they_sit():
  model, frozen, emb, rows, r_old, e_old, r_new = _world(n_new=12, k=6, n_old=40)
  want = _choose(model, frozen, emb, rows, r_old, e_old, r_new)
  pad = {k: jnp.concatenate([v[:, :2], v], 1) for k, v in rows.items()}  # in front
  pad["labels"] = pad["labels"].at[:, :2].set(1.0 - rows["labels"][:, :2])
  pad["mask"] = pad["mask"].at[:, :2].set(0.0)
  got = _choose(model, frozen, emb, pad, r_old, e_old, r_new)
  assert float(got[0]) == float(want[0])
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-3)


def test_phases_and_shares_reuse_one_compiled_program():
  model, frozen, emb, rows, r_old, e_old, r_new = _world(n_new=12, k=6, n_old=40)
  mp = {"log_alpha": jnp.log(jnp.full((3,), 0.05, jnp.float32))}
  cfg = meta.MetaConfig(inner_steps=4, rule="adam", phase_alpha=True)
  before = posterior.choose_keep._cache_size()
  for phase in range(3):
    out = posterior.choose_keep(mp, model, cfg, frozen, emb, rows, jnp.asarray(phase),
                                jnp.asarray(KEEPS, jnp.float32), 3, r_old, e_old, r_new,
                                jnp.asarray(LAM + phase, jnp.float32))
    jax.block_until_ready(out)
  assert posterior.choose_keep._cache_size() == before + 1
