"""Stage 3: meta-learned refinement of item embeddings (DESIGN §4).

Inner loop, for one item task, a pure function::

    e_0 = g_phi(r_i)                       (the aligned cold embedding)
    e_{t+1} = e_t - alpha * grad_e L(support; theta, e_t)     t < T

with alpha a scalar or per-dimension vector (Meta-SGD), optionally learned.
Outer loss ``beta * L(support; e_0) + (1 - beta) * L(query; e_T)`` (beta = 0.1
as in MetaEmb and EmerG), minimised over phi and alpha, vmapped over a batch of
padded tasks with masks, one jit per step.  ``first_order`` stops the gradient
through the inner gradients (the e_t path and alpha still get gradients).

The frozen pieces (backbone params, feature tables, text vectors, side
embeddings) travel as one pytree argument, ``frozen``, never as closure
constants, so that large tables are not baked into the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from emerflow_jax import align, sharding, warmup
from emerflow_jax.models import backbones


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Static settings of the inner and outer loop (hashable: a jit static arg).

  Attributes:
    inner_steps: T.
    beta: weight of the support loss at e_0 in the outer loss.
    first_order: stop gradients through inner-loop gradients.
    learn_alpha: whether alpha receives outer gradients.
    train_init: whether the outer loss also trains the cold-start map (phi or
      e0); False learns the adaptation rule alone and keeps the aligned cold
      embedding exactly as stage 2 left it.
    rule: inner update, "sgd" (e - alpha * g) or "adam" (alpha * Adam direction).
  """
  inner_steps: int = 3
  beta: float = 0.1
  first_order: bool = False
  learn_alpha: bool = True
  train_init: bool = True
  rule: str = "sgd"


def init_alpha(alpha: float, mode: str, dim: int) -> jnp.ndarray:
  """Initial ``log_alpha``: [] for "scalar", [d] for "per_dim" (Meta-SGD).

  The step size is learned in log space: it stays positive, and Adam's
  scale-free updates move it by a relative amount whatever its magnitude
  (gradients w.r.t. item embeddings differ by orders of magnitude between
  backbones and datasets).
  """
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}")
  if mode == "scalar":
    return jnp.asarray(jnp.log(alpha), jnp.float32)
  if mode == "per_dim":
    return jnp.full((dim,), jnp.log(alpha), jnp.float32)
  raise ValueError(f"alpha_mode must be scalar or per_dim, got {mode!r}")


def step_size(meta_params: dict[str, Any]) -> jnp.ndarray:
  """alpha = exp(log_alpha): [] or [d]."""
  return jnp.exp(meta_params["log_alpha"])


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


def cold_embedding(meta_params: dict[str, Any], mapper: align.Mapper | None,
                   frozen: dict[str, Any], items: jnp.ndarray) -> jnp.ndarray:
  """e_0 for item indices of any shape S -> S + [d].

  With a mapper, e_0 = g_phi(r_i [, side_i]); without one (the no-align
  ablation) e_0 is a single learned vector ``meta_params["e0"]``.  During
  cross-fitted meta-training ``frozen["e0_table"]`` holds fixed out-of-fold
  starts instead.
  """
  if "e0_table" in frozen:  # out-of-fold starts of old items (cross-fitting)
    return frozen["e0_table"][items]
  if mapper is None:
    return jnp.broadcast_to(meta_params["e0"], items.shape + meta_params["e0"].shape)
  side = frozen.get("side")
  return mapper.apply(meta_params["phi"], frozen["r"][items],
                      None if side is None else side[items])


def _rows(batch: dict[str, jnp.ndarray], prefix: str) -> dict[str, jnp.ndarray]:
  return {k: batch[f"{prefix}/{k}"] for k in ("users", "items", "labels", "mask")}


