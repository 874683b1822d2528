"""EmerFlow's stage-3 driver: meta-training over epochs, and the sharded rule.

``run_meta_training`` meta-trains the rule's parameters (the mapper's phi or
a shared e0, the step sizes, the prior's shrink) on old-item tasks with
``meta.make_train_step``, resumably, and writes each epoch's losses and step
sizes to the log and to the training curves.  ``refine_items`` applies the
learned rule to every emerging item of a warm phase at once.  Both split
their task/item axis over every device (``sharding.task_mesh``).
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import (align, checkpoint, curves, meta, methods, programs, protocol,
                          rule, sharding, tasks)


def meta_config(cfg: ml_collections.ConfigDict) -> meta.MetaConfig:
  return meta.MetaConfig(inner_steps=int(cfg.meta.inner_steps), beta=float(cfg.meta.beta),
                         first_order=bool(cfg.meta.first_order),
                         learn_alpha=bool(cfg.meta.learn_alpha),
                         train_init=bool(cfg.meta.train_init),
                         rule=str(cfg.meta.inner_rule),
                         phase_alpha=bool(cfg.meta.phase_alpha),
                         outer_loss=str(cfg.meta.outer_loss),
                         cold_in_outer=bool(cfg.meta.cold_in_outer),
                         auc_pairs=int(cfg.meta.auc_pairs))


def build_tasks(ctx: methods.Context, split: protocol.Split,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One epoch of meta-training tasks (``config.meta.tasks``: flow|chunks).

  Args:
    ctx: the run's context (dataset, config).
    split: whose old items give the tasks.
    rng: the epoch's generator (query subsets, task order).

  Returns:
    Task arrays, [n_tasks, ...] each.
  """
  cfg = ctx.config.meta
  if cfg.tasks == "flow":
    return tasks.build_flow_tasks(ctx.ds, split, int(ctx.config.data.k),
                                  int(cfg.query_rows), rng, offset=str(cfg.task_offset))
  if cfg.tasks == "chunks":
    if cfg.phase_alpha:
      raise ValueError("meta.phase_alpha needs meta.tasks='flow'")
    return tasks.build_meta_tasks(ctx.ds, split, int(cfg.support_rows),
                                  int(cfg.query_rows), rng)
  raise ValueError(f"meta.tasks must be flow or chunks, got {cfg.tasks!r}")


# The learned rule: what carries over from an auxiliary backbone.
RULE_PARAMS = ("log_alpha", "shrink")


