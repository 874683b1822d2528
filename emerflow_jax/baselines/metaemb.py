"""MetaEmb (Pan et al., SIGIR 2019): a meta-learned generator of cold ID embeddings.

A small network maps an item's side-field embeddings (the frozen backbone's
embeddings of every item field except ``item_id``: title words, genres, year,
...) to an initial ID embedding.  It is trained MAML-style on old-item tasks
(support = time chunk j, query = chunk j+1, DESIGN §1):

    e0 = G(side_i);  e1 = e0 - inner_lr * grad_e L_a(e0);
    loss = alpha * L_a(e0) + (1 - alpha) * L_b(e1),      alpha = 0.1,

averaged over a batch of tasks with ``jax.vmap`` and differentiated through the
inner step (second order).  The CVAR code base pairs rows of unrelated items
across batches a and b; here a task's two batches always belong to one item,
as in the paper.  Its side input also drops CVAR's ``count`` feature, which is
the item's total interaction count and would leak an emerging item's future.

The helpers ``side_fields``/``side_embeddings``/``TwoLayer``
are shared with the other side-information baselines (MWUF, CVAR).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import checkpoint, methods, pretrain, tasks
from emerflow_jax.models import backbones, scoring

# ---------------------------------------------------------------------------
# Shared by the side-information baselines.


def side_fields(tables: backbones.Tables) -> tuple[str, ...]:
  """Item fields other than the ID, sorted: ("item/genres", "item/title", ...).

  Sorted because jit and vmap rebuild dicts in sorted key order; insertion
  order would concatenate the fields differently inside and outside a jit.
  """
  return tuple(sorted(k for k in tables
                      if k.startswith("item/") and k != backbones.ITEM_ID))


def side_embeddings(embed: dict[str, jnp.ndarray], tables: backbones.Tables,
                    items: jnp.ndarray) -> jnp.ndarray:
  """Concatenated side-field embeddings of items, pooled as the backbone pools.

  Args:
    embed: field tables by parameter name ("item_genres" -> [V, d]); the
      backbone's ``params["params"]["embed"]`` or a method's own copy.
    tables: feature tables.
    items: S int item indices.

  Returns:
    S + [F * d] where F = len(side_fields(tables)).
  """
  out = []
  for key in side_fields(tables):
    ids = jnp.take(tables[key], items, axis=0)
    vecs = jnp.take(embed[key.replace("/", "_")], ids, axis=0)
    if ids.ndim > jnp.ndim(items):  # sequence field: masked sum-pooling
      vecs = (vecs * (ids > 0)[..., None]).sum(-2)
    out.append(vecs)
  if not out:
    raise ValueError("the dataset has no item side fields besides item_id")
  return jnp.concatenate(out, axis=-1)


def backbone_embed(params: Any) -> dict[str, jnp.ndarray]:
  """The frozen backbone's field tables by parameter name."""
  return params["params"]["embed"]


def uniform_init(scale: float) -> Callable[..., jnp.ndarray]:
  """U(-scale, scale), the CVAR code base's init for its small networks."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class TwoLayer(nn.Module):
  """Linear-ReLU-Linear, initialised U(-0.01, 0.01) as in the CVAR code base.

  Attributes:
    hidden: hidden width.
    out: output width.
  """
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    init = uniform_init(0.01)
    h = nn.relu(nn.Dense(self.hidden, kernel_init=init, bias_init=init)(x))
    return nn.Dense(self.out, kernel_init=init, bias_init=init)(h)


def seed_of(key: jax.Array) -> int:
  """A NumPy seed derived from a JAX key (for task shuffling and sampling)."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


# ---------------------------------------------------------------------------
# MetaEmb.


def _rows(task: dict[str, jnp.ndarray], part: str) -> dict[str, jnp.ndarray]:
  return {k: task[f"{part}/{k}"] for k in ("users", "items", "labels", "mask")}