def task_loss(meta_params: dict[str, Any], model: backbones.Backbone,
              mapper: align.Mapper | None, cfg: MetaConfig, frozen: dict[str, Any],
              task: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Outer loss of ONE task (unbatched arrays: support [Rs], query [Rq]).

  Returns:
    (beta * L(support; e_0) + (1 - beta) * L(query; e_T), metrics).
  """
  alpha = step_size(meta_params)
  if not cfg.learn_alpha:
    alpha = jax.lax.stop_gradient(alpha)
  if not cfg.train_init:
    meta_params = dict(meta_params)
    for k in ("phi", "e0"):
      if k in meta_params:
        meta_params[k] = jax.lax.stop_gradient(meta_params[k])
  loss_fn = functools.partial(warmup.item_loss, model, frozen["params"], frozen["tables"])
  e0 = cold_embedding(meta_params, mapper, frozen, task["item"])
  support, query = _rows(task, "support"), _rows(task, "query")
  e_t = adapt(loss_fn, e0, support, alpha, cfg.inner_steps, cfg.first_order, cfg.rule)
  l_support = loss_fn(e0, support)
  l_query = loss_fn(e_t, query)
  outer = cfg.beta * l_support + (1 - cfg.beta) * l_query
  return outer, {"support_e0": l_support, "query_eT": l_query,
                 "query_e0": loss_fn(e0, query)}


def batch_loss(meta_params: dict[str, Any], model: backbones.Backbone,
               mapper: align.Mapper | None, cfg: MetaConfig, frozen: dict[str, Any],
               batch: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Mean outer loss over the real tasks of a padded batch (vmapped over tasks)."""
  tasks = {k: v for k, v in batch.items() if k != "task_mask"}
  losses, aux = jax.vmap(task_loss, in_axes=(None, None, None, None, None, 0))(
      meta_params, model, mapper, cfg, frozen, tasks)
  w = batch["task_mask"]
  denom = jnp.maximum(w.sum(), 1.0)
  return (losses * w).sum() / denom, {k: (v * w).sum() / denom for k, v in aux.items()}


def make_train_step(model: backbones.Backbone, mapper: align.Mapper | None,
                    cfg: MetaConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None,
                    ) -> Callable[..., tuple[dict[str, Any], dict[str, jnp.ndarray]]]:
  """Returns ``meta_train_step(state, frozen, batch) -> (state, metrics)``, jitted.

  ``state`` is ``{"params": meta params, "opt_state", "step", "rng"}`` and is
  donated.  ``batch`` holds [B, ...] task arrays plus ``task_mask`` [B].  With
  a ``mesh`` (``sharding.task_mesh``), the batch is split over its "tasks"
  axis (B a multiple of the mesh size), state and frozen are replicated, and
  the mean over tasks becomes a cross-device reduction.
  """

  def meta_train_step(state, frozen, batch):
    (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        state["params"], model, mapper, cfg, frozen, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    state = dict(state, params=optax.apply_updates(state["params"], updates),
                 opt_state=opt_state, step=state["step"] + 1)
    return state, dict(aux, loss=loss)

  if mesh is None:
    return jax.jit(meta_train_step, donate_argnums=0)
  rep, split = sharding.replicated_sharding(mesh), sharding.task_sharding(mesh)
  return jax.jit(meta_train_step, donate_argnums=0, in_shardings=(rep, rep, split),
                 out_shardings=(rep, rep))


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def adapt_items(meta_params: dict[str, Any], model: backbones.Backbone,
                cfg: MetaConfig, frozen: dict[str, Any], emb: jnp.ndarray,
                batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
  """Applies the learned rule to every item at once (a warm-up phase).

  Args:
    meta_params: holds the learned ``log_alpha``.
    emb: [n, d] current embeddings.
    batch: Packed phase rows, each [n, K].

  Returns:
    [n, d] adapted embeddings.
  """
  loss_fn = functools.partial(warmup.item_loss, model, frozen["params"], frozen["tables"])
  rows = {k: batch[k] for k in ("users", "items", "labels", "mask")}
  alpha = step_size(meta_params)
  return jax.vmap(lambda e, r: adapt(loss_fn, e, r, alpha, cfg.inner_steps,
                                     rule=cfg.rule))(emb, rows)
