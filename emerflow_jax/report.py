"""The report of a comparison grid: comparison.{json,md,png} and RESULTS.md.

``write_comparison`` writes ``comparison.json``, ``comparison.md`` (mean ± std
AUC and F1 per phase, best per backbone and column in bold, the validation AUC
that hyperparameters were chosen on, every phase where a baseline beats
EmerFlow, wall times) and ``comparison.png`` (AUC by phase, one panel per
backbone, one line per method) from ``compare.run_grid``'s output.

A method that ran only on its own backbone (EmerG on its GNN) appears beside
every grid backbone, labelled with its backbone, e.g. ``emerg (emerg_gnn)``:
every backbone is scored on the same test rows.

``update_results_md`` writes one labelled section of the repository's
RESULTS.md and leaves the others; ``section_label`` names a section by its
dataset and what its config changes from that dataset's default.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from typing import Sequence

import ml_collections
import numpy as np

from emerflow_jax import cache, protocol, results

PHASES = list(protocol.PHASES)
REFERENCE = "emerflow"
# Config fields a comparison sets itself, whatever the config file says.
_GRID_FIELDS = ("method", "backbone", "seeds")


def method_of(row: dict) -> str:
  """The method spec of a grid run or a comparison row ("label" if present)."""
  return row.get("label", row["method"])


def shown(row: dict) -> str:
  """The row's name in tables: the method, with its backbone if own-backbone."""
  name = method_of(row)
  return f"{name} ({row['backbone']})" if row.get("own_backbone") else name


