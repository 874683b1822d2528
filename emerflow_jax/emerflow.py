"""EmerFlow as a method on the shared harness, and its three ablations.

``fit`` runs stages 2 and 3 on old items (stage 1, the LLM enrichment, is
loaded from disk by the harness as ``ctx.item_vectors``):

1. standardise r_i with old-item statistics;
2. align: train g_phi so that g_phi(r_i) matches the pretrained ID embedding
   and scores old-item rows well (``align.train_mapper``);
3. meta-learn: train (phi, alpha) so that a few steps of the learned rule on an
   item's first rows give good predictions on its next rows
   (``meta.make_train_step`` over tasks from ``tasks.build_meta_tasks``).

Warm-up phases then apply the learned rule to all emerging items at once.

Ablations: ``emerflow_no_llm`` (r_i from the raw-feature text only),
``emerflow_no_align`` (meta-learning from one learned shared init, no mapper),
``emerflow_no_meta`` (aligned cold embedding + the shared fine-tuning).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import align, checkpoint, meta, methods, tasks


def meta_config(cfg: ml_collections.ConfigDict) -> meta.MetaConfig:
  return meta.MetaConfig(inner_steps=int(cfg.meta.inner_steps), beta=float(cfg.meta.beta),
                         first_order=bool(cfg.meta.first_order),
                         learn_alpha=bool(cfg.meta.learn_alpha))


def run_meta_training(ctx: methods.Context, mapper: align.Mapper | None,
                      params: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
  """Meta-trains ``params`` (phi and/or e0, alpha) on old-item tasks; resumable.

  Every epoch re-samples the rows of long chunks (``fold_in(seed, epoch)``), so
  a resumed run sees exactly the tasks an uninterrupted one would.
  """
  cfg = ctx.config
  mcfg = meta_config(cfg)
  tx = optax.adam(float(cfg.meta.lr))
  step_fn = meta.make_train_step(ctx.model, mapper, mcfg, tx)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.fold_in(ctx.key, 7))}
  seed = int(jax.random.randint(jax.random.fold_in(ctx.key, 11), (), 0, 2**30))
  epochs = int(cfg.meta.epochs)
  with checkpoint.Checkpointer(ctx.workdir / "meta") as ckpt:
    state, done = ckpt.restore_or(state)
    start = int(done or 0)
    if done is not None:
      logging.info("meta: resumed at epoch %d", done)
    for epoch in range(start, epochs):
      rng = np.random.default_rng([seed, epoch])
      all_tasks = tasks.build_meta_tasks(ctx.ds, ctx.split, int(cfg.meta.support_rows),
                                         int(cfg.meta.query_rows), rng)
      logs = []
      for batch in tasks.batches(all_tasks, int(cfg.meta.batch_tasks), rng):
        state, m = step_fn(state, frozen, batch)
        logs.append(m)
      m = {k: float(np.mean([float(x[k]) for x in logs])) for k in logs[0]}
      alpha = np.asarray(state["params"]["alpha"])
      logging.info("meta: epoch %d/%d step %d loss %.4f query L(e0) %.4f -> L(eT) %.4f "
                   "alpha mean %.3f", epoch + 1, epochs, int(state["step"]), m["loss"],
                   m["query_e0"], m["query_eT"], float(alpha.mean()))
      ckpt.save(epoch + 1, state)
  return state["params"]


class EmerFlow(methods.Method):
  """The full method: LLM vectors -> aligned cold embedding -> meta-learned rule."""
  name = "emerflow"
  needs_vectors = True
  use_align = True
  use_meta = True

  def fit(self, ctx: methods.Context) -> dict[str, Any]:
    cfg = ctx.config
    n_items = ctx.ds.n_items
    r = align.standardize(np.asarray(ctx.item_vectors, np.float32), ctx.split.old_items)
    side = None
    if cfg.align.use_fields:
      side = align.item_side_embeddings(ctx.params, ctx.tables, jnp.arange(n_items))
    frozen = {"params": ctx.params, "tables": ctx.tables, "r": jnp.asarray(r)}
    if side is not None:
      frozen["side"] = side
    dim = ctx.dim
    alpha = meta.init_alpha(float(cfg.meta.alpha), cfg.meta.alpha_mode, dim)
    mapper = None
    if self.use_align:
      mapper = align.Mapper(out_dim=dim, hidden=tuple(cfg.align.hidden))
      phi = align.train_mapper(
          mapper, ctx.model, ctx.params, ctx.tables, r, side, ctx.split.old_items,
          tasks.pack_flat(ctx.ds, ctx.split.base_rows), jax.random.fold_in(ctx.key, 1),
          steps=int(cfg.align.steps), lr=float(cfg.align.lr), lam=float(cfg.align.lam),
          batch_rows=int(cfg.align.batch_rows),
          weight_decay=float(cfg.align.weight_decay), ckpt_dir=ctx.workdir / "align")
      params = {"phi": phi, "alpha": alpha}
    else:
      params = {"e0": jnp.mean(ctx.old_item_embeddings(), 0), "alpha": alpha}
    if self.use_meta:
      params = run_meta_training(ctx, mapper, params, frozen)
    return {"params": params, "mapper": mapper, "frozen": frozen}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    return meta.cold_embedding(state["params"], state["mapper"], state["frozen"],
                               jnp.asarray(items))

  def refine(self, ctx, state, emb, batch, items):
    if not self.use_meta or ctx.config.warmup.rule == "finetune":
      return super().refine(ctx, state, emb, batch, items)
    emb = meta.adapt_items(state["params"], ctx.model, meta_config(ctx.config),
                           state["frozen"], emb,
                           {k: jnp.asarray(v) for k, v in batch.items()})
    return emb, state


class EmerFlowNoLLM(EmerFlow):
  """r_i is the encoded raw-feature serialization: no LLM reasoning."""
  name = "emerflow_no_llm"
  vector_source = "raw"


class EmerFlowNoAlign(EmerFlow):
  """No mapper: meta-learning starts from one learned shared embedding."""
  name = "emerflow_no_align"
  needs_vectors = False
  use_align = False

  def fit(self, ctx):
    if ctx.item_vectors is None:
      ctx.item_vectors = np.zeros((ctx.ds.n_items, 1), np.float32)
    return super().fit(ctx)


class EmerFlowNoMeta(EmerFlow):
  """Aligned cold embedding, then the shared fine-tuning in every phase."""
  name = "emerflow_no_meta"
  use_meta = False
