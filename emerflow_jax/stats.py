"""Paired intervals: EmerFlow minus a baseline, per phase, with a bootstrap.

DESIGN §10.  For one phase and two methods run on the same split and seeds:

* per seed s, d_s = AUC_A(s) - AUC_B(s) on the pooled test rows; the point
  estimate is the mean of d_s over seeds (paired: both methods of a seed see
  the same backbone seed and the same validation carve);
* one bootstrap replicate resamples the emerging items with replacement,
  each drawn item bringing all its test rows, once per seed, and the *same*
  resample for both methods within that seed; the pooled AUC of both is
  recomputed on it and the replicate is the mean over seeds of the
  differences;
* the interval is the percentile interval of the replicates.

Resampling items rather than rows respects that rows of one item are not
independent.  A resample with an item drawn c times is the pooled AUC with
that item's rows weighted c, which ``item_weighted_auc`` computes for a
whole batch of resamples from one sort (``weighted_auc`` is its row-space
reference).  A difference counts (a win or a loss, and
bold in a table) only when its interval excludes zero.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from emerflow_jax import checkpoint, protocol

Preds = Mapping[str, np.ndarray]  # predictions.npz of one seed


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
                 ) -> np.ndarray:
  """Pooled AUC of weighted rows, for a batch of weightings (tie-aware).

  Args:
    labels: [n] binary labels.
    scores: [n] scores.
    weights: [B, n] non-negative row weights (a bootstrap: how often each
      row was drawn).

  Returns:
    [B] AUCs: P(score_pos > score_neg) + P(tie) / 2 over weighted pairs.
  """
  labels = np.asarray(labels).astype(bool)
  order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
  s = np.asarray(scores, np.float64)[order]
  y = labels[order]
  w = np.asarray(weights, np.float64)[:, order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups
  pos = np.add.reduceat(w * y, starts, axis=1)
  neg = np.add.reduceat(w * ~y, starts, axis=1)
  below = np.cumsum(neg, axis=1) - neg
  den = pos.sum(1) * neg.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (pos * (below + 0.5 * neg)).sum(1) / den


# Item space while n_items^2 <= this x n_rows (a BLAS product over items
# against numpy passes over rows; measured break-even on 2 CPU cores).
ITEM_SPACE_RATIO = 64
# Cells of one block's [tie groups, items] tables (32 MiB of float64).
BLOCK_CELLS = 1 << 22


def item_weighted_auc(labels: np.ndarray, scores: np.ndarray, item_of_row: np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
  """``weighted_auc`` with row weights ``counts[:, item_of_row]``, in item space.

  An item bootstrap weights every row of an item by the item's draw count
  c, so the weighted pair count is the quadratic form c^T M c, where
  M[I, J] counts the (positive row of I, negative row of J) pairs the
  positive scores above (ties 1/2).  M is built once from one sort; each
  resample then costs a matrix product over items instead of a pass over
  rows (DisGeNET's 14,568 test rows of 814 items: 0.10 s against 0.43 s for
  1,000 resamples).  With many items per row (``ITEM_SPACE_RATIO``) it is the
  row-space ``weighted_auc``.

  Args:
    labels: [n] binary labels.
    scores: [n] scores.
    item_of_row: [n] int item index of each row, in [0, n_items).
    counts: [B, n_items] non-negative draw counts.

  Returns:
    [B] AUCs, equal to ``weighted_auc(labels, scores, counts[:, item_of_row])``.
  """
  labels = np.asarray(labels).astype(bool)
  counts = np.asarray(counts, np.float64)
  n_items = counts.shape[1]
  if n_items * n_items > ITEM_SPACE_RATIO * len(labels):  # M would cost more than rows
    return weighted_auc(labels, scores, counts[:, np.asarray(item_of_row)])
  order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
  s = np.asarray(scores, np.float64)[order]
  y, item = labels[order], np.asarray(item_of_row)[order]
  group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # tie group of each row
  n_groups = int(group[-1]) + 1 if len(group) else 0
  m = np.zeros((n_items, n_items))
  seen = np.zeros(n_items)  # negatives per item in the groups already done
  # Blocks of tie groups keep the [groups, items] tables small.
  block = max(1, BLOCK_CELLS // max(n_items, 1))
  bounds = np.searchsorted(group, np.arange(0, n_groups + block, block))
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if lo == hi:
      continue
    g, yy, it = group[lo:hi] - group[lo], y[lo:hi], item[lo:hi]
    tie = np.zeros((int(g[-1]) + 1, n_items))
    np.add.at(tie, (g[~yy], it[~yy]), 1.0)  # negatives per (group, item)
    below = seen + np.cumsum(tie, axis=0) - tie
    np.add.at(m, it[yy], below[g[yy]] + 0.5 * tie[g[yy]])
    seen += tie.sum(0)
  n_pos = np.bincount(item[y], minlength=n_items).astype(np.float64)
  n_neg = np.bincount(item[~y], minlength=n_items).astype(np.float64)
  num = np.einsum("bi,bi->b", counts @ m, counts)
  den = (counts @ n_pos) * (counts @ n_neg)
  with np.errstate(invalid="ignore", divide="ignore"):
    return num / den


def _check_pair(a: Preds, b: Preds, prefix: str) -> None:
  for k in ("labels", "owner"):
    if not np.array_equal(a[prefix + k], b[prefix + k]):
      raise ValueError(f"the two methods were scored on different rows ({prefix}{k} "
                       "differs): compare runs of one split and seed")


def resample_counts(rng: np.random.Generator, n_items: int, n_boot: int) -> np.ndarray:
  """[n_boot, n_items] draw counts of item bootstraps (each row sums to n_items).

  Args:
    rng: the generator to draw from.
    n_items: items per resample (each drawn uniformly, with replacement).
    n_boot: resamples.

  Returns:
    [n_boot, n_items] int counts: how often each item was drawn.
  """
  return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot)


def paired_replicates(a: Sequence[Preds], b: Sequence[Preds], phase: str,
                      counts: Sequence[np.ndarray], prefix: str = ""
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per-seed differences and bootstrap replicates of their mean.

  Args:
    a: per seed, method A's predictions (``labels``, ``owner``, ``prob_<phase>``).
    b: per seed, method B's, on the same rows.
    phase: "cold", "warm_a", "warm_b" or "warm_c".
    counts: per seed, [B, n_items] draw counts over that seed's items in
      ``np.unique(owner)`` order (``resample_counts``); shared by A and B.
    prefix: "" for the test rows, "val_" for the validation holdout.

  Returns:
    ([n_seeds] d_s on all rows, [B] replicates of mean_s d_s).
  """
  if not (len(a) == len(b) == len(counts)) or not a:
    raise ValueError(f"seeds: {len(a)} vs {len(b)} vs {len(counts)} resamples")
  diffs, reps = [], []
  for pa, pb, c in zip(a, b, counts):
    _check_pair(pa, pb, prefix)
    labels = pa[prefix + "labels"]
    _, item_of_row = np.unique(pa[prefix + "owner"], return_inverse=True)
    c = np.vstack([np.ones((1, np.asarray(c).shape[1])), np.asarray(c)])
    key = f"{prefix}prob_{phase}"
    d = (item_weighted_auc(labels, pa[key], item_of_row, c)
         - item_weighted_auc(labels, pb[key], item_of_row, c))
    diffs.append(d[0])
    reps.append(d[1:])
  return np.asarray(diffs), np.mean(reps, axis=0)