def by_backbone(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
  """Rows per grid backbone, in order; own-backbone rows join every group.

  Args:
    rows: grid runs or comparison rows (with "backbone", "own_backbone").

  Returns:
    [(backbone, rows)]; with no grid backbone at all, one group per
    own backbone.
  """
  own = [r for r in rows if r.get("own_backbone")]
  grid = [r for r in rows if not r.get("own_backbone")]
  if not grid:
    return [(b, [r for r in own if r["backbone"] == b])
            for b in dict.fromkeys(r["backbone"] for r in own)]
  return [(b, [r for r in grid if r["backbone"] == b] + own)
          for b in dict.fromkeys(r["backbone"] for r in grid)]


def _stats(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}


def aggregate(grid: dict) -> dict:
  """The comparison.json dict: per run mean/std/values per metric and phase."""
  runs = grid["runs"]
  rows = []
  for r in runs:
    row = {"method": method_of(r), "backbone": r["backbone"],
           "own_backbone": bool(r.get("own_backbone")), "seeds": r["seeds"],
           "seconds": r["seconds"], "commit": r.get("commit", "unknown")}
    for metric in ("auc", "f1", "val_auc"):
      if metric in r:
        row[metric] = {p: _stats(r[metric][p]) for p in PHASES}
    rows.append(row)
  first = runs[0] if runs else {}
  return {"dataset": first.get("dataset"), "phases": PHASES,
          "counts": first.get("counts"), "runs": rows, "failed": grid["failed"],
          "unsupported": grid.get("unsupported", []),
          "read_back": grid.get("read_back", []), "grid_seconds": grid["seconds"],
          "beats_reference": beats_reference(rows)}


def beats_reference(rows: list[dict], reference: str = REFERENCE) -> list[dict]:
  """Every (backbone, metric, phase) where another method's mean beats ``reference``.

  Args:
    rows: the "runs" rows of ``aggregate`` (with "auc" and "f1" stats).
    reference: the method compared against.

  Returns:
    [{"backbone", "metric", "phase", "method", "mean", "reference"}], where
    "method" is ``shown``, "mean" is its mean and "reference" the reference's.
  """
  out = []
  for backbone, group in by_backbone(rows):
    for ref in (r for r in group if r["method"] == reference):
      for r in (r for r in group if r["method"] != reference):
        for metric in ("auc", "f1"):
          for p in PHASES:
            a, b = r[metric][p]["mean"], ref[metric][p]["mean"]
            if a > b:
              out.append({"backbone": backbone, "metric": metric, "phase": p,
                          "method": shown(r), "mean": a, "reference": b})
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
  for backbone, _ in by_backbone(rows):
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
      out.  Own-backbone rows appear under every backbone (``by_backbone``).
    metric: "auc", "f1" or "val_auc".

  Returns:
    The table, without a trailing newline.
  """
  rows = [r for r in rows if metric in r]
  lines = ["| backbone | method | " + " | ".join(PHASES) + " |",
           "|---|---|" + "---:|" * len(PHASES)]
  for backbone, group in by_backbone(rows):
    best = {p: max(r[metric][p]["mean"] for r in group) for p in PHASES}
    for r in group:
      cells = [_cell(r[metric][p], len(group) > 1 and r[metric][p]["mean"] == best[p])
               for p in PHASES]
      lines.append(f"| {backbone} | {shown(r)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(summary: dict, level: int = 1, title: str | None = None) -> str:
  """comparison.md text (``level`` = heading depth of its title).

  Args:
    summary: the comparison.json dict (``aggregate``).
    level: heading depth of the title; sections are one deeper.
    title: what the title names (default: the dataset).

  Returns:
    The Markdown text, ending in one newline.
  """
  h = "#" * level
  rows = summary["runs"]
  n = sorted({len(r["seeds"]) for r in rows})
  seeds = "/".join(str(x) for x in n) or "0"
  md = [f"{h} {title or summary['dataset']}: emerging-item comparison", ""]
  if summary.get("counts"):
    c = summary["counts"]
    md += [f"Split: {c['old_items']} old items ({c['base_rows']} rows), "
           f"{c['emerging_items']} emerging items, {c['test_rows']} test rows. "
           f"Mean ± std over {seeds} seeds; best per backbone in bold.", ""]
  if any(r.get("own_backbone") for r in rows):
    md += ["A method shown as `name (backbone)` runs only on its own backbone; it is "
           "listed beside every backbone, all scored on the same test rows.", ""]
  md += [f"{h}# Test AUC (pooled test rows)", "", table(rows, "auc"), "",
         f"{h}# Test F1 (threshold = mean score)", "", table(rows, "f1"), "",
         f"{h}# Validation AUC (held-out old items; hyperparameters were chosen on this)",
         "", table(rows, "val_auc"), ""]
  if any(r["method"] == REFERENCE for r in rows):
    md += [f"{h}# Where a baseline beats {REFERENCE}", "",
           beats_table(summary["beats_reference"], rows), ""]
  md += [f"{h}# Wall time (seconds, summed over seeds)", "",
         "| backbone | method | pretrain | method | pretrain + method | "
         "per seed, own backbones | code |",
         "|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    s = r["seconds"]
    own = (f"{(s['backbones'] + s['method']) / len(r['seeds']):.1f}"
           if "backbones" in s and r["seeds"] else "-")
    md.append(f"| {r['backbone']} | {r['method']} | {s['pretrain']:.0f} | "
              f"{s['method']:.0f} | {s['pretrain'] + s['method']:.0f} | {own} | "
              f"{r['commit']} |")
  md += ["", "Each seed's time is measured when it ran and kept when a run resumes. "
         "The backbone cache is shared by the grid, so only the first run to need a "
         "backbone pays for its pretraining, and programs compiled by earlier runs "
         "make later ones cheaper. \"per seed, own backbones\" is what one seed of "
         "the method costs on its own: the pretraining time of every backbone it "
         "uses (recorded when the backbone was built, whichever run paid it) plus "
         "its method time. \"code\" is the commit each run was produced at. "
         f"Grid wall time of the last invocation: {summary['grid_seconds']:.0f} s "
         f"({len(summary['read_back'])} finished run(s) read back).", ""]
  for u in summary["unsupported"]:
    md.append(f"- not run: {u['method']} with {u['backbone']} ({u['reason']})")
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
  groups = by_backbone(summary["runs"]) or [("none", [])]
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4),
                           squeeze=False, sharey=True)
  x = np.arange(len(PHASES))
  # One fixed colour per method across panels (tab20 beyond 10 methods), and
  # EmerFlow's ablations and source variants dashed, so no two lines look alike.
  names = list(dict.fromkeys(shown(r) for r in summary["runs"]))
  cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
  color = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
  for ax, (backbone, group) in zip(axes[0], groups):
    for r in group:
      m = np.asarray([r["auc"][p]["mean"] for p in PHASES])
      s = np.asarray([r["auc"][p]["std"] for p in PHASES])
      name = shown(r)
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
  results.save_figure_atomic(fig, path)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` via a temporary file and a rename.

  Args:
    path: the file to write.
    text: its contents.
  """
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_comparison(workdir: str | os.PathLike, grid: dict) -> dict:
  """Writes comparison.json/.md/.png into workdir; returns the summary.

  Args:
    workdir: the grid's folder.
    grid: ``compare.run_grid``'s output.

  Returns:
    The comparison.json dict (``aggregate``).
  """
  workdir = pathlib.Path(workdir).absolute()
  summary = aggregate(grid)
  results.write_json_atomic(workdir / "comparison.json", summary)
  write_text_atomic(workdir / "comparison.md", markdown(summary))
  plot(summary, workdir / "comparison.png")
  return summary


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def section_label(config: ml_collections.ConfigDict,
                  default: ml_collections.ConfigDict, arg: str | None = None) -> str:
  """The RESULTS.md key of a comparison: its dataset and how it departs from default.

  Path fields and the fields a comparison sets itself (method, backbone,
  seeds) are not departures.

  Args:
    config: the config the comparison ran with.
    default: the same config file's config (same ``arg``), without overrides.
    arg: the config file's argument (``path.py:arg``), e.g. "smoke", or None.

  Returns:
    E.g. "movielens100k", "synthetic:smoke" or
    "disgenet (data.options.neg_sampling=degree)".
  """
  def flat(c):
    return _flat(json.loads(json.dumps(c.to_dict(), default=str)))
  a, b = flat(config), flat(default)
  skip = set(_GRID_FIELDS) | {f"{s}.{k}" for s, k in cache.UNKEYED_FIELDS}
  diff = [f"{k}={a.get(k)}" for k in sorted(set(a) | set(b))
          if k not in skip and a.get(k) != b.get(k)]
  label = config.data.name + (f":{arg}" if arg else "")
  return label + (f" ({', '.join(diff)})" if diff else "")


def results_section(summary: dict, command: str, commit: str,
                    label: str | None = None) -> str:
  """One labelled section of RESULTS.md: how it was made, then the tables.

  Args:
    summary: the comparison.json dict (``aggregate``).
    command: the command line that produced it (quoted in the section).
    commit: the code version running now.
    label: the section's name in its title (default: the dataset).

  Returns:
    The Markdown section, its title a second-level heading.
  """
  body = markdown(summary, level=2, title=label)
  head, rest = body.split("\n", 1)
  return "\n".join([head, "", f"Written by `{command}` at commit `{commit}` (each "
                    "run's own commit is in the wall-time table).", rest.lstrip("\n")])


_HEADER = ("# Results\n\nGenerated by `python -m experiments.compare ... "
           "--results_md=RESULTS.md`, one section per dataset and setting; do not edit "
           "by hand.\n")


def code_version() -> str:
  """The code a section is produced by: short HEAD, plus library/experiment files
  that differ from it (run from the repository root).

  Returns:
    E.g. ``"3cccdfc"`` or ``"3cccdfc + uncommitted emerflow_jax/meta.py"``.
  """
  def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True, check=False)
  head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
  changed = git("diff", "--name-only", "HEAD", "--", "emerflow_jax",
                "experiments").stdout.split()
  if not changed:
    return head
  more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
  return f"{head} + uncommitted {', '.join(changed[:3])}{more}"


def update_results_md(path: str | os.PathLike, label: str, section: str) -> None:
  """Writes or replaces the section ``label`` of RESULTS.md, keeping the others.

  The section sits between ``<!-- results:<label>:begin/end -->`` markers;
  the file is created with a header if absent, and replaced atomically.

  Args:
    path: the RESULTS.md file.
    label: the section's key (``section_label``, or a dataset's name).
    section: the section's Markdown (``results_section``).
  """
  path = pathlib.Path(path)
  begin, end = f"<!-- results:{label}:begin -->", f"<!-- results:{label}:end -->"
  block = f"{begin}\n{section.rstrip()}\n{end}"
  text = path.read_text() if path.exists() else _HEADER
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text)
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  write_text_atomic(path, text)
