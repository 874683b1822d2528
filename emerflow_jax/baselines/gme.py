"""GME-A (Ouyang et al., SIGIR 2021, Graph Meta Embeddings): cold IDs from attribute neighbours.

Graph Meta Embeddings generate a new item's ID embedding from its own
attributes and from old items that share attributes with it.  Of the paper's
three variants, GME-P reads the neighbours' pretrained ID embeddings, GME-G
their generated ones and GME-A their attribute embeddings; the paper reports
GME-A as the best of the three, and it is the one implemented here.

For an item i with side-field embedding z_i (the frozen backbone's embeddings
of every item field but the ID, concatenated) and old-item neighbours
N(i), padded to ``neighbours`` entries with a mask:

    g_j = W z_j;   a_j = softmax_{j in {i} u N(i)} LeakyReLU(v . [g_i ; g_j])
    p_i = ELU(sum_j a_j g_j);   e_i = G([z_i ; p_i])

(G is Linear-ReLU-Linear, as MetaEmb's generator).  Padded neighbours get
attention weight exactly 0, and i itself is always attended, so an item
without neighbours falls back to its own attributes.  The generator is trained
as the paper trains it, MAML-style like MetaEmb on old-item tasks (support =
time chunk j, query = chunk j + 1): ``alpha * L_a(e) + (1 - alpha) *
L_b(e - inner_lr * grad L_a(e))``, vmapped over a batch of tasks.  After each
warm phase: the shared fine-tuning.

Neighbours: the old items of the main backbone (never an emerging or
validation item, never the item itself), ranked by the number of attribute
values they share with the item (a categorical field: equal and not padding;
a sequence field such as title words or genres: each shared token), ties by
item index; only items sharing at least one value qualify.  They are built
from the item attribute tables alone, so no interaction of any item is read.
Neither the EmerG nor the CVAR public code ships a GME implementation, so this
follows the paper.
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
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.models import backbones, scoring


def shared_attributes(ds: dataset_lib.Dataset, items: np.ndarray,
                      pool: np.ndarray) -> np.ndarray:
  """[m, p] number of attribute values items share with pool items.

  Args:
    ds: the dataset (its item side fields; never its rows).
    items: [m] item indices.
    pool: [p] candidate neighbour indices.

  Returns:
    [m, p] float32 counts.
  """
  out = np.zeros((len(items), len(pool)), np.float32)
  for name, table in sorted(ds.item_fields.items()):
    if name == "item_id":
      continue
    a, b = table[items], table[pool]
    if table.ndim == 1:
      out += ((a[:, None] == b[None, :]) & (a[:, None] > 0)).astype(np.float32)
      continue
    vocab = ds.vocab_sizes[f"item/{name}"]
    hot_b = np.zeros((len(pool), vocab), np.float32)
    np.put_along_axis(hot_b, b, 1.0, axis=1)
    hot_a = np.zeros((len(items), vocab), np.float32)
    np.put_along_axis(hot_a, a, 1.0, axis=1)
    hot_a[:, 0] = hot_b[:, 0] = 0.0  # padding is not a shared value
    out += hot_a @ hot_b.T
  return out


def build_neighbours(ds: dataset_lib.Dataset, pool: np.ndarray, n: int,
                     chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Every item's top-n pool neighbours by shared attributes (self excluded).

  Args:
    ds: the dataset.
    pool: [p] old-item indices neighbours are drawn from.
    n: neighbours per item.
    chunk: items scored at once (memory: chunk x p).

  Returns:
    (idx [n_items, n] int32 item indices, mask [n_items, n] float32); padded
    entries have mask 0 (and idx of the first pool item, never read).
  """
  pool = np.asarray(pool)
  idx = np.full((ds.n_items, n), pool[0] if len(pool) else 0, np.int32)
  mask = np.zeros((ds.n_items, n), np.float32)
  for s in range(0, ds.n_items, chunk):
    items = np.arange(s, min(s + chunk, ds.n_items))
    score = shared_attributes(ds, items, pool)
    score[items[:, None] == pool[None, :]] = 0.0  # never its own neighbour
    # Stable sort on -score: ties keep the pool's (ascending index) order.
    order = np.argsort(-score, axis=1, kind="stable")[:, :n]
    top = np.take_along_axis(score, order, axis=1)
    k = order.shape[1]
    idx[items, :k] = pool[order]
    mask[items, :k] = (top > 0).astype(np.float32)
  return idx, mask


