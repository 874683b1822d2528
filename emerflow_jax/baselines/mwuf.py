"""MWUF (Zhu et al., SIGIR 2021): meta scaling and shifting of cold ID embeddings.

    warm_i = scale(side_i) * e_i + shift(mean of the embeddings of i's users)

``scale`` reads the frozen backbone's side-field embeddings (every item field
but the ID); ``shift`` reads the mean user-ID embedding of the users in the
rows seen for item i.  Both are trained on old items with the backbone frozen,
as in the CVAR code base: per minibatch of old-item rows, first a per-item
cold embedding table (starting at the mean ID embedding) takes a step on the
BCE loss, then the two meta networks take a step on the BCE loss of the warm
embedding built from that (stopped) cold embedding.

Item -> users: the CVAR code base builds this map with user and item swapped
(``iid, uid = u_ids[i], i_ids[i]``); here ``user_sums`` groups each row's user
under that row's item, which a test pins down.  For an emerging item only the
rows already seen count: none when cold, then warm_a, then warm_a + warm_b,
...; test rows never do.  With no row seen, the shift reads the mean user
embedding of all old-item rows (``mwuf.cold_users = "mean"``) or zeros.

Cold: ``scale(side) * mean_e + shift(cold users)``.  After each phase the
shift term is swapped for the one computed with the users seen so far
(``emb - shift_old + shift_new``), then the shared fine-tuning runs.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import methods
from emerflow_jax.baselines import metaemb
from emerflow_jax.models import backbones

USER_ID = "user/user_id"


def user_vectors(params: Any, tables: backbones.Tables,
                 users: jnp.ndarray) -> jnp.ndarray:
  """S + [d] frozen user-ID embeddings of user indices S.

  Args:
    params: the frozen backbone's parameters.
    tables: feature tables (with "user/user_id").
    users: S int user indices.

  Returns:
    S + [d] embeddings.
  """
  table = params["params"]["embed"][USER_ID.replace("/", "_")]
  return jnp.take(table, jnp.take(tables[USER_ID], users, axis=0), axis=0)


def user_sums(user_emb: jnp.ndarray, owners: jnp.ndarray, mask: jnp.ndarray,
              n_items: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sums the users' embeddings per item over the given rows.

  Args:
    user_emb: [R, d] the embedding of each row's user.
    owners: [R] position (in the item set) of each row's item.
    mask: [R] 1 for rows that count.
    n_items: size of the item set.

  Returns:
    (sums [n_items, d], counts [n_items]).
  """
  sums = jax.ops.segment_sum(user_emb * mask[:, None], owners, n_items)
  counts = jax.ops.segment_sum(mask, owners, n_items)
  return sums, counts


def user_means(sums: jnp.ndarray, counts: jnp.ndarray,
               fallback: jnp.ndarray) -> jnp.ndarray:
  """[n, d] mean user embedding per item, ``fallback`` [d] where none is seen.

  Args:
    sums: [n, d] summed user embeddings per item (``user_sums``).
    counts: [n] rows counted per item.
    fallback: [d] the embedding of an item with no counted row.

  Returns:
    [n, d] means.
  """
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  return jnp.where(counts[:, None] > 0, mean, fallback)


def shift_of(nets: dict, hidden: int, users: jnp.ndarray) -> jnp.ndarray:
  """[n, d] meta shift from the mean embedding of each item's users [n, d].

  Args:
    nets: the meta networks' parameters ({"scale", "shift"}).
    hidden: hidden width of the networks.
    users: [n, d] mean user embedding per item (``user_means``).

  Returns:
    [n, d] shifts.
  """
  return metaemb.TwoLayer(hidden, users.shape[-1]).apply(nets["shift"], users)


def warm_embeddings(nets: dict, hidden: int, emb: jnp.ndarray, side: jnp.ndarray,
                    users: jnp.ndarray) -> jnp.ndarray:
  """[n, d] scale(side [n, S]) * emb [n, d] + shift(users [n, d]).

  Args:
    nets: the meta networks' parameters ({"scale", "shift"}).
    hidden: hidden width of the networks.
    emb: [n, d] cold ID embeddings.
    side: [n, S] side-field embeddings (``metaemb.side_embeddings``).
    users: [n, d] mean user embedding per item.

  Returns:
    [n, d] warm embeddings.
  """
  scale = metaemb.TwoLayer(hidden, emb.shape[-1]).apply(nets["scale"], side)
  return scale * emb + shift_of(nets, hidden, users)


