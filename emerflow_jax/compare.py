"""The comparison a reviewer asks for: every method x backbone x seed on one protocol.

``run_grid`` runs each (method, backbone) through ``train.train_and_evaluate``
in its own sub-workdir ``<workdir>/<method>_<backbone>``, with one backbone
cache for the whole grid (``config.optim.cache_dir``) so that a backbone is
pretrained once per (backbone, seed, dropout rate) and shared by every method.
A finished run (its ``results.json`` holds the requested seeds) is read back,
not re-run; a run whose stored config differs from the requested one is an
error rather than a silent mix.  A failing run is recorded and the grid goes on.

``write_comparison`` writes ``comparison.json``, ``comparison.md`` (mean ± std
AUC and F1 per phase, best per backbone and column in bold, the validation AUC
that hyperparameters were chosen on, every phase where a baseline beats
EmerFlow, wall times) and ``comparison.png`` (AUC by phase, one panel per
backbone, one line per method).  ``update_results_md`` writes that dataset's
section of the repository's RESULTS.md and leaves other datasets' sections.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import re
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from emerflow_jax import protocol, results, train, tune

PHASES = list(protocol.PHASES)
REFERENCE = "emerflow"
# Config fields that locate files but do not change what a run computes.
_PATH_FIELDS = (("data", "dir"), ("data", "download"), ("optim", "cache_dir"),
                ("enrich", "cache_dir"))


def parse_method(spec: str) -> tuple[str, str | None]:
  """"emerflow:agent4rec" -> ("emerflow", "agent4rec"); "base" -> ("base", None).

  A ``:source`` suffix runs the method with ``enrich.source=source``, so one
  grid can compare LLM sources side by side.
  """
  method, _, source = spec.partition(":")
  return method, (source or None)


def run_dir(workdir: pathlib.Path, method: str, backbone: str) -> pathlib.Path:
  """The folder of one grid cell: ``<workdir>/<method>_<backbone>``.

  Args:
    workdir: the grid's folder.
    method: the method spec (a ``:source`` suffix becomes ``-source``).
    backbone: the backbone's name.

  Returns:
    The run's folder (not created).
  """
  return pathlib.Path(workdir) / f"{method.replace(':', '-')}_{backbone}"


def grid_config(config: ml_collections.ConfigDict, method: str, backbone: str,
                seeds: int, cache_dir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` for one grid cell (only existing fields are set).

  ``method`` may carry a ``:source`` suffix (``parse_method``).

  Args:
    config: the dataset's config (not modified).
    method: the method spec, e.g. "emerflow" or "emerflow:agent4rec".
    backbone: the backbone's name.
    seeds: seeds per run.
    cache_dir: the backbone cache shared by the grid (``optim.cache_dir``).

  Returns:
    The cell's config.
  """
  c = copy.deepcopy(config)
  name, source = parse_method(method)
  c.method, c.backbone, c.seeds = name, backbone, int(seeds)
  if source is not None:
    c.enrich.source = source
  c.optim.cache_dir = cache_dir
  return c


# Config sections read by one method family only (section -> method-name
# prefix): a change there cannot change another method's run, so it does not
# invalidate that run.  warmup is shared: every method ends in its fine-tuning.
_OWN_SECTIONS = {"dropoutnet": "dropoutnet", "metaemb": "metaemb", "mwuf": "mwuf",
                 "cvar": "cvar", "enrich": "emerflow", "align": "emerflow",
                 "meta": "emerflow"}


def _comparable(config_dict: dict) -> dict:
  d = json.loads(json.dumps(config_dict, default=str))
  for section, key in _PATH_FIELDS:
    d.get(section, {}).pop(key, None)
  for section, owner in _OWN_SECTIONS.items():
    if not str(d.get("method", "")).startswith(owner):
      d.pop(section, None)
  return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


def finished_run(path: pathlib.Path, config: ml_collections.ConfigDict
                 ) -> dict | None:
  """The stored results.json when it holds this config's seeds, else None.

  Path fields and the sections of other method families are ignored when the
  configs are compared, and so is ``seeds``.

  Args:
    path: the run's folder (``run_dir``).
    config: the config the run is wanted with.

  Returns:
    The results.json dict if its seeds are ``config.seed`` ..
    ``config.seed + config.seeds - 1``; None if there is none, or other seeds.

  Raises:
    ValueError: the folder holds a run of a different config.
  """
  done = path / "results.json"
  if not done.exists():
    return None
  res = json.loads(done.read_text())
  diff = _diff(_comparable(res["config"]), _comparable(config.to_dict()))
  diff = [k for k in diff if k != "seeds"]
  if diff:
    raise ValueError(f"{done} was produced with a different config "
                     f"(differs in {', '.join(diff[:8])}); use a fresh --workdir")
  want = [int(config.seed) + s for s in range(int(config.seeds))]
  return res if res.get("seeds") == want else None


