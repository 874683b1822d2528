"""The inner rule of stage 3 and its step sizes, on old items and on new ones.

``adapt`` is the rule a task runs (T steps from e_0, SGD or Adam-normalised,
pure and differentiable); ``meta.py`` differentiates through it to learn the
step sizes.  ``adapt_items`` applies the learned rule to every new item of a
warm phase at once, and ``choose_step_scale`` rescales the learned step size
for a new population by cross-validation over the items' own phase rows
(``scaled`` applies the factor); from warm_b on, ``choose_step_scale_forward``
instead replays the previous phase and scores the current one's rows.  Step sizes live in log space
(``init_alpha``, ``step_size``): one scalar, one per dimension (Meta-SGD), or
one per warm phase.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax

from emerflow_jax.models import backbones, scoring

if TYPE_CHECKING:
  from emerflow_jax import meta  # pylint: disable=g-bad-import-order


def init_alpha(alpha: float, mode: str, dim: int, phases: int = 0) -> jnp.ndarray:
  """Initial ``log_alpha``: [] for "scalar", [d] for "per_dim" (Meta-SGD).

  With ``phases`` > 0 a leading phase axis is added: [P] or [P, d].

  The step size is learned in log space: it stays positive, and Adam's
  scale-free updates move it by a relative amount whatever its magnitude
  (gradients w.r.t. item embeddings differ by orders of magnitude between
  backbones and datasets).

  Args:
    alpha: the initial step size (> 0).
    mode: "scalar" or "per_dim".
    dim: the embedding dimension d (per_dim).
    phases: P, one step size per warm phase (0: one shared).

  Returns:
    log alpha of shape [], [d], [P] or [P, d].
  """
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}")
  lead = (phases,) if phases > 0 else ()
  if mode == "scalar":
    return jnp.full(lead, jnp.log(alpha), jnp.float32)
  if mode == "per_dim":
    return jnp.full(lead + (dim,), jnp.log(alpha), jnp.float32)
  raise ValueError(f"alpha_mode must be scalar or per_dim, got {mode!r}")


def step_size(meta_params: dict[str, Any], phase: Any = None) -> jnp.ndarray:
  """alpha = exp(log_alpha): [] or [d]; ``phase`` picks a row of a per-phase alpha.

  Args:
    meta_params: holds ``log_alpha``.
    phase: None, or the warm phase index (traced or static).

  Returns:
    The step size(s), of log_alpha's shape (less its phase axis if picked).
  """
  alpha = jnp.exp(meta_params["log_alpha"])
  return alpha if phase is None else alpha[phase]


def phase_step_sizes(meta_params: dict[str, Any], cfg: "meta.MetaConfig",
                     n_phases: int) -> jnp.ndarray:
  """[P, ...] step size of each phase (a shared alpha repeated P times).

  Args:
    meta_params: holds ``log_alpha``.
    cfg: the meta config (``phase_alpha``).
    n_phases: P, the tasks' number of support phases.

  Returns:
    [P] or [P, d] step sizes.

  Raises:
    ValueError: a per-phase alpha with another number of phases.
  """
  alpha = step_size(meta_params)
  if cfg.phase_alpha:
    if alpha.shape[0] != n_phases:
      raise ValueError(f"alpha has {alpha.shape[0]} phases, tasks have {n_phases}")
    return alpha
  return jnp.broadcast_to(alpha, (n_phases,) + alpha.shape)


def adapt(loss_fn: Callable[[jnp.ndarray, Any], jnp.ndarray], e0: jnp.ndarray,
          support: Any, alpha: jnp.ndarray, steps: int,
          first_order: bool = False, rule: str = "sgd") -> jnp.ndarray:
  """T steps of the inner rule from e0.

  ``rule="sgd"`` is ``e <- e - alpha * g`` (MAML / Meta-SGD).  ``rule="adam"``
  is the same learned per-dimension step size applied to Adam's normalised
  direction ``m_hat / sqrt(v_hat)``: an embedding's gradient scale differs by
  orders of magnitude across items, and the per-coordinate normalisation is
  what makes the shared fine-tuning robust; with alpha = its learning rate and
  T = its steps the rule starts out *equal* to that fine-tuning, and the outer
  loop learns from there.  Both rules are pure and differentiable.

  Args:
    loss_fn: (e [d], support) -> scalar.
    e0: [d] starting embedding.
    support: the task's support rows (any pytree loss_fn understands).
    alpha: [] or [d] step size.
    steps: T (static).
    first_order: stop the gradient through grad_e.
    rule: "sgd" or "adam".

  Returns:
    [d] adapted embedding e_T.
  """
  grad_fn = jax.grad(loss_fn)
  b1, b2, eps = 0.9, 0.999, 1e-8

  def step(carry, t):
    e, m, v = carry
    g = grad_fn(e, support)
    if first_order:
      g = jax.lax.stop_gradient(g)
    if rule == "sgd":
      return (e - alpha * g, m, v), None
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** (t + 1))
    v_hat = v / (1 - b2 ** (t + 1))
    # eps inside the sqrt keeps the derivative finite where v is 0.
    return (e - alpha * m_hat / (jnp.sqrt(v_hat + eps ** 2) + eps), m, v), None

  if rule not in ("sgd", "adam"):
    raise ValueError(f"inner rule must be sgd or adam, got {rule!r}")
  zeros = jnp.zeros_like(e0)
  (e, _, _), _ = jax.lax.scan(step, (e0, zeros, zeros),
                              jnp.arange(steps, dtype=jnp.float32))
  return e


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def adapt_items(meta_params: dict[str, Any], model: backbones.Backbone,
                cfg: "meta.MetaConfig", frozen: dict[str, Any], emb: jnp.ndarray,
                batch: dict[str, jnp.ndarray], phase: Any = 0) -> jnp.ndarray:
  """Applies the learned rule to every item at once (a warm-up phase).

  Args:
    meta_params: holds the learned ``log_alpha``.
    emb: [n, d] current embeddings.
    batch: Packed phase rows, each [n, K].
    phase: warm phase index p (0 = warm_a); picks alpha_p when
      ``cfg.phase_alpha`` (a traced argument: no recompilation per phase).

  Returns:
    [n, d] adapted embeddings.
  """
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  rows = scoring.prepare(model, frozen["params"], frozen["tables"],
                        {k: batch[k] for k in scoring.ROW_KEYS})
  alpha = step_size(meta_params, phase if cfg.phase_alpha else None)
  return jax.vmap(lambda e, r: adapt(loss_fn, e, r, alpha, cfg.inner_steps,
                                     rule=cfg.rule))(emb, rows)


def gated_choice(loss: jnp.ndarray, candidates: jnp.ndarray, z: float
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The candidate with the lowest held-out loss, if clearly better than 1.

  Args:
    loss: [m, n] held-out loss of each candidate on each item.
    candidates: [m] values (a step-size factor, a share kept); must hold 1.0,
      the reference (the rule as learned, no regeneration).
    z: the bar: the best candidate's gain over 1 must exceed ``z`` standard
      errors of its mean over the n items.

  Returns:
    ([] the chosen value, 1 below the bar; [m] each candidate's summed gain over 1).
  """
  ref = jnp.argmin(jnp.abs(candidates - 1.0))
  gain = loss[ref][None, :] - loss                                       # [m, n]
  best = jnp.argmax(gain.sum(1))
  g = gain[best]                                                         # [n] per item
  use = jnp.mean(g) > z * jnp.std(g) / jnp.sqrt(loss.shape[1])
  return jnp.where(use, candidates[best], jnp.ones((), candidates.dtype)), gain.sum(1)


