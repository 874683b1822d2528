"""Hyperparameter sweeps: one ``experiments.run`` process per point, resumable.

A sweep is data (STYLE.md): a list of override dicts, from a ``--grid`` string
(``'meta.inner_steps=1,3,5;meta.alpha=0.05,0.1'`` is the 6-point product), a
random subset of that product, or ``get_sweep()`` in a config file.  Each
point runs::

  python -m experiments.run --config=<config> --config.<k>=<v> ... --workdir=<sweep>/<trial>

as a subprocess, so the run binary's contract (DESIGN §8) is what a sweep
relies on.  A trial whose ``results.json`` exists is skipped (resume); a trial
that fails is recorded with the tail of its stderr and the sweep goes on.

Ranking uses validation data only: the validation AUC of ``results.json``
(old items held out as pseudo-emerging items), averaged over the warm phases
and then over seeds.  The test AUC of the best trial is reported for
information and never used to choose.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from emerflow_jax import protocol, results

Point = dict[str, Any]  # "meta.alpha" -> value


def parse_grid(grid: str) -> dict[str, list[str]]:
  """``'a.b=1,2;c=x'`` -> {"a.b": ["1", "2"], "c": ["x"]} (values stay strings).

  Raises:
    ValueError: on an axis without ``=`` or without values, or a repeated key.
  """
  axes: dict[str, list[str]] = {}
  for part in filter(None, (p.strip() for p in grid.split(";"))):
    key, sep, values = part.partition("=")
    key = key.strip()
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not vals:
      raise ValueError(f"bad grid axis {part!r}: want key=v1,v2,...")
    if key in axes:
      raise ValueError(f"grid key {key!r} appears twice")
    axes[key] = vals
  return axes


def grid_points(axes: dict[str, list[str]]) -> list[Point]:
  """The Cartesian product of the axes, in a fixed order."""
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


def random_points(axes: dict[str, list[str]], n: int, seed: int) -> list[Point]:
  """``n`` distinct points drawn from the product (all of it if smaller)."""
  points = grid_points(axes)
  rng = np.random.default_rng(seed)
  pick = rng.permutation(len(points))[:n]
  return [points[i] for i in sorted(pick)]


def load_config_sweep(config_path: str) -> list[Point] | None:
  """``get_sweep(arg)`` of a config file (``path.py[:arg]``), or None if absent."""
  path, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "get_sweep", None)
  if fn is None:
    return None
  takes_arg = bool(inspect.signature(fn).parameters)
  return list(fn(arg or None) if takes_arg else fn())


def _value(v: Any) -> str:
  return v if isinstance(v, str) else repr(v)


def trial_name(point: Point) -> str:
  """A readable, filesystem-safe folder name derived from the overrides."""
  if not point:
    return "default"
  raw = ",".join(f"{k}={_value(v)}" for k, v in sorted(point.items()))
  name = re.sub(r"[^A-Za-z0-9._=,-]+", "_", raw)
  if len(name) > 120:  # keep it short, and unique by a hash of the full text
    name = name[:100] + "-" + hashlib.sha256(raw.encode()).hexdigest()[:10]
  return name


def trial_argv(config_path: str, point: Point, workdir: pathlib.Path,
               base: Point | None = None) -> list[str]:
  """The ``experiments.run`` command line of one trial."""
  overrides = {**(base or {}), **point}
  return ([sys.executable, "-m", "experiments.run", f"--config={config_path}"] +
          [f"--config.{k}={_value(v)}" for k, v in overrides.items()] +
          [f"--workdir={workdir}"])


def validation_score(res: dict) -> float | None:
  """Mean over seeds of the mean validation AUC over the warm phases.

  Warm phases only: the cold phase does not depend on most refinement
  settings, and the warm phases are what EmerFlow adapts in.  None when the
  run has no validation holdout.
  """
  val = res.get("val_auc")
  if not val:
    return None
  per_seed = np.mean([val[p] for p in protocol.WARM_PHASES], axis=0)
  return float(np.mean(per_seed))


def info_test_score(res: dict) -> float:
  """The same average on the test rows (information only, never for ranking)."""
  return float(np.mean(np.mean([res["auc"][p] for p in protocol.WARM_PHASES], axis=0)))


def run_trial(config_path: str, point: Point, root: pathlib.Path,
              base: Point | None = None, cwd: str | None = None,
              timeout: float | None = None) -> dict[str, Any]:
  """Runs (or skips, if finished) one trial; never raises for a failed run."""
  workdir = root / trial_name(point)
  done = workdir / "results.json"
  record = {"name": workdir.name, "overrides": point, "workdir": workdir.name}
  if done.exists():
    return dict(record, status="skipped")
  workdir.mkdir(parents=True, exist_ok=True)
  argv = trial_argv(config_path, point, workdir, base)
  t0 = time.time()
  try:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    rc, err = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
    rc, err = "timeout", (err or "") + f"\ntimed out after {timeout} s"
  (workdir / "stderr.log").write_text(err)
  record["seconds"] = time.time() - t0
  if rc != 0 or not done.exists():
    return dict(record, status="failed", returncode=rc, error=err[-2000:])
  return dict(record, status="done")


def run_sweep(config_path: str, points: Sequence[Point], root: str | os.PathLike,
              workers: int = 1, base: Point | None = None, cwd: str | None = None,
              timeout: float | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every point (``workers`` at a time) and writes sweep.json / sweep.md.

  Args:
    config_path: the ``--config`` of every trial (``path.py[:arg]``).
    points: override dicts, one per trial.
    root: the sweep directory; trial ``t`` runs in ``root/trial_name(t)``.
    workers: trials run in parallel.
    base: overrides shared by every trial (a point's own values win).
    cwd: working directory of the trials (the repository root).
    timeout: seconds per trial (None: no limit).
    log: progress messages.

  Returns:
    The sweep.json dict: trials ranked by validation score, failures last.
  """
  root = pathlib.Path(root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  names = [trial_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError("two sweep points map to the same trial name")
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {pool.submit(run_trial, config_path, p, root, base, cwd, timeout): p
               for p in points}
    records = []
    for f in concurrent.futures.as_completed(futures):
      rec = f.result()
      log(f"sweep: {rec['name']}: {rec['status']}")
      records.append(rec)
  summary = summarize(config_path, base or {}, records, root)
  results.write_json_atomic(root / "sweep.json", summary)
  (root / "sweep.md").write_text(markdown(summary))
  return summary


def summarize(config_path: str, base: Point, records: list[dict],
              root: pathlib.Path) -> dict[str, Any]:
  """Adds scores from each trial's results.json and ranks by validation."""
  for rec in records:
    path = root / rec["workdir"] / "results.json"
    if rec["status"] in ("done", "skipped") and path.exists():
      res = json.loads(path.read_text())
      rec["val_score"] = validation_score(res)
      rec["test_score"] = info_test_score(res)
      rec["val_auc"] = res.get("val_auc")
      rec["auc"] = res.get("auc")
      rec["run_seconds"] = res.get("seconds", {}).get("total")
  ranked = sorted((r for r in records if r.get("val_score") is not None),
                  key=lambda r: -r["val_score"])
  unranked = [r for r in records if r.get("val_score") is None]
  for i, r in enumerate(ranked):
    r["rank"] = i + 1
  best = ranked[0] if ranked else None
  return {"config": config_path, "base_overrides": base,
          "ranking": "mean over seeds of the mean validation AUC over warm_a/b/c "
                     "(old items held out); test AUC is information only",
          "best": None if best is None else {
              "name": best["name"], "overrides": best["overrides"],
              "val_score": best["val_score"], "test_score": best["test_score"]},
          "trials": ranked + sorted(unranked, key=lambda r: r["name"]),
          "counts": {s: sum(r["status"] == s for r in records)
                     for s in ("done", "skipped", "failed")}}


def _error_line(err: str | None) -> str:
  """The most telling line of a stderr tail (the last error-looking one)."""
  if not err:
    return "no validation AUC in results.json"
  lines = [l.strip() for l in err.strip().splitlines() if l.strip()]
  hits = [l for l in lines if re.search(r"Error|FATAL|error:|Traceback|timed out", l)]
  return (hits or lines or [""])[-1][:300]


def markdown(summary: dict) -> str:
  """sweep.md: the ranking table, the failures, the best trial."""
  out = [f"# Sweep over {summary['config']}", "",
         f"Ranked by {summary['ranking']}.", "",
         f"Trials: {summary['counts']['done']} run, {summary['counts']['skipped']} "
         f"reused, {summary['counts']['failed']} failed.", "",
         "| rank | trial | val AUC (warm mean) | status |", "|---|---|---|---|"]
  for r in summary["trials"]:
    if r.get("rank"):
      out.append(f"| {r['rank']} | `{r['name']}` | {r['val_score']:.4f} | {r['status']} |")
  failed = [r for r in summary["trials"] if not r.get("rank")]
  if failed:
    out += ["", "## Not ranked", ""]
    for r in failed:
      out.append(f"- `{r['name']}`: {r['status']}: {_error_line(r.get('error'))}")
  best = summary["best"]
  if best:
    out += ["", f"Best by validation: `{best['name']}` (val {best['val_score']:.4f}). "
            f"Its test AUC (warm mean) is {best['test_score']:.4f}, reported for "
            "information only: it played no part in the choice."]
  return "\n".join(out) + "\n"


def check_keys(config, points: Sequence[Point]) -> None:
  """Raises ValueError naming the first override key the config lacks."""
  for point in points:
    for key in point:
      node = config
      for part in key.split("."):
        if part not in node:
          raise ValueError(f"sweep key {key!r} is not a config field ({part!r} missing)")
        node = node[part]