def make_epoch_fn(model: backbones.Backbone, hidden: int, batch_size: int,
                  lr: float):
  """jit(epoch(carry, params, tables, data, key) -> (carry, (cold, warm losses))).

  ``carry`` = {"cold": [n_old, d], "nets", "opt_cold", "opt_nets"}; ``data``
  holds the old-item rows ("users", "items", "labels", "owner" [R]) and per old
  item "side" [n_old, S] and "user_mean" [n_old, d].

  Args:
    model: the backbone module.
    hidden: hidden width of the meta networks.
    batch_size: rows per minibatch; the last R mod batch_size shuffled rows
      are dropped each epoch.
    lr: Adam learning rate of both the cold table and the networks.

  Returns:
    (the jitted epoch, which donates ``carry`` and returns losses each
    [n_batches], the Adam transformation to initialise the carry with).
  """
  tx = optax.adam(lr)

  def epoch(carry, params, tables, data, key):
    n_batches = data["users"].shape[0] // batch_size
    perm = jax.random.permutation(key, data["users"].shape[0])
    perm = perm[:n_batches * batch_size].reshape(n_batches, batch_size)

    def step(c, idx):
      users, items, labels = data["users"][idx], data["items"][idx], data["labels"][idx]
      pos = data["owner"][idx]

      def cold_loss(table):
        logits = backbones.score(model, params, tables, users, items, table[pos])
        return backbones.bce_loss(logits, labels)

      def warm_loss(nets):
        cold = jax.lax.stop_gradient(c["cold"][pos])
        emb = warm_embeddings(nets, hidden, cold, data["side"][pos],
                              data["user_mean"][pos])
        logits = backbones.score(model, params, tables, users, items, emb)
        return backbones.bce_loss(logits, labels)

      l_cold, g = jax.value_and_grad(cold_loss)(c["cold"])
      upd, opt_cold = tx.update(g, c["opt_cold"], c["cold"])
      cold = optax.apply_updates(c["cold"], upd)
      c = dict(c, cold=cold, opt_cold=opt_cold)
      l_warm, g = jax.value_and_grad(warm_loss)(c["nets"])
      upd, opt_nets = tx.update(g, c["opt_nets"], c["nets"])
      c = dict(c, nets=optax.apply_updates(c["nets"], upd), opt_nets=opt_nets)
      return c, (l_cold, l_warm)

    return jax.lax.scan(step, carry, perm)

  return jax.jit(epoch, donate_argnums=0), tx


def training_data(ctx: methods.Context) -> tuple[dict[str, jnp.ndarray], jnp.ndarray]:
  """Old-item rows plus, per old item, its side input and its users' mean.

  Returns:
    ({"users", "items", "labels", "owner" [R] (row -> old-item position),
      "side" [n_old, S], "user_mean" [n_old, d]}, cold_users [d]).
  """
  mode = ctx.config.mwuf.cold_users
  if mode not in ("mean", "zero"):
    raise ValueError(f"mwuf.cold_users must be mean|zero, got {mode!r}")
  old, rows = ctx.split.old_items, ctx.split.base_rows
  pos_of = np.full(ctx.ds.n_items, -1, np.int64)
  pos_of[old] = np.arange(len(old))
  users = jnp.asarray(ctx.ds.users[rows])
  owner = jnp.asarray(pos_of[ctx.ds.items[rows]])
  u_emb = user_vectors(ctx.params, ctx.tables, users)
  sums, counts = user_sums(u_emb, owner, jnp.ones(len(rows)), len(old))
  cold_users = u_emb.mean(0) if mode == "mean" else jnp.zeros_like(u_emb[0])
  data = {"users": users, "items": jnp.asarray(ctx.ds.items[rows]),
          "labels": jnp.asarray(ctx.ds.labels[rows]), "owner": owner,
          "side": metaemb.side_embeddings(metaemb.backbone_embed(ctx.params),
                                          ctx.tables, jnp.asarray(old)),
          "user_mean": user_means(sums, counts, cold_users)}
  return data, cold_users


