"""Stage 3: meta-learned refinement of item embeddings (DESIGN §4).

Inner loop, for one item task, a pure function::

    e_0 = g_phi(r_i)                       (the aligned cold embedding)
    e_{t+1} = e_t - alpha * grad_e L(support; theta, e_t)     t < T

with alpha a scalar or per-dimension vector (Meta-SGD), optionally learned
(the rule and its step sizes are ``rule.py``; this module is the outer loop).
Outer loss ``beta * L(support; e_0) + (1 - beta) * L(query; e_T)`` (beta = 0.1
as in MetaEmb and EmerG), minimised over phi and alpha, vmapped over a batch of
padded tasks with masks, one jit per step.

Two task layouts (``tasks.py``): a *chunk* task is one (support = chunk j,
query = chunk j+1) pair; a *flow* task replays the protocol on one old item:
P support phases of K rows adapted in sequence (each phase restarting the rule
from the previous phase's result, as the warm-up does), and the query loss
after every phase, averaged.  With ``phase_alpha`` each phase has its own step
size: an item's first K rows call for a bolder move than its next ones.

``outer_loss="auc"`` replaces the query BCE by a pooled pairwise logistic loss
over all query rows of the batch (a smooth 1 - AUC, ``rank_loss``): the
protocol scores emerging items by the AUC of their pooled test rows, and a
step size that lowers each item's log loss can still rank items worse across
items.  ``first_order`` stops the gradient through the inner gradients (the
e_t path and alpha still get gradients).

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

from emerflow_jax import align, pretrain, rank_loss, rule, sharding
from emerflow_jax.models import backbones, scoring


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
    phase_alpha: alpha has a leading phase axis [P, ...]; phase p of a flow
      task (and warm phase p) uses ``alpha[p]``.
    outer_loss: query term of the outer loss, "bce" (mean over tasks of each
      task's BCE) or "auc" (``rank_loss.pairwise_auc_loss`` over the pooled
      query rows).
    cold_in_outer: flow tasks also score the cold embedding e_0 on the query
      (the protocol's cold phase), averaged with the warm phases.
    auc_pairs: 0 scores every (positive, negative) pair of the pooled rows
      (``rank_loss.pairwise_auc_loss``, quadratic in the rows); m > 0 pairs
      each row with m sampled rows of the other class
      (``rank_loss.sampled_pairwise_auc_loss``, linear in the rows, equal to
      the exact loss and gradient in expectation).
  """
  inner_steps: int = 3
  beta: float = 0.1
  first_order: bool = False
  learn_alpha: bool = True
  train_init: bool = True
  rule: str = "sgd"
  phase_alpha: bool = False
  outer_loss: str = "bce"
  cold_in_outer: bool = False
  auc_pairs: int = 0


def cold_embedding(meta_params: dict[str, Any], mapper: align.Mapper | None,
                   frozen: dict[str, Any], items: jnp.ndarray) -> jnp.ndarray:
  """e_0 for item indices of any shape S -> S + [d].

  With a mapper, e_0 = g_phi(r_i [, side_i]); without one (the no-align
  ablation) e_0 is a single learned vector ``meta_params["e0"]``.  During
  cross-fitted meta-training ``frozen["e0_table"]`` holds fixed out-of-fold
  mapper outputs instead.  With a learned ``meta_params["shrink"]`` s the
  mapper output g is pulled toward the old items' mean embedding
  ``frozen["center"]``: e_0 = center + s * (g - center).

  Args:
    meta_params: "phi" (mapper variables) or "e0", and optionally "shrink".
    mapper: the mapper g_phi, or None (no-align ablation).
    frozen: "r" [n_items, D] text vectors, optional "side", "e0_table", "center".
    items: item indices of shape S.

  Returns:
    S + [d] cold embeddings.
  """
  if mapper is None:
    return jnp.broadcast_to(meta_params["e0"], items.shape + meta_params["e0"].shape)
  if "e0_table" in frozen:  # out-of-fold starts of old items (cross-fitting)
    e = frozen["e0_table"][items]
  else:
    side = frozen.get("side")
    e = mapper.apply(meta_params["phi"], frozen["r"][items],
                     None if side is None else side[items])
  if "shrink" in meta_params:  # trust in the mapped prior, learned with the rule
    e = frozen["center"] + meta_params["shrink"] * (e - frozen["center"])
  return e


def _rows(batch: dict[str, jnp.ndarray], prefix: str) -> dict[str, jnp.ndarray]:
  return {k: batch[f"{prefix}/{k}"] for k in scoring.ROW_KEYS}


def _prepared(model: backbones.Backbone, frozen: dict[str, Any],
              batch: dict[str, jnp.ndarray], prefix: str) -> dict[str, Any]:
  """A task's rows with their item-embedding-free forward pass done once.

  Every inner step (and the query scoring after each phase) changes only the
  item embedding, so ``scoring.prepare`` computes the rest of the backbone's
  work on these rows once per task, outside the inner loop.
  """
  return scoring.prepare(model, frozen["params"], frozen["tables"], _rows(batch, prefix))


