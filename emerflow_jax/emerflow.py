"""EmerFlow as a method on the shared harness, and its three ablations.

``fit`` runs stages 2 and 3 on old items (stage 1, the LLM enrichment, is
loaded from disk by the harness as ``ctx.vectors``):

1. standardise r_i with old-item statistics;
2. align: train g_phi so that g_phi(r_i) matches the pretrained ID embedding
   and scores old-item rows well (``align.train_mapper``);
3. meta-learn: train (phi, alpha) so that a few steps of the learned rule on an
   item's first rows give good predictions on its later rows
   (``meta.make_train_step``).  ``meta.tasks="flow"`` (default) replays the
   protocol on each old item: its first K, next K, next K rows are three warm
   phases, each scored on the rows after them, with one learned step size per
   phase (``tasks.build_flow_tasks``); ``"chunks"`` pairs chunk j with chunk
   j+1 of the item's history (``tasks.build_meta_tasks``).

Warm-up phases then apply the learned rule to all emerging items at once,
warm phase p with the step size learned for phase p.
Both the meta-training step and the warm-up rule split their task/item axis
over every device (``sharding.task_mesh``); one device is the trivial case.

Which ``meta`` options combine (anything else raises in ``plan``):

- where meta-tasks come from: old items of the main backbone (default when
  ``rule_holdout = holdout_fraction = 0``; ``crossfit_folds > 1`` then starts
  them from out-of-fold mapper outputs), items held out of main's pretraining
  (``holdout_fraction > 0``), or items held out of an auxiliary backbone
  (``rule_holdout > 0``, the default; only ``RULE_PARAMS`` carry over, so
  ``train_init`` must be off);
- ``phase_alpha`` needs ``tasks="flow"``; ``cold_in_outer`` needs
  ``learn_shrink`` (nothing else changes the cold phase);
- ``support_rows`` is read by chunk tasks only (flow tasks use ``data.k``).

Ablations: ``emerflow_no_llm`` (r_i from the raw-feature text only),
``emerflow_no_align`` (meta-learning from one learned shared init, no mapper),
``emerflow_no_meta`` (aligned cold embedding + the shared fine-tuning).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import (align, checkpoint, curves, meta, methods, posterior, protocol,
                          sharding, tasks)


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
  """One epoch of meta-training tasks (``config.meta.tasks``: flow|chunks)."""
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
# Config sections each stage reads (their cache keys cover exactly these,
# plus the backbone the stage is built on).
ALIGN_SECTIONS = ("enrich", "align")
META_SECTIONS = ("enrich", "align", "meta")


def regen_keep(config: ml_collections.ConfigDict) -> tuple[float, float, float]:
  """Per warm phase, the share of an item's adapted embedding kept (``regen``)."""
  keep = tuple(float(config.regen[f"keep_{p[-1]}"]) for p in protocol.WARM_PHASES)
  if not all(0.0 <= k <= 1.0 for k in keep):
    raise ValueError(f"regen.keep_* must be in [0, 1], got {keep}")
  return keep


def _check_meta_options(config: ml_collections.ConfigDict) -> None:
  """Raises on option combinations where an option would have no effect."""
  m = config.meta
  if m.rule_holdout > 0 and m.train_init:
    raise ValueError("meta.rule_holdout > 0 learns the rule on an auxiliary backbone "
                     "and transfers only the step sizes; it needs meta.train_init=False")
  if m.crossfit_folds > 1 and (m.rule_holdout > 0 or m.holdout_fraction > 0):
    raise ValueError("meta.crossfit_folds > 1 starts meta-tasks from out-of-fold mapper "
                     "outputs of in-sample items; with meta.rule_holdout or "
                     "meta.holdout_fraction > 0 the tasks are held out already and it "
                     "would have no effect: set meta.crossfit_folds=1")
  if m.cold_in_outer and not m.learn_shrink:
    raise ValueError("meta.cold_in_outer scores the cold phase, which only "
                     "meta.learn_shrink can change: set learn_shrink=True or turn it off")
  if m.phase_alpha and m.tasks != "flow":
    raise ValueError("meta.phase_alpha needs meta.tasks='flow'")


