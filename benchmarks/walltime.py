r"""Seconds per seed of each method on one dataset, side by side.

  python benchmarks/walltime.py --config=experiments/configs/movielens100k.py \
      --methods=base,emerflow --seeds=3 --rounds=3 --out=benchmarks/cpu

Each round runs every method once, in turn, as a user runs it: one
``experiments.run`` process per method, in a fresh workdir, so that every run
pretrains its own backbones.  Methods take turns within a round, so they see
the same load.  The first round only fills the persistent XLA cache (the
compiles a user pays once per machine); the later rounds are timed.

A seed's seconds are its ``seed_*/result.json`` ``seconds``: ``total``
(pretraining every backbone it uses, fitting, and evaluating on the
validation holdout and the test rows) split into the pretraining of each
backbone, ``fit`` and ``evaluate``, and, for EmerFlow, its fit stages
(``report.seconds``: alignments, meta-training, regeneration state).  The
first seed of a process also traces its programs and reads them from the
cache, so it is reported apart from the later seeds.  Process seconds add
loading the dataset and the text vectors.

Writes ``<out>/walltime_<name>.md`` and ``.json`` (name: the config file's stem
and the ``--set`` overrides).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "experiments/configs/movielens100k.py",
                              "Config file.")
_METHODS = flags.DEFINE_list("methods", ["base", "emerflow"],
                             "Methods; the first is the reference of the ratios.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the first one is not timed.")
_SET = flags.DEFINE_list("set", [], "Config overrides key=value (every run).")
_OUT = flags.DEFINE_string("out", "benchmarks/cpu", "Output folder.")

ROOT = pathlib.Path(__file__).resolve().parents[1]




def _commit() -> str:
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=ROOT, text=True, capture_output=True, check=True).stdout
    return rev + (" + uncommitted changes" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run_once(method: str, seeds: int, workdir: pathlib.Path) -> dict:
  """One ``experiments.run`` process; its per-seed seconds and test AUC."""
  cmd = [sys.executable, "-m", "experiments.run", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", f"--config.method={method}", f"--config.seeds={seeds}",
         "--config.eval.curves=False"] + [f"--config.{kv}" for kv in _SET.value]
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  summary = json.loads((workdir / "results.json").read_text())
  per_seed = []
  for s in summary["seeds"]:
    res = json.loads((workdir / f"seed_{s}" / "result.json").read_text())
    sec = res["seconds"]
    row = {"seed": s, "total": sec["total"], "fit": sec["fit"], "evaluate": sec["evaluate"],
           "backbones": dict(sec["per_backbone"]),
           "stages": dict((res.get("report") or {}).get("seconds") or {})}
    per_seed.append(row)
  auc = {p: sum(v) / len(v) for p, v in summary["auc"].items()}
  return {"method": method, "process_seconds": wall, "load_before": load,
          "load_after": os.getloadavg()[0], "per_seed": per_seed, "auc": auc}


def _mean(xs) -> float:
  xs = list(xs)
  return sum(xs) / len(xs) if xs else float("nan")


def aggregate(runs: list[dict], methods: list[str]) -> dict:
  """Per method: mean seconds of first and later seeds, per part, over runs."""
  out = {}
  for m in methods:
    mine = [r for r in runs if r["method"] == m]
    first = [r["per_seed"][0] for r in mine]
    later = [s for r in mine for s in r["per_seed"][1:]]
    every = first + later

    def parts(rows):
      keys = {}
      for row in rows:
        for role, v in row["backbones"].items():
          keys.setdefault(f"pretrain {role}", []).append(v)
        keys.setdefault("fit", []).append(row["fit"])
        for st, v in row["stages"].items():
          keys.setdefault(f"fit: {st}", []).append(v)
        keys.setdefault("evaluate", []).append(row["evaluate"])
      return {k: _mean(v) for k, v in keys.items()}

    out[m] = {"first_seed": _mean(r["total"] for r in first),
              "later_seeds": _mean(r["total"] for r in later),
              "per_seed": _mean(r["total"] for r in every),
              "process": _mean(r["process_seconds"] for r in mine),
              "parts_later": parts(later or first),
              "auc": {p: _mean(r["auc"][p] for r in mine) for p in mine[0]["auc"]},
              "runs": len(mine)}
  return out


def render(agg: dict, runs: list[dict], meta: dict) -> str:
  methods = list(agg)
  ref = methods[0]
  lines = [f"# Seconds per seed, side by side: {meta['name']}", "",
           f"**Device: {meta['device']}**; jax {meta['jax']}. Code: {meta['commit']}.",
           f"Command: `{meta['command']}`.", "",
           f"{meta['rounds'] - 1} timed round(s) after one warm-up round; each round runs "
           f"every method once ({meta['seeds']} seeds, one process, fresh workdir: it "
           "pretrains its own backbones), in turn. 1-minute load average over the timed "
           f"runs: {meta['load_min']:.1f}–{meta['load_max']:.1f}.", "",
           f"| method | per seed (s) | x {ref} | first seed | later seeds | x {ref} "
           "(later) | process | test AUC cold / warm_a / warm_b / warm_c |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
  for m in methods:
    a, r = agg[m], agg[ref]
    auc = " / ".join(f"{v:.4f}" for v in a["auc"].values())
    lines.append(f"| {m} | {a['per_seed']:.2f} | {a['per_seed'] / r['per_seed']:.2f}x | "
                 f"{a['first_seed']:.2f} | {a['later_seeds']:.2f} | "
                 f"{a['later_seeds'] / r['later_seeds']:.2f}x | {a['process']:.1f} | "
                 f"{auc} |")
  lines += ["", "Where a later seed's time goes (seconds, mean over the timed runs' later "
            "seeds; `fit: ...` are parts of `fit`):", "",
            "| method | part | seconds |", "|---|---|---:|"]
  for m in methods:
    for part, v in agg[m]["parts_later"].items():
      lines.append(f"| {m} | {part} | {v:.2f} |")
  lines += ["", "Every timed run (seconds per seed in seed order):", "",
            "| round | method | load | per seed | process |", "|---|---|---:|---|---:|"]
  for r in runs:
    secs = ", ".join(f"{s['total']:.2f}" for s in r["per_seed"])
    lines.append(f"| {r['round']} | {r['method']} | {r['load_before']:.1f} | {secs} | "
                 f"{r['process_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from emerflow_jax.bench import report, timing
  methods = list(_METHODS.value)
  name = pathlib.Path(_CONFIG.value).stem + "".join(
      "_" + kv.replace("=", "-").replace(".", "-") for kv in _SET.value)
  runs = []
  with tempfile.TemporaryDirectory(prefix="walltime_") as tmp:
    for rnd in range(_ROUNDS.value):
      for m in methods:
        r = run_once(m, _SEEDS.value, pathlib.Path(tmp) / f"r{rnd}_{m}")
        r["round"] = rnd
        print(f"round {rnd} {m}: per seed "
              + ", ".join(f"{s['total']:.2f}" for s in r["per_seed"])
              + f" s (process {r['process_seconds']:.1f} s, load {r['load_before']:.1f})",
              flush=True)
        if rnd:
          runs.append(r)
  if not runs:
    raise app.UsageError("--rounds must be at least 2 (the first is not timed)")
  agg = aggregate(runs, methods)
  loads = [x for r in runs for x in (r["load_before"], r["load_after"])]
  meta = {"name": name, "jax": jax.__version__,
          "device": f"{jax.devices()[0].platform.upper()}: {timing.cpu_model()}, "
                    f"{os.cpu_count()} cores ({len(jax.devices())} JAX device(s))",
          "commit": _commit(), "seeds": _SEEDS.value, "rounds": _ROUNDS.value,
          "command": "python benchmarks/walltime.py " + " ".join(sys.argv[1:]),
          "load_min": min(loads), "load_max": max(loads)}
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"walltime_{name}.json").write_text(
      json.dumps({"meta": meta, "aggregate": agg, "runs": runs}, indent=1) + "\n")
  md = render(agg, runs, meta)
  # A hand-written findings section below the tables survives a rewrite.
  report.write_keeping_findings(out / f"walltime_{name}.md", md)
  print(md)


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  app.run(main)
