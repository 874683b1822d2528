r"""Wall time and peak memory per pipeline stage, from 100K to 10M rows.

  nice python benchmarks/scale.py --sizes=100k,1m,10m --methods=base,emerflow \
      --out=benchmarks/cpu

Each (size, method) runs in its own process on a synthetic latent-factor world
(``emerflow_jax.data.synthetic``) scaled with the rows: ``1m`` has ML-1M's
6,040 users and 3,706 items, ``100k`` a tenth and ``10m`` ten times as many of
both, at about 270 rows per item.  The stages are the ones ``train.run_seed``
runs: data (generate the world, the old/emerging split, the validation carve),
pretrain (every backbone the method's plan asks for), fit (``method.fit``) and
evaluation (cold -> warm_a -> warm_b -> warm_c on the validation holdout and
the emerging items).  Every stage's time includes its jit compiles.

Peak memory is the process's peak resident set (``VmHWM``), reset before each
stage (``/proc/self/clear_refs``), so each stage's figure is its own peak.
Finished runs are kept in ``<out>/scale_runs/`` and skipped on a rerun; the
table ``<out>/scale.md`` and ``<out>/scale.json`` are rewritten from them.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["100k", "1m", "10m"], "World sizes.")
_METHODS = flags.DEFINE_list("methods", ["base", "emerflow"], "Methods.")
_OUT = flags.DEFINE_string("out", "benchmarks/cpu", "Output folder.")
_SET = flags.DEFINE_list("set", [], "Config overrides key=value (all runs).")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one size,method.")
_FORCE = flags.DEFINE_bool("force", False, "Rerun finished runs.")

# Users and items of the world, scaled with the rows from ML-1M's.
WORLDS = {"100k": (604, 371), "1m": (6040, 3706), "10m": (60400, 37060)}
ROWS_PER_ITEM = 1_000_209 / 3706  # ML-1M's mean
STAGES = ("data", "pretrain", "fit", "evaluation")
# Modest settings: one pretraining epoch, one meta-epoch.
SETTINGS = {"seeds": 1, "optim.epochs": 1, "meta.epochs": 1, "eval.curves": False}


def _proc_kb(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


def _reset_peak() -> None:
  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
  pathlib.Path("/proc/self/clear_refs").write_text("5")


def _apply(config, settings: dict) -> None:
  for path, value in settings.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    if isinstance(value, str):
      old = node[leaf]
      value = type(old)(value == "True" if isinstance(old, bool) else value)
    node[leaf] = value


def run_stages(size: str, method_name: str, workdir: pathlib.Path,
               overrides: dict) -> dict:
  """Runs one seed's stages and measures each (in this process)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from emerflow_jax import cache, data, methods, protocol, train
  from emerflow_jax.models import backbones
  from experiments.configs import synthetic as synthetic_config

  n_users, n_items = WORLDS[size]
  config = synthetic_config.get_config()
  config.method = method_name
  config.data.options.n_users = n_users
  config.data.options.n_items = n_items
  config.data.options.mean_count = ROWS_PER_ITEM
  _apply(config, dict(SETTINGS, **overrides))
  seed = config.seed
  out = {"size": size, "method": method_name, "stages": {}}

  def measure(name, fn):
    _reset_peak()
    t0 = time.perf_counter()
    value = fn()
    jax.block_until_ready(value)
    out["stages"][name] = {"seconds": time.perf_counter() - t0,
                           "peak_rss_mb": _proc_kb("VmHWM") / 1024,
                           "rss_after_mb": _proc_kb("VmRSS") / 1024}
    return value

  def load():
    ds = data.load_dataset(config.data)
    split = protocol.split_emerging_items(ds, config.data.n_max, config.data.k)
    split_s, holdout = protocol.carve_validation(split, ds, config.data.val_fraction,
                                                 seed)
    return ds, split, split_s, holdout

  ds, split, split_s, holdout = measure("data", load)
  out["world"] = {"rows": int(ds.n_rows), "users": int(ds.n_users),
                  "items": int(ds.n_items), **split.counts()}
  method = methods.get_method(config.method)
  plan = method.plan(config)
  vectors = train.load_vectors(config, ds, plan.vectors) if plan.vectors else None
  model = backbones.make_backbone(config.backbone, ds, config.model.dim,
                                  config.model.mlp, config.model.cross_layers)
  tables = backbones.make_tables(ds)
  pre = measure("pretrain", lambda: train.execute_plan(
      config, ds, split_s, plan, seed, workdir, model, tables))
  out["pretrain_rows"] = {role: int(len(p.split.base_rows)) for role, p in pre.items()}
  k_method = jax.random.split(jax.random.key(seed))[1]
  ctx = methods.Context(
      config=cache.restrict(config, methods.SHARED_SECTIONS + plan.sections),
      ds=ds, split=pre["main"].split, model=model, tables=tables, key=k_method,
      workdir=workdir / "seed", backbones=pre, vectors=vectors)
  state = measure("fit", lambda: method.fit(ctx))

  def evaluate():
    main = pre["main"].split
    val, _ = train.evaluate_items(method, ctx, state, holdout.items,
                                  holdout.warm_rows, holdout.test_rows,
                                  holdout.test_owner)
    test, _ = train.evaluate_items(method, ctx, state, main.emerging_items,
                                   main.warm_rows, main.test_rows, main.test_owner)
    return {"val_auc": val["auc"], "auc": test["auc"]}

  out["metrics"] = measure("evaluation", evaluate)
  out["total_seconds"] = sum(s["seconds"] for s in out["stages"].values())
  out["peak_rss_mb"] = max(s["peak_rss_mb"] for s in out["stages"].values())
  out["devices"] = [str(d) for d in jax.devices()]
  out["jax"] = jax.__version__
  out["settings"] = dict(SETTINGS, **overrides)
  del np
  return out




