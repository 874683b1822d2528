"""results.json / results.md / auc.png for one run (DESIGN §8), and aggregation.

A workdir may hold several runs (method x backbone); ``results.json`` is the
latest run, ``runs/<method>_<backbone>.json`` keeps each of them, and the
table and plot show every run present so that methods line up side by side.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any, Iterable

import numpy as np

from emerflow_jax import protocol


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON via a temporary file and a rename (a kill never leaves half a file).

  Args:
    path: the file to write.
    obj: a JSON-serialisable object; NumPy scalars and arrays become numbers
      and lists, anything else unknown its ``str``.
  """
  path = pathlib.Path(path)
  # A temporary name of its own: processes that write the same file at once
  # (several JAX processes, one shared disk) never rename each other's file.
  tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=_default))
  os.replace(tmp, path)


def _default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def summarize(config, dataset: str, per_seed: list[dict], counts: dict,
              total_s: float) -> dict:
  """Builds the results.json dict from per-seed results.

  Args:
    config: the run config (``backbone``, ``method`` and the whole dict are
      recorded).
    dataset: the dataset's name.
    per_seed: one result dict per seed ("seed", "key", "seconds", per
      metric ("auc", "f1", "val_auc", "val_f1") phase -> value, or None, and
      optionally "report": the method's ``Method.report``).
    counts: the split's sizes (``Split.counts``).
    total_s: wall time of the whole run, in seconds.

  Returns:
    {"dataset", "backbone", "method", "config", "phases", "auc", "f1",
    "seeds", "counts", "keys", "seconds"} and "val_auc"/"val_f1" when every
    seed has them; a metric maps phase -> [n_seeds] values, and "auc"/"f1"
    are None unless every seed scored the test rows.  "report" (when a
    method reports anything) maps each reported name to [n_seeds] entries,
    e.g. "align": the alignment's held-out FVU and cold AUC on old items.
  """
  phases = list(protocol.PHASES)
  def per_phase(metric):  # None when a seed did not score it (eval.test=False)
    if not all(r.get(metric) for r in per_seed):
      return None
    return {p: [r[metric][p] for r in per_seed] for p in phases}

  out = {"dataset": dataset, "backbone": config.backbone, "method": config.method,
         "config": config.to_dict(), "phases": phases,
         "auc": per_phase("auc"), "f1": per_phase("f1"),
         "seeds": [r["seed"] for r in per_seed], "counts": counts,
         "keys": [r.get("key") for r in per_seed]}
  for metric in ("val_auc", "val_f1"):
    if per_phase(metric) is not None:
      out[metric] = per_phase(metric)
  reports = [r.get("report") or {} for r in per_seed]
  names = sorted({k for rep in reports for k in rep})
  if names:  # what each method measured on old items, per seed
    out["report"] = {k: [rep.get(k) for rep in reports] for k in names}
  secs = {k: float(sum(r["seconds"][k] for r in per_seed))
          for k in ("pretrain", "method")}
  for k in ("backbones", "fit", "evaluate"):  # absent from results of older code
    if all(k in r["seconds"] for r in per_seed):
      # backbones: what each seed costs on its own, every backbone it used,
      # paid or cached; fit + evaluate = method.
      secs[k] = float(sum(r["seconds"][k] for r in per_seed))
  secs["total"] = float(total_s)
  out["seconds"] = secs
  return out


def mean_std(values: Iterable[float]) -> str:
  v = np.asarray(list(values), np.float64)
  return f"{v.mean():.4f} ± {v.std():.4f}"


def markdown_table(runs: list[dict], metric: str = "auc",
                   bold_best: bool = False) -> str:
  """A mean ± std table: one row per run, one column per phase.

  Args:
    runs: results.json dicts; each needs "method", "backbone" and ``metric``
      as phase -> per-seed values.
    metric: the key of the metric to show ("auc", "f1", ...).
    bold_best: bold the best mean per phase (only with two or more runs).

  Returns:
    The Markdown table, without a trailing newline.
  """
  phases = list(protocol.PHASES)
  lines = ["| method | backbone | " + " | ".join(phases) + " |",
           "|---|---|" + "---|" * len(phases)]
  best = {p: max(np.mean(r[metric][p]) for r in runs) for p in phases}
  for r in runs:
    cells = []
    for p in phases:
      cell = mean_std(r[metric][p])
      if bold_best and len(runs) > 1 and np.isclose(np.mean(r[metric][p]), best[p]):
        cell = f"**{cell}**"
      cells.append(cell)
    lines.append(f"| {r['method']} | {r['backbone']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_auc(runs: list[dict], path: pathlib.Path, title: str) -> None:
  """AUC by phase, one line (mean ± std band) per run.

  Args:
    runs: results.json dicts with "auc" as phase -> per-seed values.
    path: the PNG to write (written to a temporary file, then renamed).
    title: the plot's title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  phases = list(protocol.PHASES)
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in runs:
    m = np.asarray([np.mean(r["auc"][p]) for p in phases])
    s = np.asarray([np.std(r["auc"][p]) for p in phases])
    line, = ax.plot(phases, m, marker="o", label=f"{r['method']} ({r['backbone']})")
    ax.fill_between(range(len(phases)), m - s, m + s, alpha=0.15,
                    color=line.get_color())
  ax.set_xlabel("phase")
  ax.set_ylabel("test AUC (pooled)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure_atomic(fig, path)


def save_figure_atomic(fig, path: pathlib.Path) -> None:
  """Lays out ``fig``, writes it as a PNG via a temporary file, and closes it.

  Args:
    fig: a matplotlib figure.
    path: the PNG to write; a reader never sees it half-written.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_run(workdir: pathlib.Path, summary: dict) -> None:
  """Writes results.json, runs/<method>_<backbone>.json, results.md and auc.png.

  The table and plot show every run under ``workdir/runs`` that has test
  AUCs, this one first.

  Args:
    workdir: the run's folder.
    summary: the dict from ``summarize``.
  """
  workdir = pathlib.Path(workdir)
  write_json_atomic(workdir / "results.json", summary)
  runs_dir = workdir / "runs"
  runs_dir.mkdir(exist_ok=True)
  write_json_atomic(runs_dir / f"{summary['method']}_{summary['backbone']}.json",
                    summary)
  runs = [summary] + [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))
                      if p.stem != f"{summary['method']}_{summary['backbone']}"]
  runs = [r for r in runs if r.get("auc")]  # validation-only (tuning) runs have no test
  n = len(summary["seeds"])
  md = [f"# {summary['dataset']}: test AUC / F1 by phase (mean ± std over {n} seeds)", ""]
  if runs:
    md += ["## AUC", "", markdown_table(runs, "auc", bold_best=True), "",
           "## F1 (threshold = mean score)", "", markdown_table(runs, "f1", bold_best=True),
           ""]
  else:
    md += ["Validation only (eval.test=False): no test row was read.", ""]
  if "val_auc" in summary:
    md += ["## Validation AUC (held-out old items; for model selection)", "",
           markdown_table([dict(summary, auc=summary["val_auc"])], "auc"), ""]
  s = summary["seconds"]
  md.append(f"Wall time of the latest run: pretrain {s['pretrain']:.1f} s, "
            f"method {s['method']:.1f} s, total {s['total']:.1f} s.")
  (workdir / "results.md").write_text("\n".join(md) + "\n")
  if runs:
    plot_auc(runs, workdir / "auc.png", f"{summary['dataset']}: AUC by phase")
