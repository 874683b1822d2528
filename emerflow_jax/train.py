"""One experiment: data -> protocol -> pretraining -> method -> phases -> metrics.

``train_and_evaluate(config, workdir)`` is what ``experiments/run.py`` calls.
Resume order (each step skips what is already on disk):

1. per seed, a finished ``<run>/seed_<s>/result.json`` is reused as is;
2. the pretrained backbone resumes from its Orbax checkpoint (per epoch);
3. a method's own training resumes from its Orbax checkpoint (see the method);
4. the aggregate files are rewritten from the per-seed results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import data, methods, metrics, pretrain, protocol, results, tasks, warmup
from emerflow_jax.models import backbones


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:10]


def backbone_dir(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 seed: int, item_dropout: float,
                 meta_holdout: float = 0.0, rule_holdout: Any = 0.0) -> pathlib.Path:
  """Checkpoint folder of a pretrained backbone, keyed by everything it depends on."""
  root = pathlib.Path(config.optim.cache_dir or workdir / "backbones").absolute()
  key = {"data": config.data.to_dict(), "model": config.model.to_dict(),
         "optim": {k: v for k, v in config.optim.to_dict().items() if k != "cache_dir"},
         "backbone": config.backbone, "seed": seed, "dropout": item_dropout}
  if meta_holdout:
    key["meta_holdout"] = meta_holdout
  if rule_holdout:
    key["rule_holdout"] = rule_holdout
  key["data"].pop("dir", None)
  key["data"].pop("download", None)
  return root / f"{config.data.name}-{config.backbone}-s{seed}-{_hash(key)}"


def evaluate_items(method: methods.Method, ctx: methods.Context, state: Any,
                   items: np.ndarray, warm_rows: dict[str, np.ndarray],
                   test_rows: np.ndarray, test_owner: np.ndarray
                   ) -> dict[str, dict[str, float]]:
  """Runs cold -> warm_a -> warm_b -> warm_c on one item set.

  Returns:
    {"auc": {phase: value}, "f1": {phase: value}} on the pooled test rows.
  """
  test = tasks.pack_flat(ctx.ds, test_rows)
  emb = method.cold(ctx, state, items)
  out = {"auc": {}, "f1": {}}
  for phase in protocol.PHASES:
    if phase != "cold":
      batch = tasks.pack_phase(ctx.ds, warm_rows[phase])
      emb, state = method.refine(ctx, state, emb, batch, items)
    if not np.all(np.isfinite(np.asarray(emb))):
      raise FloatingPointError(f"{method.name}: non-finite embeddings after {phase}")
    prob = warmup.predict(ctx.model, ctx.params, ctx.tables, emb, test, test_owner)
    out["auc"][phase] = metrics.auc(test["labels"], prob)
    out["f1"][phase] = metrics.f1_at_mean(test["labels"], prob)
  return out


def run_seed(config: ml_collections.ConfigDict, ds, split: protocol.Split,
             method: methods.Method, seed: int, workdir: pathlib.Path,
             seed_dir: pathlib.Path, item_vectors: np.ndarray | None) -> dict:
  """Trains and evaluates one seed; returns its result dict."""
  t0 = time.time()
  key = jax.random.key(seed)
  k_pre, k_method = jax.random.split(key)
  split_s, holdout = protocol.carve_validation(split, ds, config.data.val_fraction, seed)
  meta_items = None
  if method.meta_holdout > 0:
    # Old items the backbone never trains on, kept for meta-training tasks only.
    split_s, held = protocol.carve_validation(split_s, ds, method.meta_holdout,
                                              seed + 7919)
    meta_items = held.items
  model = backbones.make_backbone(config.backbone, ds, config.model.dim,
                                  config.model.mlp, config.model.cross_layers)
  tables = backbones.make_tables(ds)
  dropout = method.item_dropout

  def pretrain_on(old: protocol.Split, rule_key: Any = 0.0) -> Any:
    """The backbone pretrained on ``old``'s base rows (cached by what it depends on)."""
    return pretrain.pretrain_backbone(
        model, tables, tasks.pack_flat(ds, old.base_rows), k_pre,
        epochs=config.optim.epochs, batch_size=config.optim.batch_size,
        lr=config.optim.lr,
        ckpt_dir=backbone_dir(config, workdir, seed, dropout, method.meta_holdout,
                              rule_key),
        item_dropout=dropout, weight_decay=config.optim.weight_decay)

  params = pretrain_on(split_s)
  rule = None
  if method.rule_holdout > 0:
    # An auxiliary backbone that never sees some old items: meta-tasks on them
    # look like emerging items do to the main backbone.
    aux_split, held = protocol.carve_validation(split_s, ds, method.rule_holdout,
                                                seed + 104729, method.rule_pick)
    aux_params = pretrain_on(aux_split, (method.rule_holdout, method.rule_pick))
    rule = methods.RuleBackbone(params=aux_params, split=aux_split, items=held.items)
  t_pre = time.time()
  ctx = methods.Context(config=config, ds=ds, split=split_s, model=model,
                        params=params, tables=tables, key=k_method,
                        workdir=seed_dir, item_vectors=item_vectors,
                        meta_items=meta_items, rule_backbone=rule)
  state = method.fit(ctx)
  val = None
  if holdout is not None:
    val = evaluate_items(method, ctx, state, holdout.items, holdout.warm_rows,
                         holdout.test_rows, holdout.test_owner)
    logging.info("seed %d validation AUC %s", seed, _fmt(val["auc"]))
  test = evaluate_items(method, ctx, state, split_s.emerging_items,
                        split_s.warm_rows, split_s.test_rows, split_s.test_owner)
  t_end = time.time()
  logging.info("seed %d test AUC %s  F1 %s", seed, _fmt(test["auc"]), _fmt(test["f1"]))
  return {"seed": seed, "auc": test["auc"], "f1": test["f1"],
          "val_auc": val["auc"] if val else None,
          "val_f1": val["f1"] if val else None,
          "seconds": {"pretrain": t_pre - t0, "method": t_end - t_pre,
                      "total": t_end - t0}}