SCALE_Z = 2.0   # a rescaled step size is kept only above this many standard errors of gain


@functools.partial(jax.jit, static_argnames=("model", "cfg", "folds"))
def choose_step_scale(meta_params: dict[str, Any], model: backbones.Backbone,
                      cfg: "meta.MetaConfig", frozen: dict[str, Any], emb: jnp.ndarray,
                      batch: dict[str, jnp.ndarray], phase: Any, scales: jnp.ndarray,
                      folds: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The learned step size rescaled for this population, by CV over their own rows.

  The rule's step size was learned on old items; new items may need larger or
  smaller moves.  Each item's valid phase rows are dealt into ``folds`` folds
  in time order (row j of the item goes to fold j mod ``folds``).  For every
  candidate factor s and fold f, every item is adapted by the rule with step
  size s * alpha from ``emb`` on its rows outside f, and scored (BCE) on its
  rows in f.  The factor with the lowest held-out loss summed over items is
  kept only when its gain over s = 1 (the learned rule as it is) is above
  ``SCALE_Z`` standard errors of its mean over items; otherwise the factor is
  1.  Only the phase's rows enter, which the protocol has revealed.

  Args:
    meta_params: holds the learned ``log_alpha``.
    model: the frozen backbone module.
    cfg: the inner-loop settings.
    frozen: backbone params and tables.
    emb: [n, d] the items' embeddings before the phase's steps.
    batch: the phase's Packed rows, each [n, K].
    phase: warm phase index (picks alpha_p with per-phase step sizes).
    scales: [m] candidate factors; must hold 1.0.
    folds: row folds per item (at least 2).

  Returns:
    ([] the chosen factor, [m] the summed held-out gain of each factor over 1).
  """
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  rows = scoring.prepare(model, frozen["params"], frozen["tables"],
                         {k: batch[k] for k in scoring.ROW_KEYS})
  alpha = step_size(meta_params, phase if cfg.phase_alpha else None)
  mask = rows["mask"].astype(emb.dtype)
  fold = (jnp.cumsum(mask, axis=1) - 1.0) % folds                       # [n, K]
  labels = rows["labels"].astype(emb.dtype)

  def held_loss(s, f):
    held = mask * (fold == f)
    support = dict(rows, mask=mask * (fold != f))
    e = jax.vmap(lambda e0, r: adapt(loss_fn, e0, r, s * alpha, cfg.inner_steps,
                                     rule=cfg.rule))(emb, support)
    logits = jax.vmap(functools.partial(scoring.item_logits, model, frozen["params"],
                                        frozen["tables"]))(e, rows)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels) * held, 1)   # [n]

  per_fold = jax.vmap(lambda s: jax.vmap(lambda f: held_loss(s, f))(
      jnp.arange(folds, dtype=emb.dtype)))(scales.astype(emb.dtype))   # [m, F, n]
  return gated_choice(per_fold.sum(1), scales, SCALE_Z)                 # loss [m, n]


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def choose_step_scale_forward(meta_params: dict[str, Any], model: backbones.Backbone,
                              cfg: "meta.MetaConfig", frozen: dict[str, Any],
                              emb_prev: jnp.ndarray, prev_batch: dict[str, jnp.ndarray],
                              batch: dict[str, jnp.ndarray], prev_phase: Any,
                              scales: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The learned step size rescaled by how the last phase's step predicts this one's rows.

  The protocol asks an adapted embedding to predict an item's *later* rows,
  and from warm_b on the new items have a past and a present: this replays
  the previous phase.  For every candidate factor s, every item is adapted
  from ``emb_prev`` (its embedding before the previous phase's rule) on the
  previous phase's rows with s times that phase's step size, and scored (BCE)
  on the current phase's rows, which that step never saw.  The factor with
  the lowest loss summed over items is kept only when its gain over s = 1 is
  above ``SCALE_Z`` standard errors of its mean over items; otherwise 1.
  Only revealed rows enter (the previous and the current phase's).

  Args:
    meta_params: holds the learned ``log_alpha`` (not rescaled).
    model: the frozen backbone module.
    cfg: the inner-loop settings.
    frozen: backbone params and tables.
    emb_prev: [n, d] the items' embeddings before the previous phase's rule.
    prev_batch: the previous phase's Packed rows, each [n, K].
    batch: this phase's Packed rows, each [n, K'].
    prev_phase: the previous warm phase's index (picks its alpha).
    scales: [m] candidate factors; must hold 1.0.

  Returns:
    ([] the chosen factor, [m] the summed gain of each factor over 1).
  """
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  prev = scoring.prepare(model, frozen["params"], frozen["tables"],
                         {k: prev_batch[k] for k in scoring.ROW_KEYS})
  rows = scoring.prepare(model, frozen["params"], frozen["tables"],
                         {k: batch[k] for k in scoring.ROW_KEYS})
  alpha = step_size(meta_params, prev_phase if cfg.phase_alpha else None)
  mask = rows["mask"].astype(emb_prev.dtype)
  labels = rows["labels"].astype(emb_prev.dtype)

  def next_loss(s):
    e = jax.vmap(lambda e0, r: adapt(loss_fn, e0, r, s * alpha, cfg.inner_steps,
                                     rule=cfg.rule))(emb_prev, prev)
    logits = jax.vmap(functools.partial(scoring.item_logits, model, frozen["params"],
                                        frozen["tables"]))(e, rows)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels) * mask, 1)   # [n]

  return gated_choice(jax.vmap(next_loss)(scales.astype(emb_prev.dtype)), scales,
                      SCALE_Z)


def scaled(meta_params: dict[str, Any], scale: Any) -> dict[str, Any]:
  """``meta_params`` with every step size multiplied by ``scale``.

  Args:
    meta_params: holds ``log_alpha``.
    scale: [] positive factor.

  Returns:
    A new dict; ``log_alpha`` shifted by log(scale).
  """
  return dict(meta_params, log_alpha=meta_params["log_alpha"] + jnp.log(scale))
