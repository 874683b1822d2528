"""Backbone pretraining on old-item rows, resumable from Orbax checkpoints.

The train state is one pytree ``{"params", "opt_state", "step", "rng"}``.  One
jitted function runs a whole epoch as a ``lax.scan`` over minibatches (one
dispatch per epoch, state donated).  A checkpoint is written at the end of an
epoch once ``ckpt_every_s`` seconds have passed since the last one
(``optim.ckpt_every_s``; a 2-second ML-100K pretraining writes only its last
epoch), and after the last epoch, so a killed run resumes at its last saved
epoch and ends exactly where an uninterrupted run ends (the epoch's shuffling
key is ``fold_in(rng, epoch)``).

Data parallel over ``sharding.task_mesh()`` (every device, every host): the
rows and the train state are replicated, each minibatch is split over the
devices, and XLA all-reduces the gradient, so every device applies the same
Adam update.  Only the order of the batch sums depends on the device count.

DropoutNet's item-embedding dropout lives here because it changes pretraining:
with probability ``item_dropout`` a batch's item-ID embeddings are replaced by
the mean item embedding of the batch's items, so that the model learns to
score from side features when the ID embedding is uninformative.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import checkpoint, curves, sharding
from emerflow_jax.models import backbones

State = dict[str, Any]


# The clock of the checkpoint cadence (a test replaces it).
_clock = time.monotonic

def make_optimizer(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam, or AdamW when ``weight_decay`` > 0.

  Args:
    lr: learning rate.
    weight_decay: AdamW decay (0: plain Adam).

  Returns:
    The optax transformation.
  """
  if weight_decay:
    return optax.adamw(lr, weight_decay=weight_decay)
  return optax.adam(lr)


def init_state(params: Any, tx: optax.GradientTransformation, key: jax.Array) -> State:
  """A fresh train state.

  Args:
    params: the model parameters.
    tx: the optimizer.
    key: PRNG key stored as raw key data (dropout, shuffling).

  Returns:
    {"params", "opt_state", "step" = 0, "rng"}.
  """
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(key)}


def apply_gradients(state: State, grads: Any, tx: optax.GradientTransformation) -> State:
  """One optimizer step on a ``{"params", "opt_state", "step", ...}`` train state.

  Args:
    state: the train state (other keys pass through).
    grads: gradients, shaped like ``state["params"]``.
    tx: the optimizer ``state["opt_state"]`` belongs to.

  Returns:
    The state after the step, ``step`` incremented.
  """
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  return dict(state, params=optax.apply_updates(state["params"], updates),
              opt_state=opt_state, step=state["step"] + 1)


def make_epoch_fn(model: backbones.Backbone, tx: optax.GradientTransformation,
                  tables: backbones.Tables, batch_size: int,
                  item_dropout: float = 0.0, mesh: jax.sharding.Mesh | None = None
                  ) -> Callable[..., tuple[State, jnp.ndarray]]:
  """Returns jit(epoch(state, users, items, labels, epoch) -> (state, losses)).

  Rows are shuffled with ``fold_in(rng, epoch)`` and cut into
  ``n // batch_size`` full batches (the remainder differs every epoch).

  Args:
    model, tx, tables: the backbone, its optimiser and feature tables.
    batch_size: rows per minibatch.
    item_dropout: DropoutNet's per-batch item-embedding replacement rate.
    mesh: split every minibatch over this mesh's devices (state and rows
      replicated on it, e.g. by ``sharding.replicate``); None: no constraint.

  Returns:
    The jitted epoch; it donates ``state``; ``losses`` is [n // batch_size].
  """

  def split(x):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.task_sharding(mesh))

  def loss_fn(params, tables, users, items, labels, key):
    item_emb = None
    if item_dropout > 0:
      table = backbones.item_embedding_table(params)
      ids = backbones.item_ids(tables, items)
      emb = jnp.take(table, ids, axis=0)
      drop = jax.random.bernoulli(key, item_dropout)
      item_emb = jnp.where(drop, emb.mean(0, keepdims=True), emb)
    logits = backbones.score(model, params, tables, users, items, item_emb)
    return backbones.bce_loss(logits, labels)

  def epoch(state, tables, users, items, labels, epoch_idx):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), epoch_idx)
    n_batches = users.shape[0] // batch_size
    perm = jax.random.permutation(key, users.shape[0])[:n_batches * batch_size]
    perm = perm.reshape(n_batches, batch_size)

    def step(st, xs):
      idx, i = xs
      k = jax.random.fold_in(key, i)
      loss, grads = jax.value_and_grad(loss_fn)(
          st["params"], tables, split(users[idx]), split(items[idx]),
          split(labels[idx]), k)
      st = apply_gradients(st, grads, tx)
      return st, loss

    return jax.lax.scan(step, state, (perm, jnp.arange(n_batches)))

  if mesh is None:
    fn = jax.jit(epoch, donate_argnums=0)
  else:
    rep = sharding.replicated_sharding(mesh)
    fn = jax.jit(epoch, donate_argnums=0, out_shardings=(rep, rep))
    # Tables as a replicated argument, not a closed-over (one-device) constant.
    tables = sharding.replicate(tables, mesh)
  return functools.partial(_with_tables, fn, tables)


