"""Tests for AUC (tie-aware Mann-Whitney) and F1 at the mean-score threshold."""

import numpy as np
import pytest

from emerflow_jax import metrics


def _pairwise_auc(labels, scores):
  """Brute force: P(score_pos > score_neg) + 0.5 P(equal) over all pairs."""
  pos = scores[labels == 1][:, None]
  neg = scores[labels == 0][None, :]
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_auc_hand_computed_without_ties():
  # Pairs (pos, neg): (.35,.1) (.35,.4)x (.8,.1) (.8,.4) -> 3/4.
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
  assert metrics.auc([0, 1], [0.2, 0.9]) == 1.0
  assert metrics.auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_hand_computed_with_ties():
  # pos {.5, .9}, neg {.5, .2}: (.5,.5) counts 1/2, the other 3 pairs 1 -> 3.5/4.
  assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
  # A tie spanning both classes and a third score.
  assert metrics.auc([1, 1, 0, 0, 0], [3, 1, 1, 1, 0]) == pytest.approx(
      (3 + 0.5 * 2 + 1) / 6)


def test_auc_of_all_tied_scores_is_one_half():
  assert metrics.auc([0, 1, 1, 0, 1], np.full(5, 0.3)) == 0.5


def test_auc_matches_brute_force_on_random_data_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 500)
  scores = np.round(rng.normal(size=500) + labels, 1)  # many ties
  assert metrics.auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores),
                                                      abs=1e-12)


def test_auc_is_invariant_to_monotone_transforms():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 300)
  scores = np.round(rng.normal(size=300) + 0.5 * labels, 2)
  base = metrics.auc(labels, scores)
  assert metrics.auc(labels, 3 * scores + 7) == base
  assert metrics.auc(labels, np.exp(scores)) == base
  assert metrics.auc(labels, np.arctan(scores)) == base
  assert metrics.auc(labels, -scores) == pytest.approx(1 - base)


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "both positive and negative"),
    ([0, 0], [0.1, 0.2], "both positive and negative"),
    ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
    ([0, 1, 1], [0.1, np.inf, 0.3], "NaN or inf"),
    ([0, 1, 1], [0.1, 0.2], "labels"),
])
def test_auc_errors(labels, scores, message):
  with pytest.raises(ValueError, match=message):
    metrics.auc(labels, scores)


def test_f1_at_mean_threshold_by_hand():
  # mean = 2.7 / 5 = 0.54: predict [1, 1, 0, 0, 1]; tp=2, fp=1, fn=1 -> 4/6.
  labels = [1, 0, 1, 0, 1]
  scores = [0.9, 0.8, 0.3, 0.1, 0.6]
  assert metrics.f1_at_mean(labels, scores) == pytest.approx(2 / 3)


def test_f1_threshold_is_strictly_above_the_mean():
  # mean = 0.5 exactly: the 0.5 score is predicted negative.
  assert metrics.f1_at_mean([1, 1, 0], [0.5, 1.0, 0.0]) == pytest.approx(2 / 3)
  # All scores equal: nothing is above the mean, so no true positive.
  assert metrics.f1_at_mean([1, 0, 1], [0.4, 0.4, 0.4]) == 0.0
  assert metrics.f1_at_mean([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
