"""Hyperparameter sweeps on Optuna: one ``experiments.run`` process per trial.

A sweep is data (STYLE.md): a ``--grid`` string
(``'meta.inner_steps=1,3,5;meta.alpha=0.05,0.1'``: axes of a product) or
``get_sweep()`` in a config file (a list of override dicts).  Each trial runs::

  python -m experiments.run --config=<config> --config.<k>=<v> ... --workdir=<sweep>/<trial>

as a subprocess, so the run binary's contract (DESIGN §8) is all a sweep
relies on.  Search and bookkeeping are Optuna's (``study``):

* samplers: ``grid`` (a GridSampler over the grid's points, each point once),
  ``random`` and ``tpe`` (``n_trials`` draws from the grid's axes);
* the study lives in ``<sweep>/study.db`` (SQLite) unless a storage URL
  (``postgresql://...``, ``mysql://...``) is given, which lets workers on
  several machines share one study;
* resume: re-opening the study continues it; a COMPLETE trial is never rerun,
  a grid point whose ``results.json`` exists is read back, not rerun;
* a failed run is a FAIL trial holding the tail of its stderr; the sweep goes
  on, and the next invocation retries failed grid points.

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
import optuna

from emerflow_jax import protocol, results, study

Point = dict[str, Any]  # "meta.alpha" -> value
SAMPLERS = ("grid", "random", "tpe")


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
  """The ``experiments.run`` command line of one trial.

  Args:
    config_path: the ``--config`` value (``path.py[:arg]``).
    point: the trial's overrides, dotted key -> value.
    workdir: the trial's ``--workdir``.
    base: overrides shared by every trial; ``point``'s values win.

  Returns:
    argv, starting with the current Python interpreter.
  """
  overrides = {**(base or {}), **point}
  return ([sys.executable, "-m", "experiments.run", f"--config={config_path}"] +
          [f"--config.{k}={_value(v)}" for k, v in overrides.items()] +
          [f"--workdir={workdir}"])


def validation_score(res: dict, phases: Sequence[str] = protocol.WARM_PHASES
                     ) -> float | None:
  """Mean over seeds of the mean validation AUC over ``phases``.

  The default is the warm phases only: the cold phase does not depend on most
  refinement settings, and the warm phases are what EmerFlow adapts in.

  Args:
    res: a results.json dict ("val_auc": phase -> per-seed AUCs).
    phases: the phases to average over.

  Returns:
    The score, or None when the run has no validation holdout.
  """
  val = res.get("val_auc")
  if not val:
    return None
  return float(np.mean(np.mean([val[p] for p in phases], axis=0)))


def info_test_score(res: dict) -> float | None:
  """The warm-phase average on the test rows (information only, never ranks)."""
  if not res.get("auc"):
    return None
  return float(np.mean(np.mean([res["auc"][p] for p in protocol.WARM_PHASES], axis=0)))


def run_process(argv: Sequence[str], workdir: pathlib.Path, cwd: str | None = None,
                timeout: float | None = None,
                beat: Callable[[], None] | None = None) -> dict:
  """Runs one trial process; returns its results.json dict.

  Args:
    argv: the command line (``trial_argv``).
    workdir: the trial folder (stderr.log goes there).
    cwd: working directory of the process (the repository root).
    timeout: seconds (None: no limit).
    beat: called every few seconds while it runs (the study's heartbeat).

  Returns:
    The parsed ``<workdir>/results.json``.

  Raises:
    study.TrialError: the process failed or wrote no results.json; the
      message is the tail of its stderr.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / "stderr.log"
  with open(log_path, "w") as err:
    proc = subprocess.Popen(list(argv), cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    t0, rc = time.time(), None
    while rc is None:
      try:
        rc = proc.wait(timeout=5.0)
      except subprocess.TimeoutExpired:
        if beat is not None:
          beat()
        if timeout is not None and time.time() - t0 > timeout:
          proc.kill()
          proc.wait()
          err.write(f"\ntimed out after {timeout} s\n")
          rc = "timeout"
  done = workdir / "results.json"
  if rc != 0 or not done.exists():
    raise study.TrialError(f"exit status {rc}: " + log_path.read_text()[-2000:])
  return json.loads(done.read_text())


def run_sweep(config_path: str, points: Sequence[Point] | None, root: str | os.PathLike,
              axes: dict[str, list[str]] | None = None, sampler: str = "grid",
              n_trials: int | None = None, seed: int = 0, storage: str | None = None,
              study_name: str = "sweep", workers: int = 1, base: Point | None = None,
              cwd: str | None = None, timeout: float | None = None,
              runner: Callable[..., dict] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs one worker's share of a sweep and writes sweep.json / sweep.md.

  Several invocations (processes, machines) on the same study share the work:
  each trial is run by exactly one of them.

  Args:
    config_path: the ``--config`` of every trial (``path.py[:arg]``).
    points: override dicts (``get_sweep()``); or None with ``axes``.
    root: the sweep directory; a trial runs in ``root/<trial name>``.
    axes: key -> values (``parse_grid``); every trial sets one value per axis.
    sampler: "grid" (every point once), "random" or "tpe" (``n_trials``).
    n_trials: the study's trial budget for random/tpe.
    seed: the sampler's seed.
    storage: an Optuna RDB URL (default: SQLite ``root/study.db``).
    study_name: the study's name in the storage.
    workers: trials this invocation runs in parallel (threads).
    base: overrides shared by every trial (a point's own values win).
    cwd: working directory of the trials (the repository root).
    timeout: seconds per trial (None: no limit).
    runner: ``runner(argv, workdir, cwd, timeout, beat) -> results dict``
      (default ``run_process``).
    log: progress messages.

  Returns:
    The sweep.json dict: trials ranked by validation score, failures last.
  """
  root = pathlib.Path(root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  if (points is None) == (axes is None):
    raise ValueError("give exactly one of points and axes")
  if axes is not None:
    space = {k: list(v) for k, v in axes.items()}
    to_point = dict
  else:
    names = [trial_name(p) for p in points]
    if len(set(names)) != len(names):
      raise ValueError("two sweep points map to the same trial name")
    by_name = dict(zip(names, points))
    space = {"point": names}
    to_point = lambda params: by_name[params["point"]]
  runner = runner or run_process
  url = storage or study.sqlite_url(root / "study.db")
  st = study.open_study(url, study_name, study.make_sampler(sampler, space, seed))

  def execute(trial_number: int, params: dict, beat: Callable[[], None]) -> dict:
    point = to_point(params)
    name = trial_name(point) if sampler == "grid" else f"t{trial_number:03d}-{trial_name(point)}"
    workdir = root / name
    attrs = {"overrides": point, "workdir": name}
    done = workdir / "results.json"
    if sampler == "grid" and done.exists():  # finished before (e.g. by hand)
      res, attrs["reused"] = json.loads(done.read_text()), True
    else:
      try:
        res = runner(trial_argv(config_path, point, workdir, base), workdir, cwd,
                     timeout, beat)
      except Exception as e:  # pylint: disable=broad-except
        raise study.TrialError(str(e), attrs) from e
    score = validation_score(res)
    attrs.update(val_score=score, test_score=info_test_score(res),
                 run_seconds=res.get("seconds", {}).get("total"))
    if score is None:
      raise study.TrialError("no validation AUC in results.json", attrs)
    return dict(attrs, value=score)

  def suggest(trial):
    return {k: trial.suggest_categorical(k, v) for k, v in space.items()}

  grid = ([dict(zip(space, c)) for c in itertools.product(*space.values())]
          if sampler == "grid" else None)
  if grid is None and not n_trials:
    raise ValueError(f"the {sampler} sampler needs n_trials")

  def one_worker(_):
    return study.work(st, suggest, execute, grid=grid,
                      n_trials=None if grid else n_trials, lock=study.lock_for(url),
                      log=log)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    ran = sum(pool.map(one_worker, range(max(1, workers))), [])
  summary = summarize(config_path, base or {}, st, ran)
  results.write_json_atomic(root / "sweep.json", summary)
  (root / "sweep.md").write_text(markdown(summary))
  return summary


def summarize(config_path: str, base: Point, st: optuna.Study,
              ran: Sequence[int] = ()) -> dict[str, Any]:
  """The study's trials, ranked by validation score (COMPLETE first).

  Args:
    config_path: the sweep's ``--config`` (recorded).
    base: the overrides shared by every trial (recorded).
    st: the study.
    ran: numbers of the trials this invocation ran; other finished ones are
      reported as "skipped" (reused or run by another worker).

  Returns:
    The sweep.json dict: {"config", "base_overrides", "study", "ranking",
    "best" (None if no trial completed), "trials" (ranked, then the rest by
    number; PRUNED ones left out, a retried point only by its latest trial),
    "counts" per status}.
  """
  records = []
  latest: dict[str, dict] = {}
  for t in st.get_trials(deepcopy=False):
    if t.state == optuna.trial.TrialState.PRUNED:  # a duplicate or over budget
      continue
    rec = {"number": t.number, "name": t.user_attrs.get("workdir"),
           "overrides": t.user_attrs.get("overrides", t.params),
           "workdir": t.user_attrs.get("workdir"), "state": t.state.name,
           "status": ("failed" if t.state == optuna.trial.TrialState.FAIL else
                      "skipped" if t.number not in ran or t.user_attrs.get("reused")
                      else "done") if t.state.is_finished() else "running",
           "val_score": t.value, "test_score": t.user_attrs.get("test_score"),
           "error": t.user_attrs.get("error"), "run_seconds": t.user_attrs.get("run_seconds")}
    # A grid point retried after a failure shows only its latest attempt.
    latest[rec["name"] or f"#{t.number}"] = rec
  records = list(latest.values())
  ranked = sorted((r for r in records if r["state"] == "COMPLETE"),
                  key=lambda r: (-r["val_score"], r["number"]))
  for i, r in enumerate(ranked):
    r["rank"] = i + 1
  unranked = sorted((r for r in records if r["state"] != "COMPLETE"),
                    key=lambda r: r["number"])
  best = ranked[0] if ranked else None
  return {"config": config_path, "base_overrides": base, "study": st.study_name,
          "ranking": "mean over seeds of the mean validation AUC over warm_a/b/c "
                     "(old items held out); test AUC is information only",
          "best": None if best is None else {
              "name": best["name"], "overrides": best["overrides"],
              "val_score": best["val_score"], "test_score": best["test_score"]},
          "trials": ranked + unranked,
          "counts": {s: sum(r["status"] == s for r in records)
                     for s in ("done", "skipped", "failed", "running")}}


def _error_line(err: str | None) -> str:
  """The most telling line of a stderr tail (the last error-looking one)."""
  if not err:
    return "no error text"
  lines = [l.strip() for l in err.strip().splitlines() if l.strip()]
  hits = [l for l in lines if re.search(r"Error|FATAL|error:|Traceback|timed out", l)]
  return (hits or lines or [""])[-1][:300]


def markdown(summary: dict) -> str:
  """sweep.md: the ranking table, the failures, the best trial."""
  c = summary["counts"]
  out = [f"# Sweep over {summary['config']}", "",
         f"Ranked by {summary['ranking']}.", "",
         f"Trials: {c['done']} run, {c['skipped']} reused or run by another worker, "
         f"{c['failed']} failed, {c['running']} still running.", "",
         "| rank | trial | val AUC (warm mean) | status |", "|---|---|---|---|"]
  for r in summary["trials"]:
    if r.get("rank"):
      out.append(f"| {r['rank']} | `{r['name']}` | {r['val_score']:.4f} | {r['status']} |")
  failed = [r for r in summary["trials"] if not r.get("rank")]
  if failed:
    out += ["", "## Not ranked", ""]
    for r in failed:
      out.append(f"- `{r['name'] or r['number']}`: {r['status']}: {_error_line(r['error'])}")
  best = summary["best"]
  if best:
    test = ("n/a" if best["test_score"] is None else f"{best['test_score']:.4f}")
    out += ["", f"Best by validation: `{best['name']}` (val {best['val_score']:.4f}). "
            f"Its test AUC (warm mean) is {test}, reported for information only: "
            "it played no part in the choice."]
  return "\n".join(out) + "\n"


def lookup(config, key: str) -> Any:
  """The value at dotted ``key`` of a config (a ConfigDict or nested mapping).

  Raises:
    KeyError: naming the key and its first missing part.

  Args:
    config: a ConfigDict or nested mapping.
    key: dotted path, e.g. "warmup.lr".

  Returns:
    The value.
  """
  node = config
  for part in key.split("."):
    if part not in node:
      raise KeyError(f"{key!r} is not a config field ({part!r} missing)")
    node = node[part]
  return node


def check_keys(config, points: Sequence[Point]) -> None:
  """Raises ValueError naming the first override key the config lacks.

  Args:
    config: the base config (a ConfigDict or nested mapping).
    points: override dicts with dotted keys.
  """
  for point in points:
    for key in point:
      try:
        lookup(config, key)
      except KeyError as e:
        raise ValueError(f"sweep key {e.args[0]}") from None