class GMEA(nn.Module):
  """GME-A: attention over the attribute embeddings of the item and its neighbours.

  Attributes:
    att_dim: width of the transformed attributes g = W z.
    hidden: generator hidden width.
    out: ID-embedding dimension d.
  """
  att_dim: int
  hidden: int
  out: int

  @nn.compact
  def __call__(self, z: jnp.ndarray, z_nbr: jnp.ndarray,
               mask: jnp.ndarray) -> jnp.ndarray:
    """Generated ID embedding [d] of one item.

    Args:
      z: [D] the item's side-field embedding.
      z_nbr: [n, D] its neighbours'.
      mask: [n] 1 for a real neighbour, 0 for padding.
    """
    init = metaemb.uniform_init(0.01)
    w = nn.Dense(self.att_dim, use_bias=False, kernel_init=init, name="W")
    g_self, g_nbr = w(z), w(z_nbr)
    g_all = jnp.concatenate([g_self[None], g_nbr], 0)  # [1 + n, a]
    valid = jnp.concatenate([jnp.ones((1,), mask.dtype), mask]) > 0
    pair = jnp.concatenate([jnp.broadcast_to(g_self, g_all.shape), g_all], -1)
    logit = nn.leaky_relu(nn.Dense(1, use_bias=False, kernel_init=init,
                                   name="v")(pair)[:, 0], 0.2)
    logit = jnp.where(valid, logit, -jnp.inf)
    att = jax.nn.softmax(logit)  # exactly 0 on padding
    p = nn.elu((att[:, None] * jnp.where(valid[:, None], g_all, 0.0)).sum(0))
    return metaemb.TwoLayer(self.hidden, self.out, name="gen")(jnp.concatenate([z, p]))


def generate(gen: GMEA, gen_params: Any, params: Any, tables: backbones.Tables,
             items: jnp.ndarray, nbr: jnp.ndarray, nbr_mask: jnp.ndarray) -> jnp.ndarray:
  """[n, d] cold ID embeddings of items [n] with neighbours nbr/nbr_mask [n_items, k].

  Args:
    gen: the GME-A generator.
    gen_params: its parameters.
    params: the frozen backbone's parameters.
    tables: its feature tables.
    items: [n] item indices.
    nbr: [n_items, k] neighbour indices of every item.
    nbr_mask: [n_items, k] 1 for real neighbours.

  Returns:
    [n, d] cold ID embeddings.
  """
  embed = metaemb.backbone_embed(params)
  z = metaemb.side_embeddings(embed, tables, items)
  idx, mask = jnp.take(nbr, items, 0), jnp.take(nbr_mask, items, 0)
  z_nbr = metaemb.side_embeddings(embed, tables, idx)
  return jax.vmap(lambda a, b, c: gen.apply(gen_params, a, b, c))(z, z_nbr, mask)


def task_loss(gen: GMEA, gen_params: Any, model: backbones.Backbone, params: Any,
              tables: backbones.Tables, nbrs: tuple[jnp.ndarray, jnp.ndarray],
              task: dict[str, jnp.ndarray], inner_lr: float, alpha: float) -> jnp.ndarray:
  """alpha * L_a(e0) + (1 - alpha) * L_b(e1) of one task (unbatched leaves).

  Args:
    gen: the GME-A generator.
    gen_params: its parameters.
    model: the frozen backbone.
    params: its parameters.
    tables: its feature tables.
    nbrs: (nbr, nbr_mask), each [n_items, k].
    task: one task's unbatched arrays.
    inner_lr: the step from e0 to e1 on chunk a.
    alpha: weight of L_a(e0).

  Returns:
    [] the task's loss.
  """
  e0 = generate(gen, gen_params, params, tables, task["item"][None], *nbrs)[0]
  sup = {k: task[f"support/{k}"] for k in scoring.ROW_KEYS}
  qry = {k: task[f"query/{k}"] for k in scoring.ROW_KEYS}
  loss_a = scoring.item_loss(model, params, tables, e0, sup)
  e1 = metaemb.inner_step(model, params, tables, e0, sup, inner_lr)
  return alpha * loss_a + (1.0 - alpha) * scoring.item_loss(model, params, tables, e1, qry)


