"""Content-based regeneration after a warm phase: every new item's rows inform the prior.

After phase p each new item has an embedding adapted from its own K rows.
Alone those are noisy; together with the old items they are also many more
(text, embedding) pairs than the old items alone.  CVAR exploits this by
re-training its content generator on the warm rows; here the same idea is a
closed form: a ridge map from text r to embedding, fitted on the old items'
pretrained embeddings *and* the new items' adapted ones, predicts each new
item **leave-one-out** (from every other item, never from itself), and the
item keeps a share ``keep_p`` of its own adapted embedding::

    e_i <- keep_p * e_i + (1 - keep_p) * ridge_{-i}(r_i)

Leave-one-out predictions of ridge come from one fit through the hat matrix
(``loo_ridge``), so the step costs one [D, D] solve per phase.  Only rows the
protocol has revealed (the phases so far) enter; the test rows never do.

``pooled_correction`` learns from the same rows in the other direction: one
correction shared by every new item, fitted on all their phase rows pooled
(K rows per item, but K x n in all), before each item's own steps::

    e_i <- e_i + delta + A^T (e0_i - c)

with e0_i the item's cold (aligned) embedding and c the old-item mean: delta
is the shift the new items need as a population (they are newer and rarer
than the old items the backbone was fit on), and A re-weighs the aligned
content prior by what the rows say about it.

``choose_keep`` picks ``keep_p`` itself from the new items' own phase rows, by
row-fold cross-validation (``regen.keep_cv``): the validation holdout's old
items cannot say how well text predicts the embeddings of new ones.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import rule
from emerflow_jax.models import backbones, scoring

if TYPE_CHECKING:
  from emerflow_jax import meta  # pylint: disable=g-bad-import-order

LAMBDAS = (1.0, 10.0, 100.0, 1e3, 1e4)


@jax.jit
def loo_ridge(r: jnp.ndarray, e: jnp.ndarray, lam: jnp.ndarray) -> jnp.ndarray:
  """Leave-one-out predictions of a ridge map r -> e with an intercept.

  Args:
    r: [n, D] inputs.
    e: [n, d] targets.
    lam: [] ridge penalty (the intercept is not penalised).

  Returns:
    [n, d]: row i predicted by the map fitted on every row but i.
  """
  n = r.shape[0]
  mu_r, mu_e = r.mean(0), e.mean(0)
  rc, ec = r - mu_r, e - mu_e
  gram = rc.T @ rc + lam * jnp.eye(r.shape[1], dtype=r.dtype)
  inv_rt = jnp.linalg.solve(gram, rc.T)            # [D, n]
  pred = rc @ (inv_rt @ ec) + mu_e
  # Leverage of row i: its ridge part plus the intercept's 1/n (centred inputs).
  h = jnp.sum(rc * inv_rt.T, axis=1) + 1.0 / n
  return (pred - h[:, None] * e) / (1.0 - h)[:, None]


def choose_lambda(r: np.ndarray, e: np.ndarray, lambdas: Sequence[float] = LAMBDAS
                  ) -> float:
  """The penalty with the smallest leave-one-out squared error on (r, e).

  Args:
    r: [n, D] old items' text vectors.
    e: [n, d] their pretrained embeddings.
    lambdas: candidates.

  Returns:
    The chosen penalty.
  """
  r, e = jnp.asarray(r), jnp.asarray(e)
  errs = [float(jnp.mean((loo_ridge(r, e, jnp.asarray(lam, r.dtype)) - e) ** 2))
          for lam in lambdas]
  return float(lambdas[int(np.argmin(errs))])


def regenerate(r_old: jnp.ndarray, e_old: jnp.ndarray, r_new: jnp.ndarray,
               e_new: jnp.ndarray, lam: float, keep: float) -> jnp.ndarray:
  """Blends each new item's embedding with its leave-one-out content prediction.

  Args:
    r_old: [m, D] old items' text vectors.
    e_old: [m, d] their (frozen) embeddings.
    r_new: [n, D] the new items' text vectors.
    e_new: [n, d] their embeddings after the phase.
    lam: ridge penalty.
    keep: share of the item's own embedding kept (1 = no regeneration; a []
      array, as ``choose_keep`` returns, is blended whatever its value: at 1
      that gives ``e_new`` exactly).

  Returns:
    [n, d] blended embeddings.
  """
  if isinstance(keep, (int, float)) and keep >= 1.0:
    return e_new
  r = jnp.concatenate([r_old, r_new], 0)
  e = jnp.concatenate([e_old, e_new], 0)
  loo = loo_ridge(r, e, jnp.asarray(lam, r.dtype))[r_old.shape[0]:]
  return keep * e_new + (1.0 - keep) * loo


KEEP_Z = 2.0    # content regeneration is kept only above this many standard errors of gain


@functools.partial(jax.jit, static_argnames=("model", "cfg", "folds"))
def choose_keep(meta_params: dict[str, Any], model: backbones.Backbone,
                cfg: "meta.MetaConfig", frozen: dict[str, Any], emb: jnp.ndarray,
                batch: dict[str, jnp.ndarray], phase: Any, keeps: jnp.ndarray,
                folds: int, r_old: jnp.ndarray, e_old: jnp.ndarray, r_new: jnp.ndarray,
                lam: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """How much content regeneration this population's own rows support, by row-fold CV.

  ``posterior.regenerate`` blends each new item's adapted embedding with a
  leave-one-out ridge prediction from text, ``keep * e + (1 - keep) * loo``.
  Whether that helps depends on how well the text predicts *these* items'
  embeddings, which old items (the validation holdout) cannot tell: they are
  older and better known.  So the share is chosen on the new items' own phase
  rows, as ``choose_step_scale`` chooses the step size: each item's valid rows
  are dealt into ``folds`` folds in time order; for fold f every item is
  adapted by the rule (step size of ``meta_params``) from ``emb`` on its rows
  outside f, the ridge is refit on the old items and these adapted
  embeddings, every candidate blend is scored (BCE) on the rows in f.  The
  share with the lowest held-out loss summed over items is kept only when its
  gain over keep = 1 (no regeneration) is above ``KEEP_Z`` standard errors of
  its mean over items; otherwise it is 1.  Only the phase's rows enter.

  Args:
    meta_params: holds the learned ``log_alpha`` (already rescaled, if it is).
    model: the frozen backbone module.
    cfg: the inner-loop settings.
    frozen: backbone params and tables.
    emb: [n, d] the items' embeddings before the phase's steps.
    batch: the phase's Packed rows, each [n, K].
    phase: warm phase index (picks alpha_p with per-phase step sizes).
    keeps: [m] candidate shares in [0, 1]; must hold 1.0.
    folds: row folds per item (at least 2).
    r_old, e_old: [o, D], [o, d] old items' text vectors and embeddings.
    r_new: [n, D] the new items' text vectors.
    lam: [] the ridge penalty.

  Returns:
    ([] the chosen share, [m] the summed held-out gain of each share over 1).
  """
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  rows = scoring.prepare(model, frozen["params"], frozen["tables"],
                         {k: batch[k] for k in scoring.ROW_KEYS})
  alpha = rule.step_size(meta_params, phase if cfg.phase_alpha else None)
  mask = rows["mask"].astype(emb.dtype)
  fold = (jnp.cumsum(mask, axis=1) - 1.0) % folds                       # [n, K]
  labels = rows["labels"].astype(emb.dtype)
  r_all = jnp.concatenate([r_old, r_new], 0)
  keeps = keeps.astype(emb.dtype)

  def per_fold(f):
    held = mask * (fold == f)
    support = dict(rows, mask=mask * (fold != f))
    e = jax.vmap(lambda e0, r: rule.adapt(loss_fn, e0, r, alpha, cfg.inner_steps,
                                     rule=cfg.rule))(emb, support)
    loo = loo_ridge(r_all, jnp.concatenate([e_old, e], 0),
                              jnp.asarray(lam, emb.dtype))[r_old.shape[0]:]

    def held_loss(k):
      logits = jax.vmap(functools.partial(scoring.item_logits, model, frozen["params"],
                                          frozen["tables"]))(k * e + (1.0 - k) * loo, rows)
      return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels) * held, 1)  # [n]
    return jax.vmap(held_loss)(keeps)                                    # [m, n]

  loss = jax.vmap(per_fold)(jnp.arange(folds, dtype=emb.dtype)).sum(0)  # [m, n]
  return rule.gated_choice(loss, keeps, KEEP_Z)


POOL_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)
Z_GAIN = 2.0


def _fit_correction(model: backbones.Backbone, params: Any, tables: backbones.Tables,
                    emb: jnp.ndarray, prior: jnp.ndarray, rows: dict[str, Any],
                    weight: jnp.ndarray, steps: int, lr: float,
                    lam: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """(delta [d], a [p, d]) fitted on the prepared rows of items with weight 1."""
  mask = rows["mask"].astype(emb.dtype) * weight[:, None]
  n_rows = jnp.maximum(mask.sum(), 1.0)
  theta = {"delta": jnp.zeros(emb.shape[1:], emb.dtype),
           "a": jnp.zeros((prior.shape[1], emb.shape[1]), emb.dtype)}

  def loss(t):
    bce = _row_bce(model, params, tables, _corrected(emb, prior, t), rows)
    return (jnp.sum(bce * mask) / n_rows
            + lam * (jnp.sum(t["delta"] ** 2) + jnp.sum(t["a"] ** 2)))

  tx = optax.adam(lr)

  def step(carry, _):
    t, opt = carry
    upd, opt = tx.update(jax.grad(loss)(t), opt, t)
    return (optax.apply_updates(t, upd), opt), None

  (theta, _), _ = jax.lax.scan(step, (theta, tx.init(theta)), None, length=steps)
  return theta


def _corrected(emb, prior, t):
  return emb + t["delta"] + prior @ t["a"]


def _row_bce(model, params, tables, emb, rows):
  """[n, K] BCE of every item's prepared rows scored with its embedding."""
  logits = jax.vmap(scoring.item_logits, in_axes=(None, None, None, 0, 0))(
      model, params, tables, emb, rows)
  return optax.sigmoid_binary_cross_entropy(logits, rows["labels"].astype(logits.dtype))


