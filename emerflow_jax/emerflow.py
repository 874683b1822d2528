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
warm phase p with the step size learned for phase p.  Before it, with
``regen.pool_steps > 0`` (default), one correction shared by all new items is
fit on their pooled phase rows and kept only where cross-validation over items
says it helps (``posterior.pooled_correction``).  With ``regen.step_scales``
(default 1/8 ... 8) in the phases of ``regen.scale_phases`` (default warm_a
only), the rule's learned step size is then multiplied by the factor that
scores the new items' own phase rows best under row-fold CV
(``rule.choose_step_scale``; 1 unless another factor is clearly better): the
step size was learned on old items, and a new population may need larger or
smaller moves.  Run in every phase, it raised validation AUC at warm_a and
lowered it at warm_b and warm_c (summed over 5 datasets and 10 splits).  In
the phases of ``regen.forward_phases`` (default warm_b, warm_c) the factor is chosen
instead by replaying the previous phase's step and scoring the current
phase's rows (``rule.choose_step_scale_forward``).
After the rule, content regeneration may blend in a leave-one-out ridge
prediction from text (``posterior.regenerate``): with ``regen.keep_cv``
(default) the share kept is chosen per phase by row-fold CV on the new items'
own phase rows (``posterior.choose_keep``; 1, no blend, unless another share
is clearly better), else it is the fixed ``regen.keep_p`` (1 = off; tuned).
Both the meta-training step and the warm-up rule split their task/item axis
over every device (``sharding.task_mesh``); one device is the trivial case.

Which ``meta`` and ``regen`` options combine: ``emerflow_options`` (anything
else raises in ``plan``).

Ablations: ``emerflow_no_llm`` (r_i from the raw-feature text only),
``emerflow_no_align`` (meta-learning from one learned shared init, no mapper),
``emerflow_no_meta`` (aligned cold embedding + the shared fine-tuning);
``regen.pool_steps=0`` is the ablation of the pooled correction and
``regen.step_scales=()`` that of the step-size CV.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from flax import serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import (align, align_diagnostics, closedform, curves,
                          emerflow_meta, emerflow_options, meta, methods, posterior,
                          protocol, rule, sharding, tasks)


# Config sections each stage reads (their cache keys cover exactly these,
# plus the backbone the stage is built on).
ALIGN_SECTIONS = ("enrich", "align")
# Added to the phase index to draw the pooled correction's item folds.
POOL_SALT = 1000
META_SECTIONS = ("enrich", "align", "meta")


