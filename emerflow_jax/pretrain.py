"""Backbone pretraining on old-item rows, resumable from Orbax checkpoints.

The train state is one pytree ``{"params", "opt_state", "step", "rng"}``.  One
jitted function runs a whole epoch as a ``lax.scan`` over minibatches (state
donated), after a small one that draws the epoch's batches.  The rows are
padded to a shape bucket (``padded_rows``) and the scan skips the empty batch
slots, so every backbone of a process with the same settings and a similar
row count (each seed's, the auxiliary one) runs one compiled epoch: it is
traced once per process, not once per backbone.  A checkpoint is written at the end of an
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

from emerflow_jax import checkpoint, curves, programs, sharding
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


def padded_rows(n: int, batch_size: int) -> int:
  """The length row arrays are padded to before pretraining (a shape bucket).

  The next power of two (rounded up to a multiple of ``batch_size``).
  Backbones whose row counts share a bucket (every seed of a run: their
  validation holdouts differ; the auxiliary backbone, on most of the rows)
  share one compiled epoch.  Padded rows are never drawn into a batch, and
  the scan skips the batch slots past the real ones, so the padding costs
  memory for the row indices only, not compute.

  Args:
    n: the number of rows.
    batch_size: rows per minibatch.

  Returns:
    The padded length, at least ``n``.
  """
  p = 1 << max(int(n) - 1, 0).bit_length()
  return -(-p // int(batch_size)) * int(batch_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _epoch_batches(rng: jax.Array, epoch_idx: jax.Array, n: int, batch_size: int,
                   n_slots: int) -> jax.Array:
  """[n_slots, batch_size] row indices of an epoch's batches, zero rows after
  the ``n // batch_size`` real ones: a permutation of the ``n`` rows keyed by
  ``fold_in(rng, epoch)``, its remainder dropped."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), epoch_idx)
  n_batches = n // batch_size
  perm = jax.random.permutation(key, n)[:n_batches * batch_size]
  perm = perm.reshape(n_batches, batch_size)
  return jnp.pad(perm, ((0, n_slots - n_batches), (0, 0)))