def outer_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the meta params; ``meta.alpha_lr`` (if > 0) for the rule's scalars.

  The step sizes (in log space) and the prior's shrink want moves of order
  one within a few hundred steps, far more than the mapper weights should move.
  """
  lr, alpha_lr = float(cfg.meta.lr), float(cfg.meta.alpha_lr)
  if alpha_lr <= 0:
    return optax.adam(lr)
  label = lambda params: {k: ("alpha" if k in RULE_PARAMS else "rest") for k in params}
  return optax.multi_transform({"alpha": optax.adam(alpha_lr), "rest": optax.adam(lr)},
                               label)


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
  a checkpoint (every ``meta.ckpt_every_s`` seconds of training, and after
  the last epoch), where every pending epoch is logged in one transfer.
  """
  cfg = ctx.config
  mcfg = meta_config(cfg)
  mesh = sharding.task_mesh() if mesh is None else mesh
  tx = outer_optimizer(cfg)
  step_fn = meta.make_train_step(ctx.model, mapper, mcfg, tx, mesh)
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
      if epoch + 1 == epochs or time.monotonic() - last_save >= every_s:
        ckpt.save(epoch + 1, state)
        _log_epochs(ctx, ckpt_dir, mcfg, epoch + 1 - len(pending), epochs, pending)
        pending, last_save = [], time.monotonic()
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

  def sample(pool, epoch):
    ep = tasks.sample_epoch(pool, jax.random.fold_in(key, epoch), int(m.query_rows), b)
    return jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)),
                        ep)

  sample = jax.jit(sample)
  take = jax.jit(lambda ep, i: jax.tree.map(lambda x: x[i], ep),
                 out_shardings=sharding.task_sharding(mesh))

  def epoch_batches(epoch):
    ep = sample(pool, jnp.asarray(epoch, jnp.int32))
    return [take(ep, jnp.asarray(i, jnp.int32)) for i in range(n_batches)]

  return epoch_batches