def inner_step(model: backbones.Backbone, params: Any, tables: backbones.Tables,
               emb: jnp.ndarray, rows: dict[str, jnp.ndarray],
               lr: float) -> jnp.ndarray:
  """One SGD step on one item's embedding: e - lr * grad_e L(rows; e).

  Args:
    model: the backbone module.
    params: the frozen backbone's parameters.
    tables: feature tables.
    emb: [d] the item's embedding.
    rows: {"users", "items", "labels", "mask"} each [R].
    lr: step size.

  Returns:
    [d] the updated embedding.
  """
  grad = jax.grad(scoring.item_loss, argnums=3)(model, params, tables, emb, rows)
  return emb - lr * grad


def task_loss(gen: nn.Module, gen_params: Any, model: backbones.Backbone,
              params: Any, tables: backbones.Tables, task: dict[str, jnp.ndarray],
              inner_lr: float, alpha: float) -> jnp.ndarray:
  """alpha * L_a(e0) + (1 - alpha) * L_b(e1) for one task (unbatched leaves).

  Args:
    gen: the generator module.
    gen_params: its parameters.
    model: the backbone module.
    params: the frozen backbone's parameters.
    tables: feature tables.
    task: one task: "item" [] and "support/*" [Ks], "query/*" [Kq] rows.
    inner_lr: step size of the inner step on the support rows.
    alpha: weight of the support loss of e0.

  Returns:
    scalar.
  """
  side = side_embeddings(backbone_embed(params), tables, task["item"])
  e0 = gen.apply(gen_params, side)
  support, query = _rows(task, "support"), _rows(task, "query")
  loss_a = scoring.item_loss(model, params, tables, e0, support)
  e1 = inner_step(model, params, tables, e0, support, inner_lr)
  loss_b = scoring.item_loss(model, params, tables, e1, query)
  return alpha * loss_a + (1.0 - alpha) * loss_b


