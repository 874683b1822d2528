"""AUC and F1 on pooled test rows, without sklearn.

AUC is the Mann-Whitney statistic with average ranks for ties, i.e. a tied
positive/negative pair counts 1/2.  F1 thresholds at the mean predicted score,
as the CVAR and EmerG evaluation code does.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their positions."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  # Start index of each run of equal values, and its length.
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  lengths = np.diff(np.r_[starts, len(xs)])
  avg = starts + (lengths + 1) / 2.0
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(avg, lengths)
  return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve of binary labels [n] and scores [n] (tie-aware).

  Args:
    labels: [n] binary labels (flattened; nonzero is positive).
    scores: [n] predicted scores, as many as ``labels``.

  Returns:
    The AUC in [0, 1]; a tied positive/negative pair counts 1/2.

  Raises:
    ValueError: when a class is missing (AUC undefined) or scores are not finite.
  """
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} vs scores {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  n_pos = int(labels.sum())
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError("AUC needs both positive and negative labels")
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_at_mean(labels: np.ndarray, scores: np.ndarray) -> float:
  """F1 of predicting 1 where score > mean(score) (CVAR/EmerG threshold rule).

  Args:
    labels: [n] binary labels (flattened, nonzero is positive).
    scores: [n] predicted scores.

  Returns:
    The F1 score; 0.0 when no positive is predicted correctly.
  """
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  pred = scores > scores.mean()
  tp = float(np.sum(pred & labels))
  fp = float(np.sum(pred & ~labels))
  fn = float(np.sum(~pred & labels))
  if tp == 0:
    return 0.0
  return 2 * tp / (2 * tp + fp + fn)