def outer_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the meta params; ``meta.alpha_lr`` (if > 0) for the rule's scalars.

  The step sizes (in log space) and the prior's shrink want moves of order
  one within a few hundred steps, far more than the mapper weights should move.
  """
  return _optimizer(float(cfg.meta.lr), float(cfg.meta.alpha_lr))


def _optimizer(lr: float, alpha_lr: float) -> optax.GradientTransformation:
  if alpha_lr <= 0:
    return optax.adam(lr)
  label = lambda params: {k: ("alpha" if k in RULE_PARAMS else "rest") for k in params}
  return optax.multi_transform({"alpha": optax.adam(alpha_lr), "rest": optax.adam(lr)},
                               label)


@programs.cached(maxsize=32)
def _train_step(model, mapper, mcfg: meta.MetaConfig, lr: float, alpha_lr: float,
                mesh: jax.sharding.Mesh):
  """(the jitted meta step, its optimizer), built once per process and setting:
  every seed's meta-training (and the auxiliary backbone's) reuses the trace."""
  tx = _optimizer(lr, alpha_lr)
  return meta.make_train_step(model, mapper, mcfg, tx, mesh), tx


def run_meta_training(ctx: methods.Context, mapper: align.Mapper | None,
                      params: dict[str, Any], frozen: dict[str, Any],
                      ckpt_dir: pathlib.Path, task_items: np.ndarray | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Meta-trains ``params`` (phi and/or e0, alpha) on old-item tasks; resumable.

  Flow tasks from each item's first row (the default) are packed once
  (``tasks.flow_task_pool``) and kept on the device; every epoch draws its
  query subsets and batches there (``tasks.sample_epoch``, keyed by
  ``fold_in(key, epoch)``).  Other layouts are rebuilt on the host each epoch
  (``build_tasks``, seeded per epoch).  Either way a resumed run sees exactly
  the tasks an uninterrupted one would.  Each batch is split over ``mesh``
  (default: every device); padding it to a multiple of the mesh size adds
  fully masked tasks only, so the result does not depend on the device count.

  Nothing inside an epoch waits for the device: its metrics stay there until
  a checkpoint (after the first epoch that ends ``meta.ckpt_every_s`` seconds
  of training after the last one) or the end, where every pending epoch is
  logged in one transfer.  The final state is not saved unless that budget
  is due: the stage's result lives in the run's result file, and a run killed
  before writing it recomputes at most ``ckpt_every_s`` seconds from the last
  checkpoint, to the same bits (an Orbax save cost a third of a 24-step
  stage on ML-100K).

  Args:
    ctx: the run's context (backbone, config, key).
    mapper: g_phi, or None (no-align ablation).
    params: the initial meta parameters.
    frozen: backbone params and tables, text vectors and the like.
    ckpt_dir: the stage's checkpoint folder (resumed from).
    task_items: old items held out of the backbone, the only tasks; None:
      every old item of ``ctx.split``.
    mesh: the device mesh (default: every device).

  Returns:
    The meta-trained parameters.
  """
  cfg = ctx.config
  mcfg = meta_config(cfg)
  mesh = sharding.task_mesh() if mesh is None else mesh
  step_fn, tx = _train_step(ctx.model, mapper, mcfg, float(cfg.meta.lr),
                            float(cfg.meta.alpha_lr), mesh)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.fold_in(ctx.key, 7))}
  state, frozen = sharding.replicate((state, frozen), mesh)
  epochs, batch_tasks = int(cfg.meta.epochs), int(cfg.meta.batch_tasks)
  task_split = ctx.split
  if task_items is not None:
    # ``task_items``: old items held out of the backbone's pretraining.
    task_split = protocol.chunk_items(ctx.ds, ctx.split, task_items)
    logging.info("meta: %d tasks' items held out of pretraining", len(task_items))
  epoch_batches = _device_epochs(ctx, task_split, mesh)
  if epoch_batches is None:
    seed = int(jax.random.randint(jax.random.fold_in(ctx.key, 11), (), 0, 2**30))

    def epoch_batches(epoch):
      rng = np.random.default_rng([seed, epoch])
      return [sharding.shard_tasks(b, mesh) for b in
              tasks.batches(build_tasks(ctx, task_split, rng), batch_tasks, rng)]

  every_s = float(cfg.meta.ckpt_every_s)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = int(done or 0)
    if done is not None:
      logging.info("meta: resumed at epoch %d", done)
    pending, last_save = [], time.monotonic()
    for epoch in range(start, epochs):
      logs = []
      for batch in epoch_batches(epoch):
        state, m = step_fn(state, frozen, batch)
        logs.append(m)
      pending.append(_epoch_summary(logs, state))
      if time.monotonic() - last_save >= every_s:
        ckpt.save(epoch + 1, state)
        _log_epochs(ctx, ckpt_dir, mcfg, epoch + 1 - len(pending), epochs, pending)
        pending, last_save = [], time.monotonic()
    if pending:  # epochs after the last save: logged, not saved (see above)
      _log_epochs(ctx, ckpt_dir, mcfg, epochs - len(pending), epochs, pending)
  return jax.tree.map(jnp.asarray, sharding.gather(state["params"]))


def _device_epochs(ctx: methods.Context, split: protocol.Split,
                   mesh: jax.sharding.Mesh):
  """``epoch -> [batch]`` drawn on the device from tasks packed once, or None.

  Only flow tasks from the first row have a fixed pool (random offsets and
  chunk tasks are rebuilt on the host).  Each batch of ``meta.batch_tasks``
  tasks is padded with masked tasks to a multiple of the mesh size, as
  ``sharding.shard_tasks`` pads a host batch.
  """
  m = ctx.config.meta
  if m.tasks != "flow" or m.task_offset != "first":
    return None
  b = int(m.batch_tasks)
  pool = tasks.flow_task_pool(ctx.ds, split, int(ctx.config.data.k), int(m.query_rows))
  n_batches = -(-(len(pool["item"]) - 1) // b)
  pool = sharding.replicate(pool, mesh)
  extra = sharding.padded_size(b, mesh) - b
  key = jax.random.fold_in(ctx.key, 11)
  sample = _sample_program(int(m.query_rows), b, extra, n_batches, mesh)

  def epoch_batches(epoch):
    return sample(pool, key, jnp.asarray(epoch, jnp.int32))

  return epoch_batches


@programs.cached(maxsize=32)
def _sample_program(query_rows: int, batch_tasks: int, extra: int, n_batches: int,
                    mesh: jax.sharding.Mesh) -> Any:
  """jit(sample(pool, key, epoch)) -> the epoch's batches, each split over ``mesh``.

  One program per epoch returns all its batches (a dispatch per batch cost
  about as much as the meta step itself); the key is an argument, so the
  seeds of a process share one trace.
  """

  def sample(pool, key, epoch):
    ep = tasks.sample_epoch(pool, jax.random.fold_in(key, epoch), query_rows, batch_tasks)
    ep = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)),
                      ep)
    return [jax.tree.map(lambda x: x[i], ep) for i in range(n_batches)]

  return jax.jit(sample, out_shardings=sharding.task_sharding(mesh))


