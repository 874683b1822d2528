"""Stage 2: align the LLM text vector r_i to the backbone's item-embedding space.

A Flax mapper ``g_phi`` takes r_i (standardised with old-item statistics),
optionally concatenated with the frozen backbone's embeddings of the item's raw
fields, and outputs a d-dimensional item embedding.  It is trained on old items
only, with the backbone frozen (DESIGN §3)::

    L_align = ||g_phi(r_i) - e_i||^2 + lambda * BCE(f_theta(x_u, x_i, g_phi(r_i)), y)

where e_i is the pretrained ID embedding and the BCE term runs over old-item
rows.  The cold embedding of an emerging item is g_phi(r_k).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import checkpoint
from emerflow_jax.models import backbones


class Mapper(nn.Module):
  """g_phi: [n, D] text vectors (+ [n, S] side embeddings) -> [n, d]."""
  out_dim: int
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, r: jnp.ndarray, side: jnp.ndarray | None = None) -> jnp.ndarray:
    h = r if side is None else jnp.concatenate([r, side], axis=-1)
    for width in self.hidden:
      h = nn.gelu(nn.Dense(width)(h))
    return nn.Dense(self.out_dim)(h)


def standardize(vectors: np.ndarray, fit_items: np.ndarray) -> np.ndarray:
  """Z-scores every item's vector with mean/std of ``fit_items`` (old items only).

  Using only old items keeps emerging items' vectors out of any statistic.
  """
  ref = vectors[fit_items]
  mu = ref.mean(0)
  sd = ref.std(0) + 1e-6
  return ((vectors - mu) / sd).astype(np.float32)


def item_side_embeddings(params: Any, tables: backbones.Tables,
                         items: jnp.ndarray) -> jnp.ndarray:
  """Frozen backbone embeddings of every item field except the ID: [n, F_side*d].

  Sequence fields are sum-pooled over non-padding entries, as in the backbone.
  """
  embed = params["params"]["embed"]
  out = []
  for key in sorted(tables):
    if not key.startswith("item/") or key == backbones.ITEM_ID:
      continue
    table = embed[key.replace("/", "_")]
    ids = jnp.take(tables[key], items, axis=0)
    if ids.ndim == 2:
      out.append((jnp.take(table, ids, axis=0) * (ids > 0)[..., None]).sum(1))
    else:
      out.append(jnp.take(table, ids, axis=0))
  if not out:
    return jnp.zeros((items.shape[0], 0), jnp.float32)
  return jnp.concatenate(out, axis=-1)


def align_loss(phi: Any, mapper: Mapper, model: backbones.Backbone, params: Any,
               tables: backbones.Tables, r: jnp.ndarray, side: jnp.ndarray | None,
               targets: jnp.ndarray, rows: dict[str, jnp.ndarray],
               lam: float) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """L_align over a batch of old items and a batch of their rows.

  Args:
    phi: mapper parameters.
    mapper, model, params, tables: the mapper and the frozen backbone.
    r: [n_items_total, D] standardised vectors of ALL items (gathered by index).
    side: [n_items_total, S] side embeddings or None.
    targets: [n_items_total, d] pretrained ID embeddings (only old rows used).
    rows: {"items": [b] old item indices for the MSE term, "users", "row_items",
      "labels": [B] old-item rows for the BCE term}.
    lam: weight of the BCE term.

  Returns:
    (loss, {"mse", "bce"}).
  """
  def embed(idx):
    return mapper.apply(phi, r[idx], None if side is None else side[idx])

  mse = jnp.mean(jnp.sum((embed(rows["items"]) - targets[rows["items"]]) ** 2, -1))
  logits = backbones.score(model, params, tables, rows["users"], rows["row_items"],
                           embed(rows["row_items"]))
  bce = backbones.bce_loss(logits, rows["labels"])
  return mse + lam * bce, {"mse": mse, "bce": bce}


def train_mapper(mapper: Mapper, model: backbones.Backbone, params: Any,
                 tables: backbones.Tables, r: np.ndarray, side: np.ndarray | None,
                 old_items: np.ndarray, old_rows: dict[str, np.ndarray],
                 key: jax.Array, steps: int, lr: float, lam: float,
                 batch_rows: int, weight_decay: float, ckpt_dir: str | os.PathLike,
                 log=logging.info) -> Any:
  """Trains g_phi on old items; resumes from ``ckpt_dir``.

  Args:
    r: [n_items, D] standardised vectors; side: [n_items, S] or None.
    old_items: [n_old] item indices whose pretrained embeddings are targets.
    old_rows: {"users", "items", "labels"} [n] old-item rows for the BCE term.
    key: PRNG key.
    steps, lr, lam, batch_rows, weight_decay: training settings.
    ckpt_dir: Orbax directory.

  Returns:
    The mapper parameters phi.
  """
  init_key, state_key = jax.random.split(key)
  r = jnp.asarray(r)
  side = None if side is None else jnp.asarray(side)
  targets = jnp.take(backbones.item_embedding_table(params),
                     backbones.item_ids(tables, jnp.arange(r.shape[0])), axis=0)
  phi = mapper.init(init_key, r[:2], None if side is None else side[:2])
  tx = optax.adamw(lr, weight_decay=weight_decay)
  state = {"params": phi, "opt_state": tx.init(phi), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(state_key)}
  old_items = jnp.asarray(old_items)
  users = jnp.asarray(old_rows["users"])
  items = jnp.asarray(old_rows["items"])
  labels = jnp.asarray(old_rows["labels"])
  n_items_batch = min(256, int(old_items.shape[0]))
  batch_rows = min(batch_rows, int(users.shape[0]))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state):
    k = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_items, k_rows = jax.random.split(k)
    it = jax.random.choice(k_items, old_items, (n_items_batch,), replace=False)
    ridx = jax.random.randint(k_rows, (batch_rows,), 0, users.shape[0])
    batch = {"items": it, "users": users[ridx], "row_items": items[ridx],
             "labels": labels[ridx]}
    (loss, aux), grads = jax.value_and_grad(align_loss, has_aux=True)(
        state["params"], mapper, model, params, tables, r, side, targets, batch, lam)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(state, params=optax.apply_updates(state["params"], updates),
                opt_state=opt_state, step=state["step"] + 1), dict(aux, loss=loss)

  every = max(1, steps // 5)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = int(done or 0)
    if done is not None:
      log(f"align: resumed at step {done}")
    for i in range(start, steps):
      state, aux = step(state)
      if (i + 1) % every == 0 or i + 1 == steps:
        log(f"align: step {i + 1}/{steps} loss {float(aux['loss']):.4f} "
            f"mse {float(aux['mse']):.4f} bce {float(aux['bce']):.4f}")
        ckpt.save(i + 1, state)
  return state["params"]