@functools.partial(jax.jit, static_argnames=("model", "steps", "folds"))
def pooled_correction(model: backbones.Backbone, params: Any, tables: backbones.Tables,
                      emb: jnp.ndarray, prior: jnp.ndarray,
                      batch: dict[str, jnp.ndarray], key: jax.Array, steps: int,
                      lr: float, lambdas: jnp.ndarray, folds: int
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One correction shared by all items, fitted on their pooled phase rows.

  Minimises the masked mean BCE of every item's rows, scored with
  ``emb + delta + prior @ A``, plus ``lam * (|delta|^2 + |A|^2)``, by
  ``steps`` full-batch Adam steps from delta = A = 0 (the backbone frozen).
  The penalty is chosen among ``lambdas`` by ``folds``-fold cross-validation
  over items: fitted on the other folds' items, scored on the held fold's
  rows.  No correction (the embeddings as given) is kept unless the best
  penalty's held-out gain exceeds ``Z_GAIN`` standard errors of its mean over
  items, so a population without a shared shift is left alone.

  Args:
    model: the backbone module.
    params: its frozen parameters.
    tables: its feature tables.
    emb: [n, d] the items' current embeddings.
    prior: [n, p] what the correction may depend on per item (EmerFlow: the
      cold embedding minus the old-item mean); p = 0 fits the shift alone.
    batch: the phase's Packed rows, each [n, K].
    key: PRNG key of the item folds.
    steps: Adam steps per fit.
    lr: Adam learning rate.
    lambdas: [m] candidate penalties.
    folds: cross-validation folds over items.

  Returns:
    ([n, d] corrected embeddings, [] the chosen penalty; inf = no correction).
  """
  rows = scoring.prepare(model, params, tables, {k: batch[k] for k in scoring.ROW_KEYS})
  n = emb.shape[0]
  fold = jax.random.permutation(key, n) % folds
  held = (fold[None, :] == jnp.arange(folds)[:, None]).astype(emb.dtype)   # [F, n]
  mask = rows["mask"].astype(emb.dtype)
  n_rows = jnp.maximum(mask.sum(), 1.0)
  base = jnp.sum(_row_bce(model, params, tables, emb, rows) * mask, 1)    # [n]

  def cv_loss(lam):
    def one(h):
      t = _fit_correction(model, params, tables, emb, prior, rows, 1.0 - h, steps, lr, lam)
      bce = _row_bce(model, params, tables, _corrected(emb, prior, t), rows) * mask
      return jnp.sum(bce, 1) * h                       # [n]: this fold's items only
    return jnp.sum(jax.vmap(one)(held), 0)             # [n]: each item's held-out loss
  gain = base[None, :] - jax.vmap(cv_loss)(lambdas)      # [m, n]
  best = jnp.argmax(gain.sum(1))
  # Kept only when the held-out gain is clear: above Z_GAIN standard errors of
  # its per-item mean (a population without a shared shift is left alone).
  g = gain[best] * n / n_rows
  use = jnp.mean(g) > Z_GAIN * jnp.std(g) / jnp.sqrt(n)
  t = _fit_correction(model, params, tables, emb, prior, rows, jnp.ones(n, emb.dtype),
                      steps, lr, lambdas[best])
  out = jnp.where(use, _corrected(emb, prior, t), emb)
  return out, jnp.where(use, lambdas[best], jnp.inf)