def _epoch_program(model: backbones.Backbone, tx: optax.GradientTransformation,
                   batch_size: int, item_dropout: float,
                   mesh: jax.sharding.Mesh | None) -> Callable[..., Any]:
  """jit(epoch(state, tables, users, items, labels, batches, n_batches, epoch)).

  ``batches`` [S, batch_size] holds row indices; slots from ``n_batches`` on
  are skipped (``lax.cond``: no update, loss 0), so one compiled program
  serves every row count whose batches fit in S slots.
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

  def epoch(state, tables, users, items, labels, batches, n_batches, epoch_idx):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), epoch_idx)

    def step(st, xs):
      idx, i = xs

      def update(st):
        k = jax.random.fold_in(key, i)
        loss, grads = jax.value_and_grad(loss_fn)(
            st["params"], tables, split(users[idx]), split(items[idx]),
            split(labels[idx]), k)
        return apply_gradients(st, grads, tx), loss.astype(jnp.float32)

      return jax.lax.cond(i < n_batches, update,
                          lambda st: (st, jnp.zeros((), jnp.float32)), st)

    return jax.lax.scan(step, state, (batches, jnp.arange(batches.shape[0])))

  if mesh is None:
    return jax.jit(epoch, donate_argnums=0)
  rep = sharding.replicated_sharding(mesh)
  return jax.jit(epoch, donate_argnums=0, out_shardings=(rep, rep))


# One compiled epoch per (model, optimiser settings, batch, dropout, mesh):
# later backbones of a process (other seeds, the auxiliary backbone) reuse it.
_cached_epoch_program = programs.cached(maxsize=64)(
    lambda model, lr, weight_decay, batch_size, item_dropout, mesh: _epoch_program(
        model, make_optimizer(lr, weight_decay), batch_size, item_dropout, mesh))


class EpochFn:
  """``epoch(state, users, items, labels, epoch, n_rows=None) -> (state, losses)``.

  The rows are shuffled with ``fold_in(rng, epoch)`` and cut into
  ``n_rows // batch_size`` full batches (the remainder differs every epoch);
  ``losses`` is [n_rows // batch_size].  ``users``, ``items`` and ``labels``
  may be padded past ``n_rows`` (default: their length), e.g. to
  ``padded_rows``; padded rows are never used.  ``state`` is donated.

  Attributes:
    program: the jitted epoch, ``program(state, tables, users, items, labels,
      batches, n_batches, epoch)``.
    tables: the (replicated) feature tables it is called with.
    batch_size: rows per minibatch.
  """

  def __init__(self, program: Callable[..., Any], tables: backbones.Tables,
               batch_size: int):
    self.program, self.tables, self.batch_size = program, tables, int(batch_size)

  def batches(self, state: State, n_rows: int, n_padded: int,
              epoch_idx: Any) -> jax.Array:
    """The epoch's [n_padded // batch_size, batch_size] batch slots."""
    return _epoch_batches(state["rng"], jnp.asarray(epoch_idx, jnp.int32), int(n_rows),
                          self.batch_size, int(n_padded) // self.batch_size)

  def __call__(self, state: State, users: Any, items: Any, labels: Any, epoch_idx: Any,
               n_rows: int | None = None) -> tuple[State, jnp.ndarray]:
    n_rows = int(users.shape[0]) if n_rows is None else int(n_rows)
    n_batches = n_rows // self.batch_size
    batches = self.batches(state, n_rows, users.shape[0], epoch_idx)
    state, losses = self.program(state, self.tables, users, items, labels, batches,
                                 jnp.asarray(n_batches, jnp.int32),
                                 jnp.asarray(epoch_idx, jnp.int32))
    return state, losses[:n_batches]


def make_epoch_fn(model: backbones.Backbone, tx: optax.GradientTransformation,
                  tables: backbones.Tables, batch_size: int,
                  item_dropout: float = 0.0, mesh: jax.sharding.Mesh | None = None,
                  program: Callable[..., Any] | None = None) -> EpochFn:
  """The epoch of minibatch training (``EpochFn``).

  Args:
    model, tx, tables: the backbone, its optimiser and feature tables.
    batch_size: rows per minibatch.
    item_dropout: DropoutNet's per-batch item-embedding replacement rate.
    mesh: split every minibatch over this mesh's devices (state and rows
      replicated on it, e.g. by ``sharding.replicate``); None: no constraint.
    program: a compiled epoch of these settings to reuse (``_epoch_program``).

  Returns:
    The epoch; it donates ``state``.
  """
  if program is None:
    program = _epoch_program(model, tx, batch_size, item_dropout, mesh)
  if mesh is not None:
    # Tables as a replicated argument, not a closed-over (one-device) constant.
    tables = sharding.replicate(tables, mesh)
  return EpochFn(program, tables, batch_size)


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
  n_rows = int(len(rows["users"]))
  batch_size = min(int(batch_size), n_rows)
  n_padded = padded_rows(n_rows, batch_size)
  pad = lambda x: np.pad(np.asarray(x), (0, n_padded - n_rows))
  state, users, items, labels = sharding.replicate(
      (state, pad(rows["users"]), pad(rows["items"]), pad(rows["labels"])), mesh)
  program = _cached_epoch_program(model, float(lr), float(weight_decay), batch_size,
                                  float(item_dropout), mesh)
  epoch_fn = make_epoch_fn(model, tx, tables, batch_size, item_dropout, mesh, program)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = 0 if done is None else done
    if done is not None:
      log(f"pretrain: resumed from epoch {done} in {ckpt.directory}")
    saved = _clock()
    for e in range(start, epochs):
      state, losses = epoch_fn(state, users, items, labels, e, n_rows)
      # Replicated: each process reads its own copy.
      loss, step = sharding.gather((losses, state["step"]))
      loss = float(loss.mean())
      log(f"pretrain: epoch {e + 1}/{epochs} step {int(step)} loss {loss:.4f}")
      curves.write(writer, e + 1, {"loss": loss})
      if e + 1 == epochs or _clock() - saved >= ckpt_every_s:
        ckpt.save(e + 1, state)
        saved = _clock()
  return state["params"]