def _epoch_summary(logs: list[dict[str, jnp.ndarray]],
                   state: dict[str, Any]) -> dict[str, jnp.ndarray]:
  """An epoch's mean metrics, step sizes and step, as new device arrays.

  New arrays, since the next step donates ``state``; nothing is fetched here.
  """
  out = {k: jnp.mean(jnp.stack([m[k] for m in logs])) for k in logs[0]}
  out["alpha"] = meta.step_size(state["params"])
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
  """``meta.adapt_items`` with the item axis split over ``mesh`` (default: all).

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
  out = meta.adapt_items(params_r, model, mcfg, frozen_r, emb_s, rows_s,
                         jnp.asarray(phase, jnp.int32))
  return jnp.asarray(sharding.gather(out)[:n])


class EmerFlow(methods.Method):
  """The full method: LLM vectors -> aligned cold embedding -> meta-learned rule."""
  name = "emerflow"
  vector_source: str | None = None  # overrides enrich.source (the no-LLM ablation)
  use_align = True
  use_meta = True

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    """Backbones: main (minus ``meta.holdout_fraction`` of old items kept for
    meta-tasks) and, with ``meta.rule_holdout`` > 0, "rule": an auxiliary
    backbone without that share of main's old items, on which the rule is
    meta-learned.  Combinations that would leave an option without effect
    are errors."""
    m = config.meta
    specs = [methods.BackboneSpec()]
    if self.use_meta:
      _check_meta_options(config)
      if m.holdout_fraction > 0:
        specs = [methods.BackboneSpec(leave_out=float(m.holdout_fraction), carve_salt=7919)]
      if m.rule_holdout > 0:
        specs.append(methods.BackboneSpec(role="rule", leave_out=float(m.rule_holdout),
                                          pick=str(m.rule_pick), carve_salt=104729))
    source = self.vector_source or str(config.enrich.source)
    return methods.Plan(backbones=tuple(specs),
                        vectors=source if self.use_align else None,
                        sections=("enrich", "align", "meta", "regen"),
                        search_space=self.search_space(config))

  def search_space(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The rule's and the alignment's settings (the warm-up is the rule's).

    Only settings that act under ``config`` are searched: the mapper's loss
    weight and decay for ``align.kind=mlp``; otherwise the closed-form kind
    itself (each fits its own penalty, rank or neighbours by CV on old items).
    """
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    out = {}
    if self.use_align:
      if config.align.kind == "mlp":
        out.update({"align.lam": space.Float(0.01, 1.0, log=True),
                    "align.weight_decay": space.Float(1e-5, 1e-2, log=True)})
      else:
        out["align.kind"] = space.Categorical(("lowrank", "ridge", "knn"))
      out.update({f"regen.keep_{p}": space.Float(0.5, 1.0) for p in "abc"})
    if self.use_meta:
      out.update({"meta.alpha": space.Float(3e-3, 3e-2, log=True),
                  "meta.alpha_lr": space.Float(1e-3, 1e-1, log=True),
                  "meta.beta": space.Float(0.0, 0.5),
                  "meta.rule_holdout": space.Float(0.2, 0.5)})
    else:
      out.update(methods.warmup_space())
    return out

  def fit(self, ctx: methods.Context) -> dict[str, Any]:
    cfg = ctx.config
    n_items = ctx.ds.n_items
    # The no-align ablation reads no vectors: a zero r_i stands in (unused).
    vectors = ctx.vectors if ctx.vectors is not None else np.zeros((n_items, 1))
    r = align.standardize(np.asarray(vectors, np.float32), ctx.split.old_items)
    side = None
    if cfg.align.use_fields:
      side = align.item_side_embeddings(ctx.params, ctx.tables, jnp.arange(n_items))
    frozen = {"params": ctx.params, "tables": ctx.tables, "r": jnp.asarray(r),
              "center": jnp.mean(ctx.old_item_embeddings(), 0)}
    if side is not None:
      frozen["side"] = side
    dim = ctx.dim
    alpha = meta.init_alpha(float(cfg.meta.alpha), cfg.meta.alpha_mode, dim,
                            len(protocol.WARM_PHASES) if cfg.meta.phase_alpha else 0)
    mapper = None
    meta_frozen = frozen
    if self.use_align:
      mapper = align.Mapper(out_dim=dim, hidden=tuple(cfg.align.hidden))
      phi = self._align(ctx, mapper, r, side, ctx.split.old_items, "align", 1)
      params = {"phi": phi, "log_alpha": alpha}
      if self.use_meta and cfg.meta.learn_shrink:
        params["shrink"] = jnp.ones((), jnp.float32)
      folds = int(cfg.meta.crossfit_folds)
      if self.use_meta and folds > 1:  # the plan allows it only without held-out items
        meta_frozen = dict(frozen, e0_table=self._crossfit(ctx, mapper, r, side, folds))
    else:
      params = {"e0": jnp.mean(ctx.old_item_embeddings(), 0), "log_alpha": alpha}
    if self.use_meta and (cfg.meta.rule_holdout > 0) != ("rule" in ctx.backbones):
      raise ValueError("meta.rule_holdout > 0 needs the 'rule' backbone of the plan "
                       "(and only then): run the method through train.py")
    if self.use_meta and "rule" in ctx.backbones:
      params = dict(params, **self._rule_on_aux(ctx, mapper, r, params))
    elif self.use_meta:
      held = ctx.backbones["main"].held
      params = run_meta_training(ctx, mapper, params, meta_frozen,
                                 ctx.stage_dir("meta", META_SECTIONS),
                                 held if len(held) else None)
    return {"params": params, "mapper": mapper, "frozen": frozen,
            "regen": self._regen_state(ctx, r)}

  def _regen_state(self, ctx: methods.Context, r: np.ndarray) -> dict[str, Any] | None:
    """What ``posterior.regenerate`` needs after each phase (None when off)."""
    keep = regen_keep(ctx.config)
    if not self.use_align or all(k >= 1.0 for k in keep):
      return None
    r_old = jnp.asarray(r[ctx.split.old_items])
    e_old = ctx.old_item_embeddings()
    lam = float(ctx.config.regen.lam) or posterior.choose_lambda(r_old, e_old)
    logging.info("regen: keep %s, ridge lambda %g", keep, lam)
    return {"r_old": r_old, "e_old": e_old, "lam": lam, "keep": keep,
            "r": jnp.asarray(r)}

  def _rule_on_aux(self, ctx: methods.Context, mapper: align.Mapper | None,
                   r: np.ndarray, init: dict[str, Any]) -> dict[str, jnp.ndarray]:
    """Meta-learns the rule on the auxiliary backbone's held-out items.

    Everything stage 2 does is redone against the auxiliary backbone (its
    side embeddings, a mapper aligned to its item space on its own old items),
    so the held-out items start exactly as emerging items start on the main
    backbone: from the cold embedding of a mapper that never saw them.  Only
    the rule (``RULE_PARAMS``: step sizes, prior shrink) carries over.
    """
    aux = ctx.backbones["rule"]
    # The auxiliary backbone in main's place: every stage below is keyed by it.
    actx = dataclasses.replace(ctx, split=aux.split, backbones={"main": aux})
    frozen = {"params": aux.params, "tables": ctx.tables, "r": jnp.asarray(r),
              "center": jnp.mean(actx.old_item_embeddings(), 0)}
    rule = {k: v for k, v in init.items() if k in RULE_PARAMS}
    side = None
    if ctx.config.align.use_fields:
      side = align.item_side_embeddings(aux.params, ctx.tables, jnp.arange(ctx.ds.n_items))
      frozen["side"] = side
    if mapper is not None:
      params = dict(rule, phi=self._align(actx, mapper, r, side, aux.split.old_items,
                                          "rule-align", 2))
    else:
      params = dict(rule, e0=jnp.mean(actx.old_item_embeddings(), 0))
    logging.info("meta: learning the rule on %d items held out of an auxiliary backbone",
                 len(aux.held))
    learned = run_meta_training(actx, mapper, params, frozen,
                                actx.stage_dir("rule-meta", META_SECTIONS), aux.held)
    return {k: learned[k] for k in rule}

  def _align(self, ctx: methods.Context, mapper: align.Mapper, r: np.ndarray,
             side: jnp.ndarray | None, items: np.ndarray, name: str,
             salt: int) -> Any:
    """Fits the map of ``align.kind`` on ``items``: Mapper variables.

    The MLP trains on the items and their rows, checkpointed under ``name``;
    closed forms (and ``align.shrink``'s prior) are refit in seconds.
    """
    cfg = ctx.config
    rows = tasks.pack_flat(ctx.ds, ctx.split.base_rows)
    keep = np.isin(rows["items"], items)
    rows = {k: v[keep] for k, v in rows.items()}
    kind, shrink, folds, opts = align.config_options(cfg.align)
    if kind != "mlp" or shrink != "none":
      x = r if side is None else np.concatenate([r, np.asarray(side)], -1)
      e = align.targets(ctx.params, ctx.tables, items)
      key = jax.random.fold_in(ctx.key, salt)
      phi, info = align.fit_phi(kind, x[items], e, key, folds, shrink, **opts)
      logging.info("align[%s]: %s %s, CV FVU %.4f", name, kind,
                   {k: v for k, v in info.items() if k != "cv_fvu"}, info["cv_fvu"])
      if cfg.align.get("diagnose", False):
        d = align.diagnostics(kind, x[items], e, items, ctx.model, ctx.params, ctx.tables,
                              rows, key, folds, shrink, **opts)
        logging.info("align[%s]: diagnostics %s", name, d)
      with checkpoint.Checkpointer(ctx.stage_dir(name, ALIGN_SECTIONS, salt=salt)) as ckpt:
        if ckpt.latest_step() is None:  # refit on resume (seconds, deterministic)
          ckpt.save(1, phi)  # the run's record of the fitted map
      return phi
    return align.train_mapper(
        mapper, ctx.model, ctx.params, ctx.tables, r, side, items, rows,
        jax.random.fold_in(ctx.key, salt), steps=int(cfg.align.steps),
        lr=float(cfg.align.lr), lam=float(cfg.align.lam),
        batch_rows=int(cfg.align.batch_rows),
        weight_decay=float(cfg.align.weight_decay),
        ckpt_dir=ctx.stage_dir(name, ALIGN_SECTIONS, salt=salt),
        holdout=float(cfg.align.holdout))

  def _crossfit(self, ctx: methods.Context, mapper: align.Mapper, r: np.ndarray,
                side: jnp.ndarray | None, folds: int) -> jnp.ndarray:
    """Out-of-fold cold embeddings of old items: [n_items, d] (others zero).

    An old item's own mapper output is fitted to its pretrained embedding, so
    a meta-task starting there has nothing left to adapt and the learned rule
    collapses to "do not move".  Starting each old item from a mapper that
    never saw it makes meta-training tasks look like emerging items.
    """
    old = np.asarray(ctx.split.old_items)
    rng = np.random.default_rng(int(jax.random.randint(
        jax.random.fold_in(ctx.key, 13), (), 0, 2**30)))
    fold_of = rng.permutation(len(old)) % folds
    table = np.zeros((ctx.ds.n_items, ctx.dim), np.float32)
    for f in range(folds):
      phi_f = self._align(ctx, mapper, r, side, old[fold_of != f], f"align_fold{f}",
                          100 + f)
      held = old[fold_of == f]
      side_h = None if side is None else side[held]
      table[held] = np.asarray(mapper.apply(phi_f, jnp.asarray(r[held]), side_h))
    return jnp.asarray(table)

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    return meta.cold_embedding(state["params"], state["mapper"], state["frozen"],
                               jnp.asarray(items))

  def refine(self, ctx, state, emb, batch, items, phase):
    if not self.use_meta or ctx.config.warmup.rule == "finetune":
      emb, state = super().refine(ctx, state, emb, batch, items, phase)
    else:
      emb = refine_items(state["params"], ctx.model, meta_config(ctx.config),
                         state["frozen"], emb, batch, phase=phase)
    g = state.get("regen")
    if g is not None:
      emb = posterior.regenerate(g["r_old"], g["e_old"], g["r"][jnp.asarray(items)], emb,
                                 g["lam"], g["keep"][phase])
    return emb, state


class EmerFlowNoLLM(EmerFlow):
  """r_i is the encoded raw-feature serialization: no LLM reasoning."""
  name = "emerflow_no_llm"
  vector_source = "raw"


class EmerFlowNoAlign(EmerFlow):
  """No mapper: meta-learning starts from one learned shared embedding."""
  name = "emerflow_no_align"
  use_align = False


class EmerFlowNoMeta(EmerFlow):
  """Aligned cold embedding, then the shared fine-tuning in every phase."""
  name = "emerflow_no_meta"
  use_meta = False