@jax.jit
def _epoch_summary(logs: list[dict[str, jnp.ndarray]],
                   state: dict[str, Any]) -> dict[str, jnp.ndarray]:
  """An epoch's mean metrics, step sizes and step, as new device arrays.

  New arrays, since the next step donates ``state``; nothing is fetched
  here.  One compiled program, not a dispatch per metric.
  """
  out = {k: jnp.mean(jnp.stack([m[k] for m in logs])) for k in logs[0]}
  out["alpha"] = rule.step_size(state["params"])
  out["step"] = state["step"] + 0
  if "shrink" in state["params"]:
    out["shrink"] = state["params"]["shrink"] + 0.0
  return out


def _log_epochs(ctx: methods.Context, ckpt_dir: pathlib.Path, mcfg: meta.MetaConfig,
                first: int, epochs: int, pending: list[dict[str, jnp.ndarray]]) -> None:
  """Logs and writes the curves of epochs ``first + 1 ...`` in one transfer."""
  writer = curves.prefixed(ctx.writer, ckpt_dir.name.split("-")[0])
  for i, s in enumerate(jax.device_get(sharding.gather(pending))):
    epoch = first + i + 1
    alpha = np.atleast_1d(s.pop("alpha"))
    per_alpha = alpha.reshape(alpha.shape[0], -1).mean(1)
    if "query_rank" in s:
      logging.info("meta: epoch %d pooled pairwise query loss %.4f", epoch,
                   s["query_rank"])
    per_phase = (" ".join(f"{a:.4f}" for a in per_alpha) if mcfg.phase_alpha
                 else f"{alpha.mean():.4f}")
    if "shrink" in s:
      per_phase += f" shrink {float(s.pop('shrink')):.3f}"
    step = int(s.pop("step"))
    logging.info("meta: epoch %d/%d step %d loss %.4f query L(e0) %.4f -> L(eT) %.4f "
                 "alpha %s", epoch, epochs, step, s["loss"], s["query_e0"],
                 s["query_eT"], per_phase)
    curves.write(writer, epoch, dict({k: float(v) for k, v in s.items()},
                                     **{f"alpha_{j}": a for j, a in enumerate(per_alpha)}))


def refine_items(meta_params: dict[str, Any], model, mcfg: meta.MetaConfig,
                 frozen: dict[str, Any], emb: jnp.ndarray, batch: dict[str, Any],
                 mesh: jax.sharding.Mesh | None = None, phase: int = 0) -> jnp.ndarray:
  """``rule.adapt_items`` with the item axis split over ``mesh`` (default: all).

  Args:
    meta_params: holds the learned ``log_alpha``.
    model: the frozen backbone module.
    mcfg: the inner-loop settings.
    frozen: backbone params and tables.
    emb: [n, d] current embeddings.
    batch: Packed phase rows, each [n, K].
    mesh: from ``sharding.task_mesh``.
    phase: warm phase index (picks alpha_p with per-phase step sizes).

  Returns:
    [n, d] adapted embeddings on the default device.
  """
  mesh = sharding.task_mesh() if mesh is None else mesh
  n = emb.shape[0]
  rows = {k: batch[k] for k in ("users", "items", "labels", "mask")}
  emb_s, rows_s = sharding.shard_tasks((emb, rows), mesh)
  params_r, frozen_r = sharding.replicate((meta_params, frozen), mesh)
  out = rule.adapt_items(params_r, model, mcfg, frozen_r, emb_s, rows_s,
                         jnp.asarray(phase, jnp.int32))
  return jnp.asarray(sharding.gather(out)[:n])