def run_grid(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             methods: Sequence[str], backbones: Sequence[str], seeds: int,
             run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
             commit: str = "unknown", tune_trials: int = 0,
             tune_kwargs: dict | None = None) -> dict:
  """Runs (or reads back) every method x backbone with ``seeds`` seeds.

  Args:
    config: the dataset's config (method/backbone/seeds are overridden).
    workdir: the grid's folder; re-running resumes.
    methods: registry names, e.g. ("base", "dropoutnet", ...).
    backbones: e.g. ("deepfm", "widedeep").
    seeds: seeds per run.
    run_fn: ``train.train_and_evaluate`` unless given (tests).
    commit: the code version running now; stored next to each run it
      produces (``stamp.json``), so a run read back later keeps its own.
    tune_trials: when > 0, each method is first tuned with this many Optuna
      trials on the validation holdout (``tune.tune_method``, studies in
      ``<workdir>/tune.db``) and runs its seeds with the chosen overrides
      (``<workdir>/<method>_<backbone>/chosen.json``).
    tune_kwargs: more arguments of ``tune.tune_method`` (sampler, seed,
      trial_seeds, storage).

  Returns:
    {"runs": [results.json dicts], "failed": [{"method", "backbone", "error"}],
     "skipped": ["<method>_<backbone>", ...], "seconds": grid wall time}.
  """
  run_fn = run_fn or train.train_and_evaluate
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  cache = config.optim.cache_dir or str(workdir / "backbones")
  t0 = time.time()
  out = {"runs": [], "failed": [], "skipped": []}
  for backbone in backbones:
    for method in methods:
      c = grid_config(config, method, backbone, seeds, cache)
      path = run_dir(workdir, method, backbone)
      if tune_trials:
        try:
          chosen = tune.tune_method(c, workdir, tune_trials, run_fn=run_fn,
                                    name=path.name, **(tune_kwargs or {}))
        except Exception as e:  # pylint: disable=broad-except
          logging.error("compare: tuning %s failed: %s", path.name, traceback.format_exc())
          out["failed"].append({"method": method, "backbone": backbone,
                                "error": f"tuning: {type(e).__name__}: {e}"})
          continue
        c = tune.apply(c, chosen["params"])
      done = finished_run(path, c)
      if done is not None:
        logging.info("compare: %s_%s finished, reading it back", method, backbone)
        out["skipped"].append(path.name)
        out["runs"].append(dict(done, commit=_stamp(path), label=method))
        continue
      logging.info("compare: running %s with %s (%d seeds)", method, backbone, seeds)
      try:
        res = run_fn(c, str(path))
        results.write_json_atomic(path / "stamp.json", {"commit": commit})
        out["runs"].append(dict(res, commit=commit, label=method))
      except Exception as e:  # pylint: disable=broad-except
        # One broken or missing method must not lose the rest of the grid.
        logging.error("compare: %s_%s failed: %s", method, backbone,
                      traceback.format_exc())
        out["failed"].append({"method": method, "backbone": backbone,
                              "error": f"{type(e).__name__}: {e}"})
  out["seconds"] = time.time() - t0
  return out


def _stamp(path: pathlib.Path) -> str:
  stamp = path / "stamp.json"
  return json.loads(stamp.read_text())["commit"] if stamp.exists() else "unknown"


def _stats(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}


def aggregate(grid: dict) -> dict:
  """The comparison.json dict: per run mean/std/values per metric and phase."""
  runs = grid["runs"]
  rows = []
  for r in runs:
    row = {"method": r.get("label", r["method"]), "backbone": r["backbone"],
           "seeds": r["seeds"],
           "seconds": r["seconds"], "commit": r.get("commit", "unknown")}
    for metric in ("auc", "f1", "val_auc"):
      if metric in r:
        row[metric] = {p: _stats(r[metric][p]) for p in PHASES}
    rows.append(row)
  first = runs[0] if runs else {}
  return {"dataset": first.get("dataset"), "phases": PHASES,
          "counts": first.get("counts"), "runs": rows, "failed": grid["failed"],
          "skipped": grid["skipped"], "grid_seconds": grid["seconds"],
          "beats_reference": beats_reference(rows)}