def paired_interval(a: Sequence[Preds], b: Sequence[Preds], n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0, prefix: str = "",
                    phases: Sequence[str] = protocol.PHASES) -> dict[str, dict]:
  """A minus B per phase: mean paired difference and its bootstrap interval.

  Args:
    a: per seed, method A's predictions.
    b: per seed, method B's (same seeds, same order, same rows).
    n_boot: bootstrap replicates.
    level: the interval's coverage.
    seed: the bootstrap's seed (one resample per seed, shared by all phases).
    prefix: "" for the test rows, "val_" for the validation holdout.
    phases: phases to compare.

  Returns:
    phase -> {"diff", "lo", "hi", "per_seed", "outcome" ("win" | "tie" |
    "loss": the interval above, around or below zero), "n_boot", "level"}.
  """
  rng = np.random.default_rng(seed)
  counts = [resample_counts(rng, len(np.unique(p[prefix + "owner"])), n_boot) for p in a]
  out = {}
  for phase in phases:
    per_seed, reps = paired_replicates(a, b, phase, counts, prefix)
    reps = reps[np.isfinite(reps)]  # a resample with one class only has no AUC
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    out[phase] = {"diff": float(per_seed.mean()), "lo": float(lo), "hi": float(hi),
                  "per_seed": per_seed.tolist(), "outcome": outcome(lo, hi),
                  "n_boot": int(reps.size), "level": level}
  return out


def outcome(lo: float, hi: float) -> str:
  """"win" if the interval is above zero, "loss" if below, else "tie".

  Args:
    lo: the interval's lower end.
    hi: its upper end.

  Returns:
    "win", "loss" or "tie".
  """
  return "win" if lo > 0 else "loss" if hi < 0 else "tie"


def format_diff(d: Mapping[str, float], digits: int = 4) -> str:
  """``+0.0123 [+0.0040, +0.0210]``, bold only when the interval excludes zero.

  Args:
    d: a ``paired_interval`` entry ("diff", "lo", "hi").
    digits: decimals shown.

  Returns:
    The Markdown cell text.
  """
  text = f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"
  return f"**{text}**" if outcome(d["lo"], d["hi"]) != "tie" else text


def load_predictions(run_dir: str | os.PathLike, seeds: Sequence[int]) -> list[dict]:
  """``<run_dir>/seed_<s>/predictions.npz`` for each seed.

  Args:
    run_dir: a run's folder (``train.train_and_evaluate``'s workdir).
    seeds: the seeds to read, in the order wanted.

  Returns:
    One array dict per seed, in the order of ``seeds``.

  Raises:
    FileNotFoundError: naming the missing file.
  """
  out = []
  for s in seeds:
    path = pathlib.Path(run_dir) / f"seed_{s}" / "predictions.npz"
    arrays = checkpoint.load_arrays(path)
    if arrays is None:
      raise FileNotFoundError(f"{path}: no predictions for seed {s}")
    out.append(arrays)
  return out