def meta_loss(gen: nn.Module, gen_params: Any, model: backbones.Backbone,
              params: Any, tables: backbones.Tables, batch: dict[str, jnp.ndarray],
              inner_lr: float, alpha: float) -> jnp.ndarray:
  """Mean task loss over a padded batch of tasks.

  Args:
    gen: the generator module.
    gen_params: its parameters (the ones differentiated).
    model: the backbone module.
    params: the frozen backbone's parameters.
    tables: feature tables.
    batch: tasks as from ``tasks.batches``: "item" [B], "support/*" [B, Ks],
      "query/*" [B, Kq], "task_mask" [B] (0 for padding tasks).
    inner_lr: step size of each task's inner step.
    alpha: weight of the support loss of e0.

  Returns:
    scalar.
  """
  per_task = jax.vmap(task_loss, in_axes=(None, None, None, None, None, 0, None, None))(
      gen, gen_params, model, params, tables,
      {k: v for k, v in batch.items() if k != "task_mask"}, inner_lr, alpha)
  mask = batch["task_mask"]
  return (per_task * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_epoch_fn(gen: nn.Module, model: backbones.Backbone,
                  tx: optax.GradientTransformation, inner_lr: float, alpha: float
                  ) -> Callable[..., tuple[dict, jnp.ndarray]]:
  """jit(epoch(state, params, tables, stacked) -> (state, losses [n_batches])).

  ``stacked`` holds the epoch's task batches stacked on a leading axis, so one
  ``lax.scan`` runs the whole epoch in one dispatch.

  Args:
    gen: the generator module.
    model: the backbone module.
    tx: the generator's optimizer.
    inner_lr: step size of each task's inner step.
    alpha: weight of the support loss of e0.

  Returns:
    The jitted epoch function; it donates ``state`` (``pretrain.init_state``
    layout: "params", "opt_state", "step", ...).
  """

  def epoch(state, params, tables, stacked):
    def step(st, batch):
      loss, grads = jax.value_and_grad(meta_loss, argnums=1)(
          gen, st["params"], model, params, tables, batch, inner_lr, alpha)
      st = pretrain.apply_gradients(st, grads, tx)
      return st, loss

    return jax.lax.scan(step, state, stacked)

  return jax.jit(epoch, donate_argnums=0)


def epoch_batches(ctx: methods.Context, epoch: int, seed: int
                  ) -> dict[str, np.ndarray]:
  """All task batches of one epoch, stacked [n_batches, B, ...].

  The generator is seeded by (seed, epoch), so a resumed run sees exactly the
  batches an uninterrupted one would.

  Args:
    ctx: the run's context (dataset, split, ``metaemb`` config).
    epoch: the epoch's index.
    seed: the run's data seed (``seed_of``).

  Returns:
    {key: [n_batches, B, ...]} over the keys of ``tasks.batches`` (with
    "task_mask"), B = ``metaemb.batch_tasks``.
  """
  cfg = ctx.config.metaemb
  rng = np.random.default_rng([seed, epoch])
  all_tasks = tasks.build_meta_tasks(ctx.ds, ctx.split, int(cfg.support_rows),
                                     int(cfg.query_rows), rng)
  if not len(all_tasks["item"]):
    raise ValueError("metaemb: no old-item tasks to meta-train on")
  batch_list = tasks.batches(all_tasks, int(cfg.batch_tasks), rng)
  return {k: np.stack([b[k] for b in batch_list]) for k in batch_list[0]}


class MetaEmb(methods.Method):
  """Generator G(side fields) -> cold ID embedding, meta-trained on old items."""
  name = "metaemb"

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    return methods.Plan(sections=("metaemb",), search_space=dict(
        methods.warmup_space(), **{"metaemb.lr": space.Float(1e-4, 1e-2, log=True),
                                   "metaemb.inner_lr": space.Float(1e-4, 1e-1, log=True),
                                   "metaemb.alpha": space.Float(0.0, 1.0)}))

  def _generator(self, ctx: methods.Context) -> TwoLayer:
    return TwoLayer(hidden=int(ctx.config.metaemb.hidden), out=ctx.dim)

  def fit(self, ctx: methods.Context) -> Any:
    cfg = ctx.config.metaemb
    gen = self._generator(ctx)
    k_init, k_state, k_data = jax.random.split(ctx.key, 3)
    side = side_embeddings(backbone_embed(ctx.params), ctx.tables,
                           jnp.asarray(ctx.split.old_items[:1]))
    tx = optax.adam(float(cfg.lr))
    state = pretrain.init_state(gen.init(k_init, side), tx, k_state)
    epoch_fn = make_epoch_fn(gen, ctx.model, tx, float(cfg.inner_lr), float(cfg.alpha))
    seed = seed_of(k_data)
    ckpt_dir = ctx.stage_dir("metaemb", ("metaemb",))
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      state, done = ckpt.restore_or(state)
      if done is not None:
        logging.info("metaemb: resumed from epoch %d in %s", done, ckpt.directory)
      for e in range(done or 0, int(cfg.epochs)):
        stacked = {k: jnp.asarray(v) for k, v in epoch_batches(ctx, e, seed).items()}
        state, losses = epoch_fn(state, ctx.params, ctx.tables, stacked)
        logging.info("metaemb: epoch %d/%d meta loss %.4f", e + 1, int(cfg.epochs),
                     float(losses.mean()))
        ckpt.save(e + 1, state)
    return {"gen_params": state["params"]}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Implements ``methods.Method.cold``: the generator applied to side fields.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned ({"gen_params"}).
      items: [n] item ids.

    Returns:
      [n, d] generated embeddings G(side_i).
    """
    side = side_embeddings(backbone_embed(ctx.params), ctx.tables, jnp.asarray(items))
    return _generate(self._generator(ctx), state["gen_params"], side)


@functools.partial(jax.jit, static_argnums=0)
def _generate(gen: nn.Module, gen_params: Any, side: jnp.ndarray) -> jnp.ndarray:
  return gen.apply(gen_params, side)
