"""One experiment: data -> protocol -> the method's plan -> phases -> metrics.

``train_and_evaluate(config, workdir)`` is what ``experiments/run.py`` calls.
The method states what it needs (``Method.plan``); this module carries the plan
out (carves the item sets, pretrains or reuses every backbone, loads the
vectors), hands the results to the method in one frozen ``Context`` and runs
the phases.  Everything it keeps is keyed by exactly what it depends on
(``cache``), so resuming never reuses a stale artifact:

1. per seed, ``<workdir>/seed_<s>/result.json`` (+ ``predictions.npz``) is
   reused only when its key (every config section the run reads, the seed,
   the code's format version) is the requested one; otherwise it is recomputed;
2. a pretrained backbone, keyed by data/model/optim/backbone/seed and its
   ``BackboneSpec``, resumes from its Orbax checkpoint (per epoch) under a
   file lock, so concurrent runs that need it build it once;
3. a method's own stages resume from their keyed checkpoints (``stage_dir``);
4. the aggregate files are rewritten from the per-seed results.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from emerflow_jax import (cache, checkpoint, curves, data, methods, metrics, pretrain,
                          programs, protocol, results, tasks, warmup)
from emerflow_jax.models import backbones

BACKBONE_SECTIONS = ("backbone", "data", "model", "optim")


def backbone_key(config: ml_collections.ConfigDict, seed: int,
                 spec: methods.BackboneSpec, parent: str | None = None) -> str:
  """The cache key of one pretrained backbone.

  Args:
    config: the run config.
    seed: the seed (initialisation, shuffling, the item carve).
    spec: which old items it leaves out and its item dropout.
    parent: the key of the backbone whose split it carves from (non-main).

  Returns:
    A hex key.
  """
  return cache.key(config, BACKBONE_SECTIONS, seed=seed, spec=spec_fields(spec),
                   parent=parent)


# BackboneSpec fields added after artifacts were cached, each with its default:
# at that default a field stays out of every key, so those artifacts stay valid.
_SPEC_ADDED = {"epochs": 0}
_NO = object()


def spec_fields(spec: methods.BackboneSpec) -> dict[str, Any]:
  """What a cache key records of a backbone spec (``_SPEC_ADDED`` at default left out)."""
  return {k: v for k, v in vars(spec).items() if _SPEC_ADDED.get(k, _NO) != v}


def backbone_dir(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 key: str, seed: int) -> pathlib.Path:
  """Checkpoint folder of a pretrained backbone (shared via ``optim.cache_dir``).

  Args:
    config: the run config.
    workdir: the run's workdir.
    key: the backbone's cache key.
    seed: the seed.

  Returns:
    The folder.
  """
  root = pathlib.Path(config.optim.cache_dir or workdir / "backbones").absolute()
  return root / f"{config.data.name}-{config.backbone}-s{seed}-{key}"


def execute_plan(config: ml_collections.ConfigDict, ds, split: protocol.Split,
                 plan: methods.Plan, seed: int, workdir: pathlib.Path,
                 model: backbones.Backbone, tables: backbones.Tables,
                 writer: Any = None) -> dict[str, methods.Pretrained]:
  """Pretrains (or reuses) every backbone the plan asks for.

  Args:
    config: the run config.
    ds: the dataset.
    split: the split after the validation carve.
    plan: the method's plan.
    seed: the seed.
    workdir: the run folder (default backbone cache under it).
    model: the backbone module.
    tables: its feature tables.
    writer: optional ``curves`` writer for the pretraining loss.

  Returns:
    role -> Pretrained; main's split has its left-out items removed.
  """
  k_pre = jax.random.split(jax.random.key(seed))[0]
  specs = sorted(plan.backbones, key=lambda b: b.role != "main")  # main first
  out: dict[str, methods.Pretrained] = {}
  for spec in specs:
    parent = None if spec.role == "main" else out["main"]
    base = split if parent is None else parent.split
    own, held = protocol.carve_validation(base, ds, spec.leave_out,
                                          seed + spec.carve_salt, spec.pick)
    if spec.epochs and spec.role == "main":
      raise ValueError("the main backbone trains for optim.epochs (BackboneSpec.epochs "
                       "is for auxiliary backbones)")
    epochs = int(spec.epochs or config.optim.epochs)
    key = backbone_key(config, seed, spec, None if parent is None else parent.key)
    ckpt_dir = backbone_dir(config, workdir, key, seed)
    with cache.locked(ckpt_dir):
      with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        done = ckpt.latest_step() or 0
      t = time.time()
      params = pretrain.pretrain_backbone(
          model, tables, tasks.pack_flat(ds, own.base_rows), k_pre,
          epochs=epochs, batch_size=config.optim.batch_size,
          lr=config.optim.lr, ckpt_dir=ckpt_dir, item_dropout=spec.item_dropout,
          weight_decay=config.optim.weight_decay,
          ckpt_every_s=float(config.optim.ckpt_every_s),
          writer=curves.prefixed(writer, f"pretrain/{spec.role}"))
      seconds = pretrain_cost(ckpt_dir, time.time() - t,
                              trained=done < epochs)
    held_items = np.zeros(0, np.int64) if held is None else held.items
    out[spec.role] = methods.Pretrained(params=params, split=own, held=held_items,
                                        key=key, seconds=seconds)
  return out


def pretrain_cost(ckpt_dir: pathlib.Path, seconds: float, trained: bool) -> float:
  """The wall time a cached backbone took to pretrain, over every resumed part.

  Kept beside the checkpoint (``<ckpt_dir>.seconds.json``), so that a run that
  reads the backbone back can still report what it costs per seed.

  Args:
    ckpt_dir: the backbone's checkpoint folder.
    seconds: this call's wall time.
    trained: whether this call trained any epoch (else it only read back).

  Returns:
    The recorded total (this call's time when nothing was recorded yet).
  """
  path = pathlib.Path(str(ckpt_dir) + ".seconds.json")
  known = path.exists()
  total = json.loads(path.read_text())["seconds"] if known else 0.0
  if trained or not known:
    total += seconds
    results.write_json_atomic(path, {"seconds": total})
  return float(total)


def evaluate_items(method: methods.Method, ctx: methods.Context, state: Any,
                   items: np.ndarray, warm_rows: dict[str, np.ndarray],
                   test_rows: np.ndarray, test_owner: np.ndarray
                   ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
  """Runs cold -> warm_a -> warm_b -> warm_c on one item set.

  Args:
    method: the method.
    ctx: its context.
    state: what ``method.fit`` returned.
    items: [n] item ids.
    warm_rows: phase -> [n, K] row indices.
    test_rows: [m] row indices scored at every phase.
    test_owner: [m] index into ``items`` of each test row's item.

  Returns:
    ({"auc": {phase: value}, "f1": {phase: value}} on the pooled test rows,
     {"labels", "owner" (item ids), "prob_<phase>"} [m] arrays).
  """
  test = tasks.pack_flat(ctx.ds, test_rows)
  emb = method.cold(ctx, state, items)
  out = {"auc": {}, "f1": {}}
  preds = {"labels": np.asarray(test["labels"]), "owner": np.asarray(items)[test_owner]}
  for phase in protocol.PHASES:
    if phase != "cold":
      batch = tasks.pack_phase(ctx.ds, warm_rows[phase])
      emb, state = method.refine(ctx, state, emb, batch, items,
                                 protocol.WARM_PHASES.index(phase))
    if not np.all(np.isfinite(np.asarray(emb))):
      raise FloatingPointError(f"{method.name}: non-finite embeddings after {phase}")
    prob = warmup.predict(ctx.model, ctx.params, ctx.tables, emb, test, test_owner)
    out["auc"][phase] = metrics.auc(test["labels"], prob)
    out["f1"][phase] = metrics.f1_at_mean(test["labels"], prob)
    preds[f"prob_{phase}"] = np.asarray(prob, np.float32)
  return out, preds


def run_seed(config: ml_collections.ConfigDict, ds, split: protocol.Split,
             method: methods.Method, plan: methods.Plan, seed: int,
             workdir: pathlib.Path, seed_dir: pathlib.Path,
             vectors: np.ndarray | None) -> tuple[dict, dict[str, np.ndarray]]:
  """Trains and evaluates one seed.

  Args:
    config: the run config.
    ds: the dataset.
    split: the protocol split.
    method: the method.
    plan: its plan for ``config``.
    seed: the seed.
    workdir: the run folder.
    seed_dir: this seed's folder.
    vectors: [n_items, D] enrichment vectors or None.

  Returns:
    (the seed's result dict, its predictions: test arrays and ``val_*`` ones).
  """
  t0 = time.time()
  k_method = jax.random.split(jax.random.key(seed))[1]
  split_s, holdout = protocol.carve_validation(
      split, ds, config.data.val_fraction, seed, pick=str(config.data.val_pick))
  if not config.eval.test:
    # Tuning: nothing downstream can index an emerging item's rows.
    split_s = protocol.without_emerging(split_s)
  model = backbones.make_backbone(config.backbone, ds, config.model.dim,
                                  config.model.mlp, config.model.cross_layers)
  tables = backbones.make_tables(ds)
  with curves.writer(config, seed_dir / "tb") as writer:
    pre = execute_plan(config, ds, split_s, plan, seed, workdir, model, tables, writer)
    t_pre = time.time()
    main = pre["main"]
    ctx = methods.Context(
        config=cache.restrict(config, methods.SHARED_SECTIONS + plan.sections),
        ds=ds, split=main.split, model=model, tables=tables, key=k_method,
        workdir=seed_dir, backbones=pre, vectors=vectors, writer=writer)
    state = method.fit(ctx)
    report = method.report(state)
    jax.block_until_ready(state)  # dispatched work counts as fitting
    t_fit = time.time()
    val, preds = None, {}
    if holdout is not None:
      val, p = evaluate_items(method, ctx, state, holdout.items, holdout.warm_rows,
                              holdout.test_rows, holdout.test_owner)
      preds.update({f"val_{k}": v for k, v in p.items()})
      logging.info("seed %d validation AUC %s", seed, _fmt(val["auc"]))
      for i, phase in enumerate(protocol.PHASES):
        curves.write(writer, i, {f"val_auc/{phase}": val["auc"][phase]})
    test = None
    if config.eval.test:
      test, p = evaluate_items(method, ctx, state, main.split.emerging_items,
                               main.split.warm_rows, main.split.test_rows,
                               main.split.test_owner)
      preds.update(p)
      logging.info("seed %d test AUC %s  F1 %s", seed, _fmt(test["auc"]),
                   _fmt(test["f1"]))
    elif val is None:
      raise ValueError("eval.test=False needs a validation holdout (data.val_fraction > 0)")
  t_end = time.time()
  res = {"seed": seed, "auc": test["auc"] if test else None,
         "f1": test["f1"] if test else None,
         "val_auc": val["auc"] if val else None,
         "val_f1": val["f1"] if val else None,
         "report": report,
         "seconds": {"pretrain": t_pre - t0, "method": t_end - t_pre,
                     "fit": t_fit - t_pre, "evaluate": t_end - t_fit,
                     "total": t_end - t0,
                     "backbones": float(sum(p.seconds for p in pre.values())),
                     "per_backbone": {r: float(p.seconds) for r, p in pre.items()}}}
  return res, preds


def _fmt(d: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in d.items())


def result_key(config: ml_collections.ConfigDict, plan: methods.Plan, seed: int,
               **extra: Any) -> str:
  """The key of one seed's result: every section the run reads, and the seed.

  Args:
    config: the run config.
    plan: the method's plan (its sections, vectors and backbones).
    seed: the seed.
    **extra: anything else the keyed artifact depends on.

  Returns:
    A hex key.
  """
  return cache.key(config, methods.SHARED_SECTIONS + plan.sections, seed=seed,
                   vectors=plan.vectors, backbones=[spec_fields(b) for b in plan.backbones],
                   **extra)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs ``config.method`` for ``config.seeds`` seeds and writes the results.

  Args:
    config: a config from ``experiments/configs``.
    workdir: output directory (made absolute); re-running resumes, and a
      changed config recomputes what it changes.

  Returns:
    The results.json dict.
  """
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    # The seeds shared compiled programs; the next run of this process (a
    # grid, a tuning study) must not inherit them all (``programs``).
    programs.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  logging.info("JAX devices: %s", jax.devices())
  ds = data.load_dataset(config.data)
  split = protocol.split_emerging_items(ds, config.data.n_max, config.data.k)
  logging.info("%s: %d rows, %d users, %d items; split %s", ds.name, ds.n_rows,
               ds.n_users, ds.n_items, split.counts())
  method = methods.get_method(config.method)
  plan = method.plan(config)
  vectors = load_vectors(config, ds, plan.vectors) if plan.vectors else None
  per_seed = []
  for s in range(config.seeds):
    seed = config.seed + s
    seed_dir = workdir / f"seed_{seed}"
    done, pred_file = seed_dir / "result.json", seed_dir / "predictions.npz"
    key = result_key(config, plan, seed)
    if done.exists() and pred_file.exists():
      old = json.loads(done.read_text())
      if old.get("key") == key:
        logging.info("seed %d: reusing %s", seed, done)
        per_seed.append(old)
        continue
      logging.info("seed %d: %s was computed with another config; recomputing",
                   seed, done)
    seed_dir.mkdir(parents=True, exist_ok=True)
    logging.info("seed %d: %s with %s on %s", seed, config.method, config.backbone,
                 ds.name)
    res, preds = run_seed(config, ds, split, method, plan, seed, workdir, seed_dir,
                          vectors)
    res["key"] = key
    # Predictions first: a result.json on disk always has its predictions.
    checkpoint.save_arrays(pred_file, **preds)
    results.write_json_atomic(done, res)
    per_seed.append(res)
  summary = results.summarize(config, ds.name, per_seed, split.counts(),
                              time.time() - t0)
  results.write_run(workdir, summary)
  return summary


def load_vectors(config: ml_collections.ConfigDict, ds, source: str) -> np.ndarray:
  """Enrichment vectors r_i [n_items, D] for every item from ``source``.

  ``"a+b"`` joins sources: each is encoded on its own and the vectors are
  concatenated (every column is standardised on old items downstream), so that
  a linear alignment can weigh, say, the raw features apart from the LLM's.

  Args:
    config: the run config (enrich section).
    ds: the dataset.
    source: the text source name, or names joined by "+".

  Returns:
    [n_items, D] vectors (D summed over joined sources).
  """
  parts = source.split("+")
  if len(parts) > 1:
    if len(set(parts)) != len(parts) or not all(parts):
      raise ValueError(f"enrich.source {source!r}: join distinct sources with '+', "
                       "e.g. 'llm+raw'")
    return np.concatenate([load_vectors(config, ds, p) for p in parts], axis=1)
  if source == "dataset":
    if ds.item_vectors is None:
      raise ValueError(f"{ds.name} has no built-in item vectors; set "
                       "--config.enrich.source to llm|agent4rec|galkars|raw")
    return ds.item_vectors
  from emerflow_jax.enrich import loader  # pylint: disable=g-import-not-at-top
  return loader.load_item_vectors(ds, source, config.enrich.encoder,
                                  config.enrich.cache_dir or None)