class _Laps:
  """Wall seconds per stage of ``fit``, device work included (its report)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._t = time.perf_counter()

  def lap(self, name: str, out: Any = None) -> Any:
    jax.block_until_ready(out)
    t = time.perf_counter()
    self.seconds[name] = self.seconds.get(name, 0.0) + t - self._t
    self._t = t
    return out


def _closed_form_curves(writer: Any, info: dict[str, Any]) -> None:
  """A closed-form fit's curves: per CV candidate i (step i) its held-out FVU
  and options; at the chosen one's step, its train and held-out FVU.

  Args:
    writer: a ``curves`` writer (None writes nothing).
    info: ``closedform.fit_phi``'s info.
  """
  for i, (cand, score) in enumerate(zip(info["candidates"], info["fvus"])):
    curves.write(writer, i, dict({f"cv_{k}": v for k, v in cand.items()}, cv_fvu=score))
  curves.write(writer, info["best"], {"fvu_train": info["train_fvu"],
                                      "fvu_heldout": info["cv_fvu"]})


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
    if self.use_align:
      align.check_options(config.align)
    if self.use_meta:
      emerflow_options.check(config)
      if m.holdout_fraction > 0:
        specs = [methods.BackboneSpec(leave_out=float(m.holdout_fraction), carve_salt=7919)]
      if m.rule_holdout > 0:
        specs.append(methods.BackboneSpec(role="rule", leave_out=float(m.rule_holdout),
                                          pick=str(m.rule_pick), carve_salt=104729,
                                          epochs=int(m.rule_epochs)))
    source = self.vector_source or str(config.enrich.source)
    return methods.Plan(backbones=tuple(specs),
                        vectors=source if self.use_align else None,
                        sections=("enrich", "align", "meta", "regen"),
                        search_space=self.search_space(config))

  def search_space(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The rule's and the alignment's settings (the warm-up is the rule's).

    Only settings that act under ``config`` are searched: the mapper's loss
    weight and decay for ``align.kind=mlp``; otherwise the closed-form kind
    itself (each fits its own penalty, rank or neighbours by CV on old items);
    the auxiliary backbone's share only when there is one (``rule_holdout >
    0``), so that trial 0 is always the config itself.
    """
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    out = {}
    if self.use_align:
      if config.align.kind == "mlp":
        out.update({"align.lam": space.Float(0.01, 1.0, log=True),
                    "align.weight_decay": space.Float(1e-5, 1e-2, log=True)})
      else:
        out["align.kind"] = space.Categorical(("lowrank", "ridge", "knn"))
      if not config.regen.keep_cv:  # else each phase's share is chosen by CV on its rows
        out.update({f"regen.keep_{p}": space.Float(0.5, 1.0) for p in "abc"})
    if self.use_meta:
      out.update({"meta.alpha": space.Float(3e-3, 3e-2, log=True),
                  "meta.alpha_lr": space.Float(1e-3, 1e-1, log=True),
                  "meta.beta": space.Float(0.0, 0.5)})
      if config.meta.rule_holdout > 0:  # 0 (no auxiliary backbone) is a design choice
        out["meta.rule_holdout"] = space.Float(0.2, 0.5)
    else:
      out.update(methods.warmup_space())
    return out

  def fit(self, ctx: methods.Context) -> dict[str, Any]:
    laps = _Laps()  # the first lap includes standardising r_i
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
    alpha = rule.init_alpha(float(cfg.meta.alpha), cfg.meta.alpha_mode, dim,
                            len(protocol.WARM_PHASES) if cfg.meta.phase_alpha else 0)
    mapper, align_report = None, None
    meta_frozen = frozen
    if self.use_align:
      mapper = align.Mapper(out_dim=dim, hidden=tuple(cfg.align.hidden))
      phi, align_report = laps.lap("align", self._align(
          ctx, mapper, r, side, ctx.split.old_items, "align", 1, report=True))
      params = {"phi": phi, "log_alpha": alpha}
      if self.use_meta and cfg.meta.learn_shrink:
        params["shrink"] = jnp.ones((), jnp.float32)
      folds = int(cfg.meta.crossfit_folds)
      if self.use_meta and folds > 1:  # the plan allows it only without held-out items
        meta_frozen = dict(frozen, e0_table=laps.lap(
            "crossfit", self._crossfit(ctx, mapper, r, side, folds)))
    else:
      params = {"e0": jnp.mean(ctx.old_item_embeddings(), 0), "log_alpha": alpha}
    if self.use_meta and (cfg.meta.rule_holdout > 0) != ("rule" in ctx.backbones):
      raise ValueError("meta.rule_holdout > 0 needs the 'rule' backbone of the plan "
                       "(and only then): run the method through train.py")
    if self.use_meta and "rule" in ctx.backbones:
      params = dict(params, **self._rule_on_aux(ctx, mapper, r, params, laps))
    elif self.use_meta:
      held = ctx.backbones["main"].held
      params = laps.lap("meta", emerflow_meta.run_meta_training(
          ctx, mapper, params, meta_frozen, ctx.stage_dir("meta", META_SECTIONS),
          held if len(held) else None))
    regen = laps.lap("regen", self._regen_state(ctx, r))
    return {"params": params, "mapper": mapper, "frozen": frozen, "regen": regen,
            "align_report": align_report, "seconds": laps.seconds}

  def report(self, state: Any) -> dict[str, Any]:
    """{"align": the main alignment's held-out FVU and cold AUC on old items,
    "seconds": wall seconds per stage of ``fit``}."""
    out = {"seconds": state["seconds"]}
    if self.use_align:
      out["align"] = state["align_report"]
    return out

  def _regen_state(self, ctx: methods.Context, r: np.ndarray) -> dict[str, Any] | None:
    """What ``posterior.regenerate`` needs after each phase (None when off)."""
    keep = emerflow_options.regen_keep(ctx.config)
    if not self.use_align or (all(k >= 1.0 for k in keep) and not ctx.config.regen.keep_cv):
      return None
    r_old = jnp.asarray(r[ctx.split.old_items])
    e_old = ctx.old_item_embeddings()
    lam = float(ctx.config.regen.lam) or posterior.choose_lambda(r_old, e_old)
    logging.info("regen: keep %s, ridge lambda %g",
                 f"by CV among {tuple(ctx.config.regen.keep_cv)} and 1"
                 if ctx.config.regen.keep_cv else keep, lam)
    return {"r_old": r_old, "e_old": e_old, "lam": lam, "keep": keep,
            "r": jnp.asarray(r)}

  def _rule_on_aux(self, ctx: methods.Context, mapper: align.Mapper | None,
                   r: np.ndarray, init: dict[str, Any], laps: _Laps
                   ) -> dict[str, jnp.ndarray]:
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
    rule_params = {k: v for k, v in init.items() if k in emerflow_meta.RULE_PARAMS}
    side = None
    if ctx.config.align.use_fields:
      side = align.item_side_embeddings(aux.params, ctx.tables, jnp.arange(ctx.ds.n_items))
      frozen["side"] = side
    if mapper is not None:
      phi, _ = laps.lap("rule_align", self._align(actx, mapper, r, side,
                                                  aux.split.old_items, "rule-align", 2))
      params = dict(rule_params, phi=phi)
    else:
      params = dict(rule_params, e0=jnp.mean(actx.old_item_embeddings(), 0))
    logging.info("meta: learning the rule on %d items held out of an auxiliary backbone",
                 len(aux.held))
    learned = laps.lap("meta", emerflow_meta.run_meta_training(
        actx, mapper, params, frozen, actx.stage_dir("rule-meta", META_SECTIONS),
        aux.held))
    return {k: learned[k] for k in rule_params}

  def _align(self, ctx: methods.Context, mapper: align.Mapper, r: np.ndarray,
             side: jnp.ndarray | None, items: np.ndarray, name: str,
             salt: int, report: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """Fits the map of ``align.kind`` on ``items``.

    The MLP trains on the items and their rows, checkpointed under ``name``;
    closed forms (and ``align.shrink``'s prior) are refit in seconds.  Their
    FVU curves go under ``name/`` (``_closed_form_curves``; the MLP's from
    ``align.train_mapper``).

    Returns:
      (Mapper variables, and with ``report`` how the map does on the items
      it was not fit on: ``_report``, else None).
    """
    cfg = ctx.config
    rows = tasks.pack_flat(ctx.ds, ctx.split.base_rows)
    keep = np.isin(rows["items"], items)
    rows = {k: v[keep] for k, v in rows.items()}
    kind, shrink, folds, opts = align.config_options(cfg.align)
    writer = curves.prefixed(ctx.writer, name)
    key = jax.random.fold_in(ctx.key, salt)
    if kind == "mlp" and shrink == "none":
      phi = align.train_mapper(
          mapper, ctx.model, ctx.params, ctx.tables, r, side, items, rows, key,
          steps=int(cfg.align.steps), lr=float(cfg.align.lr), lam=float(cfg.align.lam),
          batch_rows=int(cfg.align.batch_rows),
          weight_decay=float(cfg.align.weight_decay),
          ckpt_dir=ctx.stage_dir(name, ALIGN_SECTIONS, salt=salt),
          holdout=float(cfg.align.holdout), writer=writer)
      return phi, (self._mlp_report(ctx, mapper, phi, r, side, items, rows, key)
                   if report else None)
    x = r if side is None else np.concatenate([r, np.asarray(side)], -1)
    e = align.targets(ctx.params, ctx.tables, items)
    phi, info = closedform.fit_phi(kind, x[items], e, key, folds, shrink, **opts)
    logging.info("align[%s]: %s %s, CV FVU %.4f", name, kind, info["chosen"],
                 info["cv_fvu"])
    _closed_form_curves(writer, info)
    out = None
    if cfg.align.get("diagnose", False):
      out = dict(align_diagnostics.diagnostics(
          kind, x[items], e, items, ctx.model, ctx.params, ctx.tables, rows, key, folds,
          shrink, **opts), estimate="nested_cv")
      logging.info("align[%s]: diagnostics %s", name, out)
    elif report:  # the fit's own CV folds: no refit
      out = dict(align_diagnostics.from_folds(info["oof"], e, info["fold"], items,
                                              ctx.model, ctx.params, ctx.tables, rows),
                 kind=kind, shrink=shrink, folds=folds, estimate="cv_folds")
    # The run's record of the fitted map; never read back (a resumed run
    # refits: seconds, deterministic), so a plain file, not an Orbax
    # checkpoint (whose save cost half as much as the fit).
    record = ctx.stage_dir(name, ALIGN_SECTIONS, salt=salt) / "map.msgpack"
    if not record.exists() and sharding.is_main_process():
      record.parent.mkdir(parents=True, exist_ok=True)
      tmp = record.with_suffix(".tmp")
      tmp.write_bytes(serialization.to_bytes(jax.device_get(sharding.gather(phi))))
      os.replace(tmp, record)
    return phi, out if report else None

  def _mlp_report(self, ctx: methods.Context, mapper: align.Mapper, phi: Any,
                  r: np.ndarray, side: jnp.ndarray | None, items: np.ndarray,
                  rows: dict[str, np.ndarray], key: jax.Array) -> dict[str, Any] | None:
    """The MLP's held-out quality on the old items its early stopping held out.

    None when ``align.holdout`` is 0 (every item was fit on).
    """
    holdout = float(ctx.config.align.holdout)
    held, fit_items = align.holdout_split(items, holdout, key)
    if not len(held):
      return None
    pred = mapper.apply(phi, jnp.asarray(r[held]), None if side is None else side[held])
    e = align.targets(ctx.params, ctx.tables, held)
    mean = jnp.broadcast_to(align.targets(ctx.params, ctx.tables, fit_items).mean(0), e.shape)
    keep = np.isin(rows["items"], held)
    out = align_diagnostics.heldout_quality(pred, mean, e, held, ctx.model, ctx.params,
                                            ctx.tables, {k: v[keep] for k, v in rows.items()})
    return dict(out, kind="mlp", holdout=holdout, estimate="early_stopping_holdout")

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
      phi_f, _ = self._align(ctx, mapper, r, side, old[fold_of != f], f"align_fold{f}",
                             100 + f)
      held = old[fold_of == f]
      side_h = None if side is None else side[held]
      table[held] = np.asarray(mapper.apply(phi_f, jnp.asarray(r[held]), side_h))
    return jnp.asarray(table)

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Cold embeddings: the aligned prior (``meta.cold_embedding``).

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      items: [n] item ids.

    Returns:
      [n, d] embeddings.
    """
    emb = meta.cold_embedding(state["params"], state["mapper"], state["frozen"],
                              jnp.asarray(items))
    # A plain array, as every phase's refined embeddings are: the warm-up's
    # programs then see one input type and are traced once, not per phase.
    return jnp.asarray(sharding.gather(emb))

  def refine(self, ctx, state, emb, batch, items, phase):
    """The pooled correction, the learned rule, then any regeneration.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      emb: [n, d] current embeddings of ``items``.
      batch: the phase's rows, each [n, K].
      items: [n] item ids.
      phase: 0, 1, 2 for warm_a, warm_b, warm_c.

    Returns:
      (new embeddings [n, d], the unchanged state).
    """
    g = ctx.config.regen
    rows = {k: jnp.asarray(v) for k, v in batch.items()}
    if int(g.pool_steps) > 0:
      prior = jnp.zeros((len(items), 0), emb.dtype)
      if g.pool_prior:
        prior = self.cold(ctx, state, items) - state["frozen"]["center"]
      lambdas = posterior.POOL_LAMBDAS if not g.pool_lam else (float(g.pool_lam),)
      emb, lam = posterior.pooled_correction(
          ctx.model, ctx.params, ctx.tables, emb, prior,
          rows, jax.random.fold_in(ctx.key, POOL_SALT + phase), steps=int(g.pool_steps),
          lr=float(g.pool_lr), lambdas=jnp.asarray(lambdas, jnp.float32),
          folds=int(g.pool_folds))
      logging.info("regen: pooled correction, phase %d, penalty %s", phase, float(lam))
    regen = state.get("regen")
    keep = None if regen is None else regen["keep"][phase]
    if not self.use_meta or ctx.config.warmup.rule == "finetune":
      if regen is not None and g.keep_cv:  # the fine-tuning, as Adam steps of the rule
        w = ctx.config.warmup
        keep = self._choose_keep(ctx, state, {"log_alpha": jnp.log(jnp.float32(w.lr))},
                                 dataclasses.replace(emerflow_meta.meta_config(ctx.config),
                                                     inner_steps=int(w.steps), rule="adam",
                                                     phase_alpha=False),
                                 emb, rows, items, phase)
      emb, state = super().refine(ctx, state, emb, batch, items, phase)
    else:
      mcfg = emerflow_meta.meta_config(ctx.config)
      params = state["params"]
      letter = protocol.WARM_PHASES[phase][-1]
      hist = state.get("history")
      if g.step_scales and letter in g.forward_phases and hist is not None:
        scale, gains = rule.choose_step_scale_forward(
            params, ctx.model, mcfg, state["frozen"], hist["emb"], hist["rows"], rows,
            jnp.asarray(phase - 1, jnp.int32), jnp.asarray(g.step_scales, jnp.float32))
        logging.info("regen: step size x%g, phase %d, from the previous phase (gains %s)",
                     float(scale), phase, np.round(np.asarray(gains), 2).tolist())
        params = rule.scaled(params, scale)
      elif g.step_scales and letter in g.scale_phases:
        scale, gains = rule.choose_step_scale(
            params, ctx.model, mcfg, state["frozen"], emb,
            rows, jnp.asarray(phase, jnp.int32),
            jnp.asarray(g.step_scales, jnp.float32), folds=int(g.scale_folds))
        logging.info("regen: step size x%g, phase %d (held-out gains %s)", float(scale),
                     phase, np.round(np.asarray(gains), 2).tolist())
        params = rule.scaled(params, scale)
      if regen is not None and g.keep_cv:
        keep = self._choose_keep(ctx, state, params, mcfg, emb, rows, items, phase)
      if g.forward_phases:  # what the next phase's forward CV replays
        state = dict(state, history={"emb": emb, "rows": rows})
      emb = emerflow_meta.refine_items(params, ctx.model, mcfg, state["frozen"], emb, rows,
                                       phase=phase)
    if regen is not None:
      emb = posterior.regenerate(regen["r_old"], regen["e_old"],
                                 regen["r"][jnp.asarray(items)], emb, regen["lam"], keep)
    return emb, state

  def _choose_keep(self, ctx, state, params, mcfg, emb, rows, items, phase) -> jnp.ndarray:
    """``posterior.choose_keep`` of ``regen.keep_cv`` (and 1) on the phase's rows."""
    g, regen = ctx.config.regen, state["regen"]
    keeps = tuple(float(k) for k in g.keep_cv) + (1.0,)
    keep, gains = posterior.choose_keep(
        params, ctx.model, mcfg, state["frozen"], emb, rows, jnp.asarray(phase, jnp.int32),
        jnp.asarray(keeps, jnp.float32), int(g.keep_folds), regen["r_old"], regen["e_old"],
        regen["r"][jnp.asarray(items)], regen["lam"])
    logging.info("regen: keep %g, phase %d (held-out gains of %s: %s)", float(keep), phase,
                 keeps, np.round(np.asarray(gains), 2).tolist())
    return keep


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
