"""EmerG (Wang et al., KDD 2024): item-specific feature-interaction graphs.

A port of the public EmerG code (LARS-research/EmerG: ``model/warm.py``,
``main.py``) onto the shared harness, with its GNN as the ``emerg_gnn``
backbone (``models/emerg_gnn.py``).  An emerging item is represented by its
item-ID embedding and its own graphs, passed together through the backbone's
item-embedding hook (``emerg_gnn.item_input``):

* **cold**: a hypernetwork (``GraphGenerator``, the reference's
  ``GraphGenerator``: one Linear-ReLU-Linear-ReLU-Linear per field, fed the
  item's side-field embeddings and the field's one-hot) generates row f of the
  item's graphs; the ID embedding is a fresh U(-0.01, 0.01) draw, as every
  item-ID row is in the reference before meta-training;
* **meta-training** on old items, one task per item and time chunk pair
  (support = chunk j, query = chunk j + 1, DESIGN §1):
  ``0.1 * L(support; e0, G0) + 0.9 * L(query; (e0, G0) - inner_lr * grad)``,
  vmapped over a batch of tasks and differentiated through the inner step;
* **each warm phase**: full-batch Adam (with the reference's L2 weight decay)
  on the item's ID embedding and graphs only, from the phase's K rows, the
  Adam state carried from warm_a to warm_c as the reference reuses one
  optimizer; vmapped over items (the reference deep-copies the whole model
  for every item).

Deviations from the reference:

* the reference ``torch.nn.init.uniform_``-s the pretrained item-ID
  embeddings of every item before meta-training; here the backbone is frozen
  for every method (DESIGN §5) and only the emerging items' own embeddings are
  drawn fresh;
* its meta-optimiser trains every backbone weight (and the ``W_l`` of its
  ``generategraph`` mode); here only the hypernetwork is meta-trained, and its
  output is a residual on the pretrained global graphs, so an untrained
  generator reproduces the pretrained model;
* its ``generate_graph`` writes the generated graph into ``graph_dict.weight
  .data``, and its inner step updates parameters through ``.data``: as
  shipped, no gradient reaches the generator and the inner step is first
  order.  Here the gradient flows through both (``first_order=True`` stops it
  at the inner step);
* its generator also reads the item-ID embedding, which for an emerging item
  is noise; here it reads only the side fields (the frozen backbone's
  embeddings of every item field but the ID);
* its ``mask_test`` (zeroed graph rows/columns of the last four fields) is not
  ported (see ``models/emerg_gnn.py``);
* one meta step per task there, a batch of ``batch_tasks`` tasks here;
* its shipped ``main.py`` sets the MovieLens-1M hyper-parameters and then
  overwrites them with its TaobaoAD ones (meta_lr 1e-4, lr_inner 1e-3,
  16 + 1 warm steps, 6 meta epochs).  The defaults here are the MovieLens-1M
  ones it meant (meta_lr 1e-3, lr_inner 1e-2, warm_lr 1e-2, 11 + 1 warm steps,
  11 meta epochs).

No input reveals an emerging item's future: the generator reads side fields
only (no ``count``), and each phase reads only that phase's rows.
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
from emerflow_jax.baselines import metaemb
from emerflow_jax.models import backbones, emerg_gnn


class GraphGenerator(nn.Module):
  """Side fields -> the residual graphs [L, F, F] of one item.

  The reference's F per-field MLPs, stacked: field f's MLP reads
  [side; onehot(f)] and writes row f of every layer's graph (the reference
  shares one graph across layers; L rows here, one per layer).

  Attributes:
    n_fields: F.
    n_layers: L.
  """
  n_fields: int
  n_layers: int

  @nn.compact
  def __call__(self, side: jnp.ndarray) -> jnp.ndarray:
    """side: [D] -> [L, F, F]."""
    f, n_layers = self.n_fields, self.n_layers
    init = metaemb.uniform_init(0.01)
    x = jnp.concatenate([jnp.broadcast_to(side, (f,) + side.shape), jnp.eye(f)], -1)
    sizes = (f, f, n_layers * f)
    for i, width in enumerate(sizes):
      w = self.param(f"w{i}", init, (f, x.shape[-1], width))
      b = self.param(f"b{i}", init, (f, width))
      x = jnp.einsum("fi,fio->fo", x, w) + b
      if i < len(sizes) - 1:
        x = nn.relu(x)
    return x.reshape(f, n_layers, f).transpose(1, 0, 2)


def cold_ids(key: jax.Array, items: jnp.ndarray, dim: int) -> jnp.ndarray:
  """[n, d] fresh U(-0.01, 0.01) ID embeddings, one fixed draw per item id.

  Args:
    key: PRNG key of the draws.
    items: [n] item ids.
    dim: d.

  Returns:
    [n, d] ID embeddings.
  """
  draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (dim,), jnp.float32,
                                      -0.01, 0.01)
  return jax.vmap(draw)(items)


def cold_rep(gen: GraphGenerator, gen_params: Any, model: emerg_gnn.EmerGGNN,
             params: Any, tables: backbones.Tables, items: jnp.ndarray,
             id_emb: jnp.ndarray) -> jnp.ndarray:
  """[n, d + L*F*F]: the items' cold ID embeddings with their generated graphs.

  Args:
    items: [n] item indices.
    id_emb: [n, d] their cold ID embeddings.

  Returns:
    [n, d + L*F*F] item representations (ID embedding, flattened graphs).
  """
  side = metaemb.side_embeddings(metaemb.backbone_embed(params), tables, items)
  delta = jax.vmap(lambda s: gen.apply(gen_params, s))(side)
  return emerg_gnn.item_input(id_emb, emerg_gnn.global_graph(params) + delta)


def rows_loss(model: emerg_gnn.EmerGGNN, params: Any, tables: backbones.Tables,
              rep: jnp.ndarray, rows: dict[str, jnp.ndarray]) -> jnp.ndarray:
  """Masked mean BCE of one item's rows [R] scored with its rep [d + L*F*F].

  Args:
    model: the EmerG GNN.
    params: its parameters.
    tables: its feature tables.
    rep: [d + L*F*F] the item's representation.
    rows: the item's rows, each [R].

  Returns:
    [] the loss.
  """
  e = jnp.broadcast_to(rep, rows["users"].shape + rep.shape)
  logits = backbones.score(model, params, tables, rows["users"], rows["items"], e)
  return backbones.bce_loss(logits, rows["labels"], rows["mask"])


def task_loss(gen: GraphGenerator, gen_params: Any, model: emerg_gnn.EmerGGNN,
              params: Any, tables: backbones.Tables, task: dict[str, jnp.ndarray],
              id_emb: jnp.ndarray, inner_lr: float, beta: float,
              first_order: bool) -> jnp.ndarray:
  """beta * L(support; rep0) + (1 - beta) * L(query; rep1) of one task.

  Args:
    task: "item" [], "support/*" [Ks], "query/*" [Kq].
    id_emb: [d] the item's cold ID embedding.

  Returns:
    scalar; rep1 = rep0 - inner_lr * grad L(support; rep0) (ID and graphs).
  """
  rep0 = cold_rep(gen, gen_params, model, params, tables, task["item"][None],
                  id_emb[None])[0]
  sup = {k: task[f"support/{k}"] for k in ("users", "items", "labels", "mask")}
  qry = {k: task[f"query/{k}"] for k in ("users", "items", "labels", "mask")}
  loss_s, grad = jax.value_and_grad(rows_loss, argnums=3)(model, params, tables, rep0, sup)
  if first_order:
    grad = jax.lax.stop_gradient(grad)
  loss_q = rows_loss(model, params, tables, rep0 - inner_lr * grad, qry)
  return beta * loss_s + (1.0 - beta) * loss_q


def meta_loss(gen: GraphGenerator, gen_params: Any, model: emerg_gnn.EmerGGNN,
              params: Any, tables: backbones.Tables, batch: dict[str, jnp.ndarray],
              id_key: jax.Array, inner_lr: float, beta: float,
              first_order: bool) -> jnp.ndarray:
  """Mask-weighted mean task loss over a batch of tasks ("task_mask" [B]).

  Args:
    gen: the graph generator.
    gen_params: its parameters.
    model: the EmerG GNN (frozen).
    params: its parameters.
    tables: its feature tables.
    batch: [B, ...] tasks with "task_mask" [B].
    id_key: PRNG key of the cold ID draws.
    inner_lr: the inner step size on the ID embedding.
    beta: weight of the support loss (the rest goes to the query loss).
    first_order: stop gradients through the inner step.

  Returns:
    [] the batch loss.
  """
  ids = cold_ids(id_key, batch["item"], model.dim)
  per_task = jax.vmap(task_loss, in_axes=(None, None, None, None, None, 0, 0,
                                          None, None, None))(
      gen, gen_params, model, params, tables,
      {k: v for k, v in batch.items() if k != "task_mask"}, ids, inner_lr, beta,
      first_order)
  mask = batch["task_mask"]
  return (per_task * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_epoch_fn(gen: GraphGenerator, model: emerg_gnn.EmerGGNN,
                  tx: optax.GradientTransformation, inner_lr: float, beta: float,
                  first_order: bool) -> Callable[..., tuple[dict, jnp.ndarray]]:
  """jit(epoch(state, params, tables, stacked, id_key) -> (state, losses [n_batches])).

  ``stacked`` holds an epoch's task batches on a leading axis; one
  ``lax.scan`` runs the epoch in one dispatch.

  Args:
    gen: the graph generator.
    model: the EmerG GNN.
    tx: the generator's optimizer.
    inner_lr: the inner step size.
    beta: weight of the support loss.
    first_order: stop gradients through the inner step.

  Returns:
    The jitted epoch function.
  """

  def epoch(state, params, tables, stacked, id_key):
    def step(st, batch):
      loss, grads = jax.value_and_grad(meta_loss, argnums=1)(
          gen, st["params"], model, params, tables, batch, id_key, inner_lr, beta,
          first_order)
      st = pretrain.apply_gradients(st, grads, tx)
      return st, loss

    return jax.lax.scan(step, state, stacked)

  return jax.jit(epoch, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def warm_tx(lr: float, weight_decay: float) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay): L2 added to the gradient, then Adam.

  Cached, so that one (lr, decay) is one static argument of ``warm_items``.

  Args:
    lr: learning rate.
    weight_decay: L2 coefficient added to the gradient.

  Returns:
    The optax transformation.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def warm_item(model: emerg_gnn.EmerGGNN, params: Any, tables: backbones.Tables,
              rep: jnp.ndarray, opt_state: Any, rows: dict[str, jnp.ndarray],
              tx: optax.GradientTransformation, steps: int) -> tuple[jnp.ndarray, Any]:
  """``steps`` full-batch Adam steps on one item's rep from its phase rows.

  Args:
    rep: [d + L*F*F] the item's ID embedding and graphs.
    opt_state: its Adam state (``tx.init(rep)`` at warm_a).
    rows: "users", "items", "labels", "mask" each [K].

  Returns:
    (rep, opt_state) after the steps.
  """

  def step(carry, _):
    r, opt = carry
    g = jax.grad(rows_loss, argnums=3)(model, params, tables, r, rows)
    upd, opt = tx.update(g, opt, r)
    return (optax.apply_updates(r, upd), opt), None

  (rep, opt_state), _ = jax.lax.scan(step, (rep, opt_state), None, length=steps)
  return rep, opt_state


@functools.partial(jax.jit, static_argnames=("model", "tx", "steps"))
def warm_items(model: emerg_gnn.EmerGGNN, params: Any, tables: backbones.Tables,
               rep: jnp.ndarray, opt_state: Any, batch: dict[str, jnp.ndarray],
               tx: optax.GradientTransformation, steps: int) -> tuple[jnp.ndarray, Any]:
  """``warm_item`` vmapped over items: rep [n, D], opt_state and batch [n, ...].

  Args:
    model: the EmerG GNN.
    params: its parameters.
    tables: its feature tables.
    rep: [n, D] item representations.
    opt_state: [n, ...] per-item optimizer states.
    batch: the phase's rows, each [n, K].
    tx: the warm-up optimizer.
    steps: Adam steps.

  Returns:
    ([n, D] warmed representations, the optimizer states).
  """
  fn = functools.partial(warm_item, tx=tx, steps=steps)
  return jax.vmap(fn, in_axes=(None, None, None, 0, 0, 0))(
      model, params, tables, rep, opt_state, batch)


class EmerG(methods.Method):
  """Hypernetwork graphs + ID embedding on the emerg_gnn backbone."""
  name = "emerg"
  backbone_kinds = (emerg_gnn.KIND,)

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    if config.backbone != emerg_gnn.KIND:
      raise ValueError(f"emerg scores with its own GNN: set --config.backbone="
                       f"{emerg_gnn.KIND} (got {config.backbone!r})")
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    return methods.Plan(sections=("emerg",), search_space={
        "emerg.lr": space.Float(1e-4, 1e-2, log=True),
        "emerg.inner_lr": space.Float(1e-3, 1e-1, log=True),
        "emerg.warm_lr": space.Float(1e-3, 1e-1, log=True),
        "emerg.warm_steps": space.Int(2, 20),
        "emerg.epochs": space.Int(2, 20)})

  def _generator(self, ctx: methods.Context) -> GraphGenerator:
    return GraphGenerator(n_fields=ctx.model.n_fields, n_layers=ctx.model.gnn_layers)

  def fit(self, ctx: methods.Context) -> Any:
    cfg = ctx.config.emerg
    gen = self._generator(ctx)
    k_init, k_state, k_data, k_ids = jax.random.split(ctx.key, 4)
    side = metaemb.side_embeddings(metaemb.backbone_embed(ctx.params), ctx.tables,
                                   jnp.asarray(ctx.split.old_items[:1]))[0]
    tx = optax.adam(float(cfg.lr))
    state = pretrain.init_state(gen.init(k_init, side), tx, k_state)
    epoch_fn = make_epoch_fn(gen, ctx.model, tx, float(cfg.inner_lr), float(cfg.beta),
                             bool(cfg.first_order))
    seed = metaemb.seed_of(k_data)
    with checkpoint.Checkpointer(ctx.stage_dir("emerg", ("emerg",))) as ckpt:
      state, done = ckpt.restore_or(state)
      if done is not None:
        logging.info("emerg: resumed from epoch %d in %s", done, ckpt.directory)
      for e in range(done or 0, int(cfg.epochs)):
        stacked = {k: jnp.asarray(v) for k, v in self._epoch(ctx, e, seed).items()}
        state, losses = epoch_fn(state, ctx.params, ctx.tables, stacked,
                                 jax.random.fold_in(k_ids, 0))
        logging.info("emerg: epoch %d/%d meta loss %.4f", e + 1, int(cfg.epochs),
                     float(losses.mean()))
        ckpt.save(e + 1, state)
    return {"gen_params": state["params"], "id_key": jax.random.fold_in(k_ids, 1)}

  def _epoch(self, ctx: methods.Context, epoch: int, seed: int) -> dict[str, np.ndarray]:
    """All task batches of one epoch, stacked [n_batches, B, ...] (seeded per epoch)."""
    cfg = ctx.config.emerg
    rng = np.random.default_rng([seed, epoch])
    all_tasks = tasks.build_meta_tasks(ctx.ds, ctx.split, int(cfg.support_rows),
                                       int(cfg.query_rows), rng)
    if not len(all_tasks["item"]):
      raise ValueError("emerg: no old-item tasks to meta-train on")
    batch_list = tasks.batches(all_tasks, int(cfg.batch_tasks), rng)
    return {k: np.stack([b[k] for b in batch_list]) for k in batch_list[0]}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Fresh ID embeddings with the graphs generated from the items' features.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      items: [n] item ids.

    Returns:
      [n, d + L*F*F] cold representations (ID embedding and graphs).
    """
    items = jnp.asarray(items)
    ids = cold_ids(state["id_key"], items, ctx.dim)
    return _cold(self._generator(ctx), state["gen_params"], ctx.model, ctx.params,
                 ctx.tables, items, ids)

  def refine(self, ctx: methods.Context, state: Any, emb: jnp.ndarray,
             batch: dict[str, np.ndarray], items: np.ndarray, phase: int
             ) -> tuple[jnp.ndarray, Any]:
    """Warm-up of each item's ID embedding and graph with one Adam across phases.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      emb: [n, D] current representations.
      batch: the phase's rows, each [n, K].
      items: [n] item ids (unused).
      phase: 0, 1, 2 for warm_a, warm_b, warm_c.

    Returns:
      (new representations, the state with the warm-up optimizer kept for the next phase).
    """
    del items
    cfg = ctx.config.emerg
    tx = warm_tx(float(cfg.warm_lr), float(cfg.weight_decay))
    # One optimizer across the phases, as the reference's warm-up.
    opt = jax.vmap(tx.init)(emb) if phase == 0 else state["warm_opt"]
    rows = {k: jnp.asarray(batch[k]) for k in ("users", "items", "labels", "mask")}
    emb, opt = warm_items(ctx.model, ctx.params, ctx.tables, emb, opt, rows, tx,
                          int(cfg.warm_steps))
    return emb, dict(state, warm_opt=opt)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _cold(gen, gen_params, model, params, tables, items, ids):
  return cold_rep(gen, gen_params, model, params, tables, items, ids)