def _with_tables(fn, tables, state, users, items, labels, epoch_idx):
  return fn(state, tables, users, items, labels, epoch_idx)


def pretrain_backbone(model: backbones.Backbone, tables: backbones.Tables,
                      rows: dict[str, np.ndarray], key: jax.Array, epochs: int,
                      batch_size: int, lr: float, ckpt_dir: str | os.PathLike,
                      item_dropout: float = 0.0, weight_decay: float = 0.0,
                      log: Callable[[str], None] = logging.info,
                      writer: Any = None,
                      mesh: jax.sharding.Mesh | None = None,
                      ckpt_every_s: float = 0.0) -> Any:
  """Pretrains the backbone on ``rows`` and returns its parameters.

  Args:
    model: the backbone.
    tables: feature tables.
    rows: {"users", "items", "labels"} [n] arrays (old-item rows).
    key: PRNG key (init and shuffling).
    epochs: passes over the rows.
    batch_size: minibatch size.
    lr: Adam learning rate.
    ckpt_dir: Orbax directory; an existing checkpoint is resumed.
    item_dropout: DropoutNet's per-batch item-embedding replacement rate.
    weight_decay: optional AdamW decay.
    log: progress logger.
    writer: optional ``curves`` writer (``loss`` per epoch).
    mesh: the devices every minibatch is split over (default: all of them,
      ``sharding.task_mesh()``).
    ckpt_every_s: checkpoint when at least this many seconds of training have
      passed since the last one, and after the last epoch (0: every epoch).
      A killed run resumes bit-exactly from whichever epoch was saved.

  Returns:
    The trained parameters (replicated on ``mesh``).
  """
  init_key, state_key = jax.random.split(key)
  tx = make_optimizer(lr, weight_decay)
  mesh = sharding.task_mesh() if mesh is None else mesh
  state = init_state(backbones.init_params(model, tables, init_key), tx, state_key)
  state, users, items, labels = sharding.replicate(
      (state, rows["users"], rows["items"], rows["labels"]), mesh)
  batch_size = min(batch_size, int(users.shape[0]))
  epoch_fn = make_epoch_fn(model, tx, tables, batch_size, item_dropout, mesh)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = 0 if done is None else done
    if done is not None:
      log(f"pretrain: resumed from epoch {done} in {ckpt.directory}")
    saved = _clock()
    for e in range(start, epochs):
      state, losses = epoch_fn(state, users, items, labels, e)
      # Replicated: each process reads its own copy.
      loss, step = sharding.gather((losses, state["step"]))
      loss = float(loss.mean())
      log(f"pretrain: epoch {e + 1}/{epochs} step {int(step)} loss {loss:.4f}")
      curves.write(writer, e + 1, {"loss": loss})
      if e + 1 == epochs or _clock() - saved >= ckpt_every_s:
        ckpt.save(e + 1, state)
        saved = _clock()
  return state["params"]