def make_epoch_fn(gen: GMEA, model: backbones.Backbone, tx: optax.GradientTransformation,
                  inner_lr: float, alpha: float) -> Callable[..., tuple[dict, jnp.ndarray]]:
  """jit(epoch(state, params, tables, nbrs, stacked) -> (state, losses [n_batches])).

  Args:
    gen: the GME-A generator.
    model: the frozen backbone.
    tx: the generator's optimizer.
    inner_lr: the inner step size.
    alpha: weight of L_a(e0).

  Returns:
    The jitted epoch function.
  """

  def batch_loss(gp, params, tables, nbrs, batch):
    per_task = jax.vmap(task_loss, in_axes=(None, None, None, None, None, None, 0,
                                            None, None))(
        gen, gp, model, params, tables, nbrs,
        {k: v for k, v in batch.items() if k != "task_mask"}, inner_lr, alpha)
    m = batch["task_mask"]
    return (per_task * m).sum() / jnp.maximum(m.sum(), 1.0)

  def epoch(state, params, tables, nbrs, stacked):
    def step(st, batch):
      loss, grads = jax.value_and_grad(batch_loss)(st["params"], params, tables, nbrs,
                                                   batch)
      return pretrain.apply_gradients(st, grads, tx), loss

    return jax.lax.scan(step, state, stacked)

  return jax.jit(epoch, donate_argnums=0)


class GME(methods.Method):
  """GME-A cold embeddings, then the shared fine-tuning."""
  name = "gme"

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    return methods.Plan(sections=("gme",), search_space=dict(
        methods.warmup_space(), **{"gme.lr": space.Float(1e-4, 1e-2, log=True),
                                   "gme.inner_lr": space.Float(1e-4, 1e-1, log=True),
                                   "gme.alpha": space.Float(0.0, 1.0),
                                   "gme.neighbours": space.Int(1, 30)}))

  def _gen(self, ctx: methods.Context) -> GMEA:
    return GMEA(att_dim=ctx.dim, hidden=int(ctx.config.gme.hidden), out=ctx.dim)

  def fit(self, ctx: methods.Context) -> Any:
    cfg = ctx.config.gme
    idx, mask = build_neighbours(ctx.ds, ctx.split.old_items, int(cfg.neighbours))
    nbrs = (jnp.asarray(idx), jnp.asarray(mask))
    logging.info("gme: %.1f neighbours per item on average", float(mask.sum(1).mean()))
    gen = self._gen(ctx)
    k_init, k_state, k_data = jax.random.split(ctx.key, 3)
    embed = metaemb.backbone_embed(ctx.params)
    z = metaemb.side_embeddings(embed, ctx.tables, jnp.asarray(idx[0]))
    gp = gen.init(k_init, z[0], z, nbrs[1][0])
    tx = optax.adam(float(cfg.lr))
    state = pretrain.init_state(gp, tx, k_state)
    epoch_fn = make_epoch_fn(gen, ctx.model, tx, float(cfg.inner_lr), float(cfg.alpha))
    seed = metaemb.seed_of(k_data)
    with checkpoint.Checkpointer(ctx.stage_dir("gme", ("gme",))) as ckpt:
      state, done = ckpt.restore_or(state)
      if done is not None:
        logging.info("gme: resumed from epoch %d in %s", done, ckpt.directory)
      for e in range(done or 0, int(cfg.epochs)):
        rng = np.random.default_rng([seed, e])
        all_tasks = tasks.build_meta_tasks(ctx.ds, ctx.split, int(cfg.support_rows),
                                           int(cfg.query_rows), rng)
        if not len(all_tasks["item"]):
          raise ValueError("gme: no old-item tasks to meta-train on")
        blist = tasks.batches(all_tasks, int(cfg.batch_tasks), rng)
        stacked = {k: jnp.asarray(np.stack([b[k] for b in blist])) for k in blist[0]}
        state, losses = epoch_fn(state, ctx.params, ctx.tables, nbrs, stacked)
        logging.info("gme: epoch %d/%d meta loss %.4f", e + 1, int(cfg.epochs),
                     float(losses.mean()))
        ckpt.save(e + 1, state)
    return {"gen_params": state["params"], "nbrs": nbrs}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Cold ID embeddings generated from the items' attributes and neighbours.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      items: [n] item ids.

    Returns:
      [n, d] generated cold ID embeddings.
    """
    return _generate(self._gen(ctx), state["gen_params"], ctx.params, ctx.tables,
                     jnp.asarray(items), *state["nbrs"])


@functools.partial(jax.jit, static_argnums=0)
def _generate(gen, gen_params, params, tables, items, nbr, nbr_mask):
  return generate(gen, gen_params, params, tables, items, nbr, nbr_mask)