def beats_reference(rows: list[dict], reference: str = REFERENCE) -> list[dict]:
  """Every (backbone, metric, phase) where another method's mean beats ``reference``.

  Args:
    rows: the "runs" rows of ``aggregate`` (with "auc" and "f1" stats).
    reference: the method compared against.

  Returns:
    [{"backbone", "metric", "phase", "method", "mean", "reference"}], where
    "mean" is the method's and "reference" the reference's mean.
  """
  out = []
  for ref in (r for r in rows if r["method"] == reference):
    for r in rows:
      if r["backbone"] != ref["backbone"] or r["method"] == reference:
        continue
      for metric in ("auc", "f1"):
        for p in PHASES:
          a, b = r[metric][p]["mean"], ref[metric][p]["mean"]
          if a > b:
            out.append({"backbone": r["backbone"], "metric": metric, "phase": p,
                        "method": r["method"], "mean": a, "reference": b})
  return out


def beats_table(beats: list[dict], rows: list[dict]) -> str:
  """Per backbone and metric, the methods whose mean beats the reference, by phase.

  Args:
    beats: ``beats_reference``'s output.
    rows: the "runs" rows of ``aggregate`` (for the backbones, in order).

  Returns:
    A Markdown table, or one sentence when nothing beats the reference.
  """
  if not beats:
    return (f"Nowhere: {REFERENCE} has the best mean in every phase, metric and "
            "backbone.")
  lines = ["| backbone | metric | " + " | ".join(PHASES) + " |",
           "|---|---|" + "---|" * len(PHASES)]
  for backbone in dict.fromkeys(r["backbone"] for r in rows):
    for metric in ("auc", "f1"):
      cells = [", ".join(b["method"] for b in beats if b["backbone"] == backbone
                         and b["metric"] == metric and b["phase"] == p) or "-"
               for p in PHASES]
      lines.append(f"| {backbone} | {metric.upper()} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _cell(s: dict, bold: bool) -> str:
  text = f"{s['mean']:.4f} ± {s['std']:.4f}"
  return f"**{text}**" if bold else text


def table(rows: list[dict], metric: str) -> str:
  """Markdown table: one row per (backbone, method), best per backbone in bold.

  Args:
    rows: the "runs" rows of ``aggregate``; rows without ``metric`` are left
      out.
    metric: "auc", "f1" or "val_auc".

  Returns:
    The table, without a trailing newline.
  """
  rows = [r for r in rows if metric in r]
  lines = ["| backbone | method | " + " | ".join(PHASES) + " |",
           "|---|---|" + "---:|" * len(PHASES)]
  for backbone in dict.fromkeys(r["backbone"] for r in rows):
    group = [r for r in rows if r["backbone"] == backbone]
    best = {p: max(r[metric][p]["mean"] for r in group) for p in PHASES}
    for r in group:
      cells = [_cell(r[metric][p], len(group) > 1 and r[metric][p]["mean"] == best[p])
               for p in PHASES]
      lines.append(f"| {backbone} | {r['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(summary: dict, level: int = 1) -> str:
  """comparison.md text (``level`` = heading depth of its title).

  Args:
    summary: the comparison.json dict (``aggregate``).
    level: heading depth of the title; sections are one deeper.

  Returns:
    The Markdown text, ending in one newline.
  """
  h = "#" * level
  rows = summary["runs"]
  n = sorted({len(r["seeds"]) for r in rows})
  seeds = "/".join(str(x) for x in n) or "0"
  md = [f"{h} {summary['dataset']}: emerging-item comparison", ""]
  if summary.get("counts"):
    c = summary["counts"]
    md += [f"Split: {c['old_items']} old items ({c['base_rows']} rows), "
           f"{c['emerging_items']} emerging items, {c['test_rows']} test rows. "
           f"Mean ± std over {seeds} seeds; best per backbone in bold.", ""]
  md += [f"{h}# Test AUC (pooled test rows)", "", table(rows, "auc"), "",
         f"{h}# Test F1 (threshold = mean score)", "", table(rows, "f1"), "",
         f"{h}# Validation AUC (held-out old items; hyperparameters were chosen on this)",
         "", table(rows, "val_auc"), ""]
  if any(r["method"] == REFERENCE for r in rows):
    md += [f"{h}# Where a baseline beats {REFERENCE}", "",
           beats_table(summary["beats_reference"], rows), ""]
  md += [f"{h}# Wall time (seconds, summed over seeds)", "",
         "| backbone | method | pretrain | method | pretrain + method | code |",
         "|---|---|---:|---:|---:|---|"]
  for r in rows:
    s = r["seconds"]
    md.append(f"| {r['backbone']} | {r['method']} | {s['pretrain']:.0f} | "
              f"{s['method']:.0f} | {s['pretrain'] + s['method']:.0f} | {r['commit']} |")
  md += ["", "Each seed's time is measured when it ran and kept when a run resumes. "
         "The backbone cache is shared by the grid, so only the first run to need a "
         "backbone pays for its pretraining, and programs compiled by earlier runs "
         "make later ones cheaper. \"code\" is the commit each run was produced at. "
         f"Grid wall time of the last invocation: {summary['grid_seconds']:.0f} s "
         f"({len(summary['skipped'])} finished run(s) read back).", ""]
  for f in summary["failed"]:
    md.append(f"- FAILED {f['method']} with {f['backbone']}: {f['error']}")
  return "\n".join(md).rstrip() + "\n"


def plot(summary: dict, path: pathlib.Path) -> None:
  """AUC by phase: one panel per backbone, one line (mean ± std band) per method.

  Args:
    summary: the comparison.json dict (``aggregate``).
    path: the PNG to write (written to a temporary file, then renamed).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = summary["runs"]
  backbones = list(dict.fromkeys(r["backbone"] for r in rows)) or ["none"]
  fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 4),
                           squeeze=False, sharey=True)
  x = np.arange(len(PHASES))
  # One fixed colour per method across panels (tab20 beyond 10 methods), and
  # EmerFlow's ablations and source variants dashed, so no two lines look alike.
  names = list(dict.fromkeys(r["method"] for r in rows))
  cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
  color = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
  for ax, backbone in zip(axes[0], backbones):
    for r in (r for r in rows if r["backbone"] == backbone):
      m = np.asarray([r["auc"][p]["mean"] for p in PHASES])
      s = np.asarray([r["auc"][p]["std"] for p in PHASES])
      name = r["method"]
      variant = name != REFERENCE and name.startswith(REFERENCE)
      ax.plot(x, m, marker="o", label=name, color=color[name],
              linestyle="--" if variant else "-",
              linewidth=2.5 if name == REFERENCE else 1.5)
      ax.fill_between(x, m - s, m + s, alpha=0.12, color=color[name])
    ax.set_xticks(x, PHASES)
    ax.set_title(f"{summary['dataset']} / {backbone}")
    ax.set_xlabel("phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("test AUC (pooled)")
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_comparison(workdir: str | os.PathLike, grid: dict) -> dict:
  """Writes comparison.json/.md/.png into workdir; returns the summary.

  Args:
    workdir: the grid's folder.
    grid: ``run_grid``'s output.

  Returns:
    The comparison.json dict (``aggregate``).
  """
  workdir = pathlib.Path(workdir).absolute()
  summary = aggregate(grid)
  results.write_json_atomic(workdir / "comparison.json", summary)
  tmp = workdir / "comparison.md.tmp"
  tmp.write_text(markdown(summary))
  os.replace(tmp, workdir / "comparison.md")
  plot(summary, workdir / "comparison.png")
  return summary


def results_section(summary: dict, command: str, commit: str) -> str:
  """One dataset's section of RESULTS.md: how it was made, then the tables.

  Args:
    summary: the comparison.json dict (``aggregate``).
    command: the command line that produced it (quoted in the section).
    commit: the code version running now.

  Returns:
    The Markdown section, its title a second-level heading.
  """
  body = markdown(summary, level=2)
  head, rest = body.split("\n", 1)
  return "\n".join([head, "", f"Written by `{command}` at commit `{commit}` (each "
                    "run's own commit is in the wall-time table).", rest.lstrip("\n")])


_HEADER = ("# Results\n\nGenerated by `python -m experiments.compare ... "
           "--results_md=RESULTS.md`, one section per dataset; do not edit by hand.\n")


def update_results_md(path: str | os.PathLike, dataset: str, section: str) -> None:
  """Writes or replaces ``dataset``'s section of RESULTS.md, keeping the others.

  The section sits between ``<!-- results:<dataset>:begin/end -->`` markers;
  the file is created with a header if absent, and replaced atomically.

  Args:
    path: the RESULTS.md file.
    dataset: the dataset's name (it names the markers).
    section: the section's Markdown (``results_section``).
  """
  path = pathlib.Path(path)
  begin, end = f"<!-- results:{dataset}:begin -->", f"<!-- results:{dataset}:end -->"
  block = f"{begin}\n{section.rstrip()}\n{end}"
  text = path.read_text() if path.exists() else _HEADER
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text)
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