def _fmt(d: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in d.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs ``config.method`` for ``config.seeds`` seeds and writes the results.

  Args:
    config: a config from ``experiments/configs``.
    workdir: output directory (made absolute); re-running resumes.

  Returns:
    The results.json dict.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  logging.info("JAX devices: %s", jax.devices())
  ds = data.load_dataset(config.data)
  split = protocol.split_emerging_items(ds, config.data.n_max, config.data.k)
  logging.info("%s: %d rows, %d users, %d items; split %s", ds.name, ds.n_rows,
               ds.n_users, ds.n_items, split.counts())
  method = methods.get_method(config.method)
  method.configure(config)
  vectors = None
  if method.needs_vectors:
    vectors = load_vectors(config, ds, method.vector_source or config.enrich.source)
  run_dir = workdir / f"{config.method}_{config.backbone}"
  per_seed = []
  for s in range(config.seeds):
    seed = config.seed + s
    seed_dir = run_dir / f"seed_{seed}"
    done = seed_dir / "result.json"
    if done.exists():
      logging.info("seed %d: reusing %s", seed, done)
      per_seed.append(json.loads(done.read_text()))
      continue
    seed_dir.mkdir(parents=True, exist_ok=True)
    logging.info("seed %d: %s with %s on %s", seed, config.method, config.backbone,
                 ds.name)
    res = run_seed(config, ds, split, method, seed, workdir, seed_dir, vectors)
    results.write_json_atomic(done, res)
    per_seed.append(res)
  summary = results.summarize(config, ds.name, per_seed, split.counts(),
                              time.time() - t0)
  results.write_run(workdir, summary)
  return summary


def load_vectors(config: ml_collections.ConfigDict, ds, source: str) -> np.ndarray:
  """Enrichment vectors r_i [n_items, D] for every item from ``source``."""
  if source == "dataset":
    if ds.item_vectors is None:
      raise ValueError(f"{ds.name} has no built-in item vectors; set "
                       "--config.enrich.source to llm|agent4rec|galkars|raw")
    return ds.item_vectors
  from emerflow_jax.enrich import loader  # pylint: disable=g-import-not-at-top
  return loader.load_item_vectors(ds, source, config.enrich.encoder,
                                  config.enrich.cache_dir or None)
