"""The comparison over a grid of splits, with paired intervals and a tally.

DESIGN §10: a claim must hold on more than one split.  A config declares its
splits as data, ``get_splits(arg)`` in the config file (a list of override
dicts such as ``{"data.n_max": 80, "data.k": 5}``), or the command line gives
a grid string.  ``run_splits`` runs ``compare.run_grid`` once per split (each
with its own validation holdout, and optionally equal-budget tuning), into::

  <workdir>/backbones/                      one backbone cache for every split
  <workdir>/<split>/<method>_<backbone>/    results.json, seed_<s>/, chosen.json
  <workdir>/<split>/comparison.{md,json,png} one table per split, with intervals
  <workdir>/summary.{md,json}               wins/ties/losses over splits

Every baseline is compared with EmerFlow (``report.REFERENCE``) on the same
backbone, per phase, by ``stats.paired_interval``; a win or a loss needs an
interval that excludes zero, anything else is a tie.  A baseline that ran only
on its own backbone (``compare.grid_cells``) is paired with EmerFlow on every
grid backbone, over the same test rows, and named ``method (backbone)``.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import json
import logging
import os
import pathlib
from typing import Callable, Sequence

import ml_collections

from emerflow_jax import compare, report, results, stats, sweep, tune

OUTCOMES = ("win", "tie", "loss")


def _config_module(config_path: str):
  """(the module, its argument or None) of a config file ``path.py[:arg]``."""
  path, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("_compare_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, arg or None


def load_default(config_path: str) -> tuple[ml_collections.ConfigDict, str | None]:
  """(``get_config(arg)`` of a config file ``path.py[:arg]``, arg), no overrides."""
  module, arg = _config_module(config_path)
  return module.get_config(arg), arg


def load_splits(config_path: str) -> list[dict] | None:
  """``get_splits(arg)`` of a config file (``path.py[:arg]``), or None if absent."""
  module, arg = _config_module(config_path)
  fn = getattr(module, "get_splits", None)
  if fn is None:
    return None
  return list(fn(arg) if inspect.signature(fn).parameters else fn())


def parse_splits(text: str) -> list[dict]:
  """``'data.n_max=80,100;data.k=5,10'`` -> the product as override dicts.

  Values are Python literals where they parse as one (``80`` is an int, as
  ``get_splits()`` would give it), else strings.
  """
  def literal(value: str):
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return [{k: literal(v) for k, v in point.items()}
          for point in sweep.grid_points(sweep.parse_grid(text))]


def interval_rows(grid: dict, workdir: pathlib.Path, n_boot: int, level: float,
                  seed: int = 0) -> list[dict]:
  """EmerFlow minus every other method on each backbone, per phase.

  Own-backbone runs are paired with EmerFlow on every grid backbone
  (``report.by_backbone``).

  Args:
    grid: ``compare.run_grid``'s output.
    workdir: the split's folder (runs in ``compare.run_dir``).
    n_boot: bootstrap replicates.
    level: interval coverage.
    seed: the bootstrap seed.

  Returns:
    [{"backbone", "method" (``report.shown``), "phases": {phase:
    stats.paired_interval entry}}]; a pair without predictions on disk gets
    "error" instead of "phases".
  """
  out = []
  for backbone, group in report.by_backbone(grid["runs"]):
    for ref in (r for r in group if report.method_of(r) == report.REFERENCE):
      for other in (r for r in group if report.method_of(r) != report.REFERENCE):
        row = {"backbone": backbone, "method": report.shown(other)}
        seeds = [s for s in ref["seeds"] if s in other["seeds"]]
        try:
          a = stats.load_predictions(
              compare.run_dir(workdir, report.REFERENCE, backbone), seeds)
          b = stats.load_predictions(
              compare.run_dir(workdir, report.method_of(other), other["backbone"]),
              seeds)
          row["phases"] = stats.paired_interval(a, b, n_boot=n_boot, level=level,
                                                seed=seed)
          row["seeds"] = seeds
        except (FileNotFoundError, ValueError) as e:
          row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
  return out


def interval_table(rows: list[dict], level: float) -> str:
  """Markdown: EmerFlow minus each baseline, per phase, bold when it excludes 0.

  Args:
    rows: ``interval_rows``'s output; a row with "error" shows its start.
    level: the intervals' coverage (for the caption).

  Returns:
    The caption and the table, without a trailing newline.
  """
  lines = [f"EmerFlow minus each baseline, test AUC: mean paired difference over seeds "
           f"[{level:.0%} bootstrap interval over test items]; bold where the "
           "interval excludes zero.", "",
           "| backbone | baseline | " + " | ".join(report.PHASES) + " |",
           "|---|---|" + "---:|" * len(report.PHASES)]
  for r in rows:
    cells = ([stats.format_diff(r["phases"][p]) for p in report.PHASES] if "phases" in r
             else [r["error"][:60]] + ["-"] * (len(report.PHASES) - 1))
    lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def tally(per_split: dict[str, list[dict]]) -> list[dict]:
  """Wins/ties/losses of EmerFlow per (backbone, baseline, phase) over splits."""
  counts: dict[tuple, dict] = {}
  for rows in per_split.values():
    for r in rows:
      if "phases" not in r:
        continue
      entry = counts.setdefault((r["backbone"], r["method"]), {
          p: dict.fromkeys(OUTCOMES, 0) for p in report.PHASES})
      for p in report.PHASES:
        entry[p][r["phases"][p]["outcome"]] += 1
  return [{"backbone": b, "method": m, "phases": v} for (b, m), v in counts.items()]


def summary_markdown(summary: dict, title: str | None = None) -> str:
  """summary.md: the tally, then where each split's tables are.

  Args:
    summary: ``run_splits``'s summary.json dict.
    title: what the title names (default: the dataset).

  Returns:
    The Markdown text.
  """
  lines = [f"# {title or summary['dataset']}: EmerFlow against each baseline over "
           f"{len(summary['splits'])} splits", "",
           "Wins/ties/losses of EmerFlow per phase, counted over splits; a win or a "
           f"loss needs the {summary['level']:.0%} paired bootstrap interval of the "
           "test-AUC difference to exclude zero.", "",
           "| backbone | baseline | " + " | ".join(report.PHASES) + " |",
           "|---|---|" + "---|" * len(report.PHASES)]
  for t in summary["tally"]:
    cells = ["/".join(str(t["phases"][p][o]) for o in OUTCOMES) for p in report.PHASES]
    lines.append(f"| {t['backbone']} | {t['method']} | " + " | ".join(cells) + " |")
  per_trial = int(summary.get("trial_seeds", 1))
  tuned = (f"each method tuned with {summary['tune_trials']} Optuna trials on the "
           "validation holdout" + (f", each scored on {per_trial} seeds" if per_trial > 1
                                   else "") if summary["tune_trials"] else "no tuning")
  recorded = summary.get("recorded_seconds")
  wall = (f"the runs and trials took {recorded:.0f} s when they ran, this invocation "
          f"{summary['seconds']:.0f} s" if recorded is not None
          else f"wall time {summary['seconds']:.0f} s")
  lines += ["", f"Splits ({tuned}; {wall}):", ""]
  for s in summary["splits"]:
    failed = f", {len(s['failed'])} failed run(s)" if s["failed"] else ""
    lines.append(f"- `{s['name']}` {s['overrides']}: `{s['name']}/comparison.md`{failed}")
  not_run = {f"{u['method']} with {u['backbone']} ({u['reason']})"
             for s in summary["splits"] for u in s.get("unsupported", [])}
  if not_run:
    lines += ["", "Not run (unsupported backbone): " + "; ".join(sorted(not_run)) + "."]
  return "\n".join(lines) + "\n"


def recorded_seconds(split_dir: pathlib.Path) -> float:
  """What a split's runs and tuning trials took when they ran (their results.json).

  A resumed or read-back grid is quick; this sums each run's own recorded
  ``seconds.total``, so the cost of the whole comparison survives resumption.

  Args:
    split_dir: the split's folder (runs and ``tuning/`` below it).

  Returns:
    Seconds, summed over every results.json below ``split_dir``.
  """
  total = 0.0
  for path in sorted(pathlib.Path(split_dir).rglob("results.json")):
    total += float(json.loads(path.read_text()).get("seconds", {}).get("total", 0.0))
  return total


def run_splits(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               splits: Sequence[dict], methods: Sequence[str], backbones: Sequence[str],
               seeds: int, tune_trials: int = 0, tune_kwargs: dict | None = None,
               n_boot: int = 1000, level: float = 0.95,
               run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
               commit: str = "unknown") -> dict:
  """Runs the comparison on every split; writes per-split tables and the summary.

  Args:
    config: the dataset's config.
    workdir: the grid's folder; re-running resumes every split.
    splits: override dicts, one per split (``load_splits``/``parse_splits``).
    methods: method names (``compare.run_grid``).
    backbones: backbone names.
    seeds: test seeds per run.
    tune_trials: Optuna trials per method and split (0: no tuning).
    tune_kwargs: more arguments of ``tune.tune_method``.
    n_boot: bootstrap replicates of each interval.
    level: interval coverage.
    run_fn: ``train.train_and_evaluate`` unless given (tests).
    commit: the code version running now.

  Returns:
    The summary.json dict.
  """
  workdir = pathlib.Path(workdir).absolute()
  base = copy.deepcopy(config)
  base.optim.cache_dir = base.optim.cache_dir or str(workdir / "backbones")
  per_split, records, t_total, recorded = {}, [], 0.0, 0.0
  dataset = config.data.name
  for overrides in splits:
    name = sweep.trial_name(overrides)
    logging.info("compare: split %s", name)
    sdir = workdir / name
    grid = compare.run_grid(tune.apply(base, overrides), sdir, methods, backbones, seeds,
                            run_fn=run_fn, commit=commit, tune_trials=tune_trials,
                            tune_kwargs=tune_kwargs)
    t_total += grid["seconds"]
    recorded += recorded_seconds(sdir)
    rows = interval_rows(grid, sdir, n_boot, level) if grid["runs"] else []
    per_split[name] = rows
    if grid["runs"]:
      summary = report.write_comparison(sdir, grid)
      dataset = summary["dataset"] or dataset
      summary["intervals"] = rows
      results.write_json_atomic(sdir / "comparison.json", summary)
      with open(sdir / "comparison.md", "a") as f:
        f.write(f"\n## Paired intervals\n\n{interval_table(rows, level)}\n")
    records.append({"name": name, "overrides": overrides, "failed": grid["failed"],
                    "unsupported": grid["unsupported"], "runs": len(grid["runs"])})
  summary = {"dataset": dataset, "splits": records, "tally": tally(per_split),
             "intervals": per_split, "level": level, "n_boot": n_boot,
             "tune_trials": tune_trials,
             "trial_seeds": int((tune_kwargs or {}).get("trial_seeds", 1)),
             "seconds": t_total,
             "recorded_seconds": recorded}
  results.write_json_atomic(workdir / "summary.json", summary)
  report.write_text_atomic(workdir / "summary.md", summary_markdown(summary))
  return summary


def results_section(summary: dict, workdir: str | os.PathLike, command: str,
                    commit: str, label: str | None = None) -> str:
  """RESULTS.md section of a multi-split comparison: the tally, then each split.

  Args:
    summary: ``run_splits``'s summary.json dict.
    workdir: the grid's folder (each split's comparison.md is read from it).
    command: the command line that produced it (quoted in the section).
    commit: the code version it was produced at.
    label: the section's name in its title (default: the dataset).

  Returns:
    The Markdown section: a second-level title, then a third-level heading
    per split over that split's comparison.md.
  """
  workdir = pathlib.Path(workdir)
  head, rest = summary_markdown(summary, title=label).split("\n", 1)
  parts = ["#" + head, "", f"Written by `{command}` at commit `{commit}`.", rest]
  for s in summary["splits"]:
    md = workdir / s["name"] / "comparison.md"
    if md.exists():
      body = md.read_text().replace("\n#", "\n###").split("\n", 1)[1]
      parts += [f"### Split `{s['name']}`", body]
  return "\n".join(parts)