def task_loss(meta_params: dict[str, Any], model: backbones.Backbone,
              mapper: align.Mapper | None, cfg: MetaConfig, frozen: dict[str, Any],
              task: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Outer loss of ONE task (unbatched arrays: support [Rs], query [Rq]).

  A flow task (support rows [P, K]) goes to ``flow_task_loss``.

  Args:
    meta_params: the learned parameters (phi or e0, log_alpha, ...).
    model: the frozen backbone module.
    mapper: g_phi, or None.
    cfg: the meta config.
    frozen: backbone params and tables, text vectors and the like.
    task: one task's "item", "support/*" and "query/*" arrays.

  Returns:
    (beta * L(support; e_0) + (1 - beta) * L(query; e_T), metrics).
  """
  if task["support/users"].ndim == 2:
    return flow_task_loss(meta_params, model, mapper, cfg, frozen, task)
  if cfg.phase_alpha:
    raise ValueError("phase_alpha needs flow tasks (tasks.build_flow_tasks)")
  alpha = rule.step_size(meta_params)
  if not cfg.learn_alpha:
    alpha = jax.lax.stop_gradient(alpha)
  meta_params = _maybe_freeze_init(meta_params, cfg)
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  e0 = cold_embedding(meta_params, mapper, frozen, task["item"])
  support, query = _prepared(model, frozen, task, "support"), _prepared(model, frozen,
                                                                         task, "query")
  e_t = rule.adapt(loss_fn, e0, support, alpha, cfg.inner_steps, cfg.first_order, cfg.rule)
  l_support = loss_fn(e0, support)
  logits = scoring.item_logits(model, frozen["params"], frozen["tables"], e_t, query)
  l_query = backbones.bce_loss(logits, query["labels"], query["mask"])
  outer = cfg.beta * l_support + (1 - cfg.beta) * l_query
  return outer, {"support_e0": l_support, "query_eT": l_query,
                 "query_e0": loss_fn(e0, query), "query_logits": logits[None]}


def _maybe_freeze_init(meta_params: dict[str, Any], cfg: MetaConfig) -> dict[str, Any]:
  if cfg.train_init:
    return meta_params
  meta_params = dict(meta_params)
  for k in ("phi", "e0"):
    if k in meta_params:
      meta_params[k] = jax.lax.stop_gradient(meta_params[k])
  return meta_params


def flow_task_loss(meta_params: dict[str, Any], model: backbones.Backbone,
                   mapper: align.Mapper | None, cfg: MetaConfig, frozen: dict[str, Any],
                   task: dict[str, jnp.ndarray]
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Outer loss of ONE flow task (support [P, K], query [Q]).

  e_0 is the cold embedding; phase p runs the rule on support phase p from
  e_p with step size alpha_p (its Adam moments restarting, as a warm-up phase
  does) to give e_{p+1}.  The outer loss is
  ``beta * L(support_0; e_0) + (1 - beta) * mean_p L(query; e_{p+1})``: every
  phase is scored on the same later rows, as the protocol scores every phase
  on the same test rows.

  Args:
    meta_params: the learned parameters.
    model: the frozen backbone module.
    mapper: g_phi, or None.
    cfg: the meta config.
    frozen: backbone params and tables, text vectors and the like.
    task: one flow task: "item", "support/*" [P, K] and "query/*" [Q].

  Returns:
    (outer loss, metrics with the query loss cold and after the first/last
    phase, and "query_logits" [P, Q] after every phase).
  """
  support, query = _prepared(model, frozen, task, "support"), _prepared(model, frozen,
                                                                         task, "query")
  n_phases = support["mask"].shape[0]
  alphas = rule.phase_step_sizes(meta_params, cfg, n_phases)
  if not cfg.learn_alpha:
    alphas = jax.lax.stop_gradient(alphas)
  meta_params = _maybe_freeze_init(meta_params, cfg)
  loss_fn = functools.partial(scoring.item_loss, model, frozen["params"], frozen["tables"])
  e0 = cold_embedding(meta_params, mapper, frozen, task["item"])

  def phase(e, xs):
    rows, alpha = xs
    e = rule.adapt(loss_fn, e, rows, alpha, cfg.inner_steps, cfg.first_order, cfg.rule)
    logits = scoring.item_logits(model, frozen["params"], frozen["tables"], e, query)
    return e, (backbones.bce_loss(logits, query["labels"], query["mask"]), logits)

  _, (l_warm, logits) = jax.lax.scan(phase, e0, (support, alphas))
  l_phases = l_warm
  l_support = loss_fn(e0, jax.tree.map(lambda x: x[0], support))
  logits0 = scoring.item_logits(model, frozen["params"], frozen["tables"], e0, query)
  l_cold = backbones.bce_loss(logits0, query["labels"], query["mask"])
  if cfg.cold_in_outer:
    l_phases = jnp.concatenate([l_cold[None], l_phases])
    logits = jnp.concatenate([logits0[None], logits])
  outer = cfg.beta * l_support + (1 - cfg.beta) * l_phases.mean()
  return outer, {"support_e0": l_support, "query_e0": l_cold,
                 "query_e1": l_warm[0],
                 "query_eT": l_phases[-1], "query_logits": logits}


def batch_loss(meta_params: dict[str, Any], model: backbones.Backbone,
               mapper: align.Mapper | None, cfg: MetaConfig, frozen: dict[str, Any],
               batch: dict[str, jnp.ndarray], key: jax.Array | None = None
               ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Outer loss of a padded batch of tasks (vmapped over tasks).

  "bce": the mean of the tasks' outer losses over the real tasks.  "auc":
  ``beta * mean L(support; e_0) + (1 - beta) * mean_p rank_loss.pairwise_auc_loss``
  of the query rows of all real tasks pooled, after each phase p (sampled
  pairs, ``rank_loss.sampled_pairwise_auc_loss``, when ``cfg.auc_pairs`` > 0:
  then ``key`` draws them, one fold per phase).

  Args:
    meta_params: the learned parameters.
    model: the frozen backbone module.
    mapper: g_phi, or None.
    cfg: the meta config.
    frozen: backbone params and tables, text vectors and the like.
    batch: [B, ...] task arrays and "task_mask" [B] (0 for padding tasks).
    key: PRNG key of the sampled AUC pairs (needed when ``cfg.auc_pairs`` > 0).

  Returns:
    (outer loss, metrics averaged over the real tasks).
  """
  tasks = {k: v for k, v in batch.items() if k != "task_mask"}
  losses, aux = jax.vmap(task_loss, in_axes=(None, None, None, None, None, 0))(
      meta_params, model, mapper, cfg, frozen, tasks)
  w = batch["task_mask"]
  denom = jnp.maximum(w.sum(), 1.0)
  logits = aux.pop("query_logits")  # [B, P, Q]
  metrics = {k: (v * w).sum() / denom for k, v in aux.items()}
  if cfg.outer_loss == "bce":
    return (losses * w).sum() / denom, metrics
  if cfg.outer_loss != "auc":
    raise ValueError(f"outer_loss must be bce or auc, got {cfg.outer_loss!r}")
  mask = batch["query/mask"] * w[:, None]
  if cfg.auc_pairs > 0:
    if key is None:
      raise ValueError("sampled pairs (auc_pairs > 0) need a key")
    keys = jax.random.split(key, logits.shape[1])
    rank = jax.vmap(rank_loss.sampled_pairwise_auc_loss,
                    in_axes=(1, None, None, 0, None))(
        logits, batch["query/labels"], mask, keys, cfg.auc_pairs).mean()
  else:
    rank = jax.vmap(rank_loss.pairwise_auc_loss, in_axes=(1, None, None))(
        logits, batch["query/labels"], mask).mean()
  metrics["query_rank"] = rank
  return cfg.beta * metrics["support_e0"] + (1 - cfg.beta) * rank, metrics


def make_train_step(model: backbones.Backbone, mapper: align.Mapper | None,
                    cfg: MetaConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None,
                    ) -> Callable[..., tuple[dict[str, Any], dict[str, jnp.ndarray]]]:
  """Returns ``meta_train_step(state, frozen, batch) -> (state, metrics)``, jitted.

  ``state`` is ``{"params": meta params, "opt_state", "step", "rng"}`` and is
  donated.  ``batch`` holds [B, ...] task arrays plus ``task_mask`` [B].  With
  a ``mesh`` (``sharding.task_mesh``), the batch is split over its "tasks"
  axis (B a multiple of the mesh size), state and frozen are replicated, and
  the mean over tasks becomes a cross-device reduction.  Sampled AUC pairs
  are drawn with ``fold_in(state["rng"], state["step"])``.

  Args:
    model: the frozen backbone module.
    mapper: g_phi, or None.
    cfg: the meta config.
    tx: the outer optimizer.
    mesh: the device mesh of the task axis, or None (no sharding).

  Returns:
    The jitted step.
  """

  def meta_train_step(state, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        state["params"], model, mapper, cfg, frozen, batch, key)
    state = pretrain.apply_gradients(state, grads, tx)
    return state, dict(aux, loss=loss)

  if mesh is None:
    return jax.jit(meta_train_step, donate_argnums=0)
  rep, split = sharding.replicated_sharding(mesh), sharding.task_sharding(mesh)
  return jax.jit(meta_train_step, donate_argnums=0, in_shardings=(rep, rep, split),
                 out_shardings=(rep, rep))