class MWUF(methods.Method):
  """Meta scaling (side fields) and shifting (seen users) of the cold embedding."""
  name = "mwuf"

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    if config.mwuf.cold_users not in ("mean", "zero"):
      raise ValueError(f"mwuf.cold_users must be mean|zero, got {config.mwuf.cold_users!r}")
    return methods.Plan(sections=("mwuf",), search_space=dict(
        methods.warmup_space(), **{"mwuf.lr": space.Float(1e-4, 1e-2, log=True),
                                   "mwuf.epochs": space.Int(1, 20)}))

  def fit(self, ctx: methods.Context) -> Any:
    cfg = ctx.config.mwuf
    hidden, d = int(cfg.hidden), ctx.dim
    data, cold_users = training_data(ctx)
    old, rows = ctx.split.old_items, ctx.split.base_rows
    mean_e = ctx.old_item_embeddings().mean(0)
    k_scale, k_shift, k_data = jax.random.split(ctx.key, 3)
    net = metaemb.TwoLayer(hidden, d)
    nets = {"scale": net.init(k_scale, data["side"][:1]),
            "shift": net.init(k_shift, data["user_mean"][:1])}
    batch_size = min(int(cfg.batch_size), len(rows))
    epoch_fn, tx = make_epoch_fn(ctx.model, hidden, batch_size, float(cfg.lr))
    cold = jnp.tile(mean_e, (len(old), 1))
    carry = {"cold": cold, "nets": nets, "opt_cold": tx.init(cold),
             "opt_nets": tx.init(nets)}
    for e in range(int(cfg.epochs)):
      carry, (l_cold, l_warm) = epoch_fn(carry, ctx.params, ctx.tables, data,
                                         jax.random.fold_in(k_data, e))
      logging.info("mwuf: epoch %d/%d cold loss %.4f warm loss %.4f", e + 1,
                   int(cfg.epochs), float(l_cold.mean()), float(l_warm.mean()))
    return {"nets": carry["nets"], "mean": mean_e, "cold_users": cold_users}

  def _hidden(self, ctx: methods.Context) -> int:
    return int(ctx.config.mwuf.hidden)

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Implements ``methods.Method.cold``: ``scale(side) * mean_e + shift(cold users)``.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned ("nets", "mean" [d], "cold_users" [d]).
      items: [n] item ids.

    Returns:
      [n, d] cold embeddings.
    """
    n = len(items)
    side = metaemb.side_embeddings(metaemb.backbone_embed(ctx.params), ctx.tables,
                                   jnp.asarray(items))
    return _warm(state["nets"], self._hidden(ctx),
                 jnp.broadcast_to(state["mean"], (n, ctx.dim)), side,
                 jnp.broadcast_to(state["cold_users"], (n, ctx.dim)))

  def refine(self, ctx: methods.Context, state: Any, emb: jnp.ndarray,
             batch: dict[str, np.ndarray], items: np.ndarray, phase: int
             ) -> tuple[jnp.ndarray, Any]:
    """Implements ``methods.Method.refine``: swap the shift, then fine-tune.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned, plus "seen" (users' sums, counts and the
        current shift) from the previous phase; phase 0 starts it afresh.
      emb: [n, d] current embeddings of ``items``.
      batch: the phase's rows, each [n, K], with "mask" [n, K].
      items: [n] item ids.
      phase: 0, 1, 2 for warm_a, warm_b, warm_c.

    Returns:
      (new embeddings [n, d], the state with "seen" covering this phase's rows).
    """
    n, hidden = len(items), self._hidden(ctx)
    seen = state.get("seen")
    if phase == 0:
      # First phase of this item set: no row seen, the shift at its cold input.
      users0 = jnp.broadcast_to(state["cold_users"], (n, ctx.dim))
      seen = {"sums": jnp.zeros((n, ctx.dim)),
              "counts": jnp.zeros(n), "shift": _shift(state["nets"], hidden, users0)}
    k = batch["users"].shape[1]
    u_emb = user_vectors(ctx.params, ctx.tables, jnp.asarray(batch["users"]).reshape(-1))
    owners = jnp.repeat(jnp.arange(n), k)  # row r of the [n, K] block is item r // K
    s, c = user_sums(u_emb, owners, jnp.asarray(batch["mask"]).reshape(-1), n)
    sums, counts = seen["sums"] + s, seen["counts"] + c
    shift = _shift(state["nets"], hidden, user_means(sums, counts, state["cold_users"]))
    emb = emb - seen["shift"] + shift
    emb, _ = super().refine(ctx, state, emb, batch, items, phase)
    seen = {"sums": sums, "counts": counts, "shift": shift}
    return emb, dict(state, seen=seen)


_warm = jax.jit(warm_embeddings, static_argnums=1)
_shift = jax.jit(shift_of, static_argnums=1)
