"""Side-by-side fidelity of our baselines against the reference code's numbers.

The reference numbers are DESIGN §9: the public PyTorch code of CVAR (base,
MetaE, MWUF, CVAR) and of EmerG, run on the ML-100K split of DESIGN §1
(N=100, K=10, label rating >= 4), batch 256, 3 runs each.  They live here, in
one place, as data.  ``fidelity_section`` reads our ``results.json`` files
(runs of ``experiments/configs/movielens100k.py:peer``) and writes one
Markdown table per phase: ours (mean ± std over seeds), the reference, the
difference and whether it is within the tolerance.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from emerflow_jax import protocol

TOLERANCE = 0.005

# DESIGN §9, AUC on the pooled test rows, (cold, warm_a, warm_b, warm_c).
# Keys are (our method name, our backbone name).
REFERENCE_AUC: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("base", "deepfm"): (.687, .700, .711, .722),
    ("base", "widedeep"): (.676, .687, .695, .705),
    ("metaemb", "deepfm"): (.690, .702, .713, .723),
    ("mwuf", "deepfm"): (.686, .700, .712, .723),  # user/item swap fixed
    ("cvar", "deepfm"): (.681, .723, .735, .736),
    ("cvar", "widedeep"): (.665, .703, .717, .712),
    ("emerg", "emerg_gnn"): (.687, .717, .720, .721),  # its own GNN backbone
}

LABELS = {"base": "base", "metaemb": "MetaE", "mwuf": "MWUF", "cvar": "CVAR",
          "emerg": "EmerG", "deepfm": "DeepFM", "widedeep": "Wide&Deep",
          "emerg_gnn": "GNN"}


def load_runs(paths: Sequence[str | os.PathLike]) -> dict[tuple[str, str], dict]:
  """Reads results.json files (a file or its run folder), keyed by (method, backbone).

  Args:
    paths: results.json files or the workdirs that hold them.

  Returns:
    (method, backbone) -> the results.json dict.
  """
  out = {}
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      p = p / "results.json"
    res = json.loads(p.read_text())
    key = (res["method"], res["backbone"])
    if key in out:
      raise ValueError(f"two runs of {key}: the second is {p}")
    out[key] = res
  return out


def compare(runs: Mapping[tuple[str, str], dict],
            reference: Mapping[tuple[str, str], Sequence[float]] = REFERENCE_AUC,
            tolerance: float = TOLERANCE) -> list[dict]:
  """One row per (method, backbone, phase) that has both our run and a reference.

  Args:
    runs: (method, backbone) -> results.json dict with "auc": {phase: [per seed]}.
    reference: (method, backbone) -> the four reference AUCs, in PHASES order.
    tolerance: the largest |ours - reference| that counts as reproduced.

  Returns:
    Rows {"method", "backbone", "phase", "mean", "std", "seeds", "ref",
    "diff", "within"}, in reference order then phase order; std is the
    sample std (ddof 1; 0 for one seed).
  """
  rows = []
  for key, ref in reference.items():
    if key not in runs:
      continue
    auc = runs[key]["auc"]
    for phase, r in zip(protocol.PHASES, ref):
      vals = np.asarray(auc[phase], np.float64)
      mean = float(vals.mean())
      std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
      diff = mean - float(r)
      rows.append({"method": key[0], "backbone": key[1], "phase": phase,
                   "mean": mean, "std": std, "seeds": int(len(vals)),
                   "ref": float(r), "diff": diff,
                   "within": bool(abs(diff) <= tolerance + 1e-12)})
  return rows


def fidelity_section(rows: Sequence[dict], tolerance: float = TOLERANCE,
                     title: str = "Fidelity to the reference code (ML-100K, `:peer`)"
                     ) -> str:
  """Markdown: one table per phase of ``compare`` rows.

  Args:
    rows: ``compare``'s rows.
    tolerance: the tolerance they were judged with (stated in the text).
    title: the section's heading.

  Returns:
    The section's Markdown text.
  """
  lines = [f"## {title}", "",
           "AUC on the pooled test rows: ours (mean ± std over seeds, "
           "`experiments/configs/movielens100k.py:peer`) against the reference "
           f"code's (DESIGN §9); within = |difference| <= {tolerance:.3f}.", ""]
  n_in = sum(r["within"] for r in rows)
  lines += [f"{n_in} of {len(rows)} (method, backbone, phase) cells within tolerance.", ""]
  for phase in protocol.PHASES:
    sub = [r for r in rows if r["phase"] == phase]
    if not sub:
      continue
    lines += [f"### {phase}", "",
              "| method | backbone | ours | reference | difference | within ±"
              f"{tolerance:.3f} |", "|---|---|---|---|---|---|"]
    for r in sub:
      lines.append(
          f"| {LABELS.get(r['method'], r['method'])} | "
          f"{LABELS.get(r['backbone'], r['backbone'])} | {r['mean']:.4f} ± "
          f"{r['std']:.4f} (n={r['seeds']}) | {r['ref']:.3f} | {r['diff']:+.4f} | "
          f"{'yes' if r['within'] else 'no'} |")
    lines.append("")
  return "\n".join(lines)