def _run_child(size: str, method: str, overrides: list[str]) -> dict:
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, __file__, f"--child={size},{method}", f"--out={tmp}"]
    cmd += [f"--set={','.join(overrides)}"] if overrides else []
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    if proc.returncode:
      raise RuntimeError(f"{size} {method} failed:\n{proc.stderr[-4000:]}")
    res = json.loads((pathlib.Path(tmp) / "child.json").read_text())
  res["process_seconds"] = time.time() - t0
  res["load_before"] = list(load_before)
  res["load_after"] = list(os.getloadavg())
  return res


def _ratio(runs: dict, method: str, stage: str, a: str, b: str, key: str) -> str:
  ra, rb = runs.get((a, method)), runs.get((b, method))
  if not ra or not rb:
    return "-"
  va = ra["stages"][stage][key] if stage != "total" else ra["total_seconds"]
  vb = rb["stages"][stage][key] if stage != "total" else rb["total_seconds"]
  return f"{vb / va:.1f}x"


def write_report(out: pathlib.Path, runs: list[dict]) -> None:
  """Writes ``scale.json`` and ``scale.md`` from the finished runs."""
  from emerflow_jax.bench import report, timing  # pylint: disable=g-import-not-at-top
  order = {s: i for i, s in enumerate(WORLDS)}
  runs = sorted(runs, key=lambda r: (r["method"], order[r["size"]]))
  machine = {"cpu": timing.cpu_model(), "cores": os.cpu_count(),
             "python": platform.python_version()}
  (out / "scale.json").write_text(json.dumps({"machine": machine, "runs": runs},
                                             indent=1) + "\n")
  lines = [
      "# Wall time and peak memory per stage, 100K to 10M rows (CPU)", "",
      f"Machine: {machine['cpu']}, {machine['cores']} cores (the 1-minute load "
      "average before and after each run is in its last column); JAX devices: "
      f"{', '.join(sorted({d for r in runs for d in r['devices']}))}; "
      f"jax {runs[0]['jax'] if runs else '?'}. Command: "
      "`nice python benchmarks/scale.py --sizes=100k,1m,10m "
      "--methods=base,emerflow --out=benchmarks/cpu`.", "",
      "Settings (everything else the synthetic config's defaults): "
      + ", ".join(f"`{k}={v}`" for k, v in (runs[0]["settings"] if runs else
                                              SETTINGS).items()) + ".",
      "Each figure is one run (one process per size and method); times include "
      "jit compiles. Peak RSS is each stage's own peak resident set (VmHWM "
      "reset before the stage), in MB.", "",
      "| method | rows | users | items | old / emerging items | "
      + " | ".join(f"{s} s | {s} MB" for s in STAGES) + " | total s | load (1 min) |",
      "|---" * (5 + 2 * len(STAGES) + 2) + "|"]
  for r in runs:
    w = r["world"]
    cells = [r["method"], f"{w['rows']:,}", f"{w['users']:,}", f"{w['items']:,}",
             f"{w['old_items']:,} / {w['emerging_items']:,}"]
    for s in STAGES:
      st = r["stages"][s]
      cells += [f"{st['seconds']:.1f}", f"{st['peak_rss_mb']:,.0f}"]
    cells += [f"{r['total_seconds']:.1f}",
              f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  by = {(r["size"], r["method"]): r for r in runs}
  lines += ["", "Growth per 10x rows (time; 10x is linear):", "",
            "| method | step | " + " | ".join(STAGES) + " | total |",
            "|---|---|" + "---|" * (len(STAGES) + 1)]
  for m in sorted({r["method"] for r in runs}):
    for a, b in (("100k", "1m"), ("1m", "10m")):
      cells = [_ratio(by, m, s, a, b, "seconds") for s in STAGES]
      cells.append(_ratio(by, m, "total", a, b, "seconds"))
      lines.append(f"| {m} | {a} -> {b} | " + " | ".join(cells) + " |")
  lines += ["", "AUC (sanity, one seed): " + "; ".join(
      f"{r['method']} {r['size']} test " + "/".join(
          f"{v:.3f}" for v in r["metrics"]["auc"].values()) for r in runs), ""]
  # A hand-written findings section below the tables survives a rewrite.
  report.write_keeping_findings(out / "scale.md", "\n".join(lines))


def main(argv):
  del argv
  overrides = dict(kv.split("=", 1) for kv in _SET.value)
  if _CHILD.value:
    size, method = _CHILD.value.split(",")
    with tempfile.TemporaryDirectory() as tmp:
      res = run_stages(size, method, pathlib.Path(tmp), overrides)
    pathlib.Path(_OUT.value, "child.json").write_text(json.dumps(res))
    return
  out = pathlib.Path(_OUT.value)
  done_dir = out / "scale_runs"
  done_dir.mkdir(parents=True, exist_ok=True)
  for size in _SIZES.value:
    for method in _METHODS.value:
      path = done_dir / f"{size}_{method}.json"
      if path.exists() and not _FORCE.value:
        continue
      print(f"running {size} {method}", flush=True)
      res = _run_child(size, method, _SET.value)
      path.write_text(json.dumps(res, indent=1) + "\n")
      print(f"{size} {method}: {res['total_seconds']:.1f} s, "
            f"peak {res['peak_rss_mb']:.0f} MB", flush=True)
      write_report(out, [json.loads(p.read_text())
                         for p in sorted(done_dir.glob("*.json"))])


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  app.run(main)
