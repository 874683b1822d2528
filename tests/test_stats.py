"""Paired bootstrap intervals against hand-computed cases."""

import numpy as np
import pytest

from emerflow_jax import metrics, stats


def _seed(prob_a, prob_b, phase="cold"):
  # Two items (ids 7 and 3), two rows each: (positive, negative).
  return ({"labels": np.array([1, 0, 1, 0]), "owner": np.array([7, 7, 3, 3]),
           f"prob_{phase}": np.array(prob_a)},
          {"labels": np.array([1, 0, 1, 0]), "owner": np.array([7, 7, 3, 3]),
           f"prob_{phase}": np.array(prob_b)})


def test_weighted_auc_equals_the_plain_auc_and_repeated_rows():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 50)
  scores = np.round(rng.random(50), 1)  # many ties
  w = rng.integers(0, 4, (3, 50))
  got = stats.weighted_auc(labels, scores, np.vstack([np.ones(50), w]))
  assert got[0] == pytest.approx(metrics.auc(labels, scores))
  for b in range(3):  # weight c == the row repeated c times
    rows = np.repeat(np.arange(50), w[b])
    assert got[b + 1] == pytest.approx(metrics.auc(labels[rows], scores[rows]))


@pytest.mark.parametrize("n_rows,n_items,decimals", [(400, 20, 1), (400, 20, 6),
                                                     (60, 40, 1), (3000, 150, 2)])
def test_item_space_auc_equals_the_row_space_auc(n_rows, n_items, decimals, monkeypatch):
  # (60, 40): more items than ITEM_SPACE_RATIO allows, the row-space path.
  rng = np.random.default_rng(n_rows + n_items)
  labels = rng.integers(0, 2, n_rows)
  scores = np.round(rng.random(n_rows), decimals)  # ties across and within items
  item_of_row = rng.integers(0, n_items, n_rows)
  counts = np.vstack([np.ones((1, n_items)), stats.resample_counts(rng, n_items, 50)])
  counts[1, :3] = 0  # items never drawn
  want = stats.weighted_auc(labels, scores, counts[:, item_of_row])
  got = stats.item_weighted_auc(labels, scores, item_of_row, counts)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert got[0] == pytest.approx(metrics.auc(labels, scores))
  # Blocks of a few tie groups each: the same values.
  monkeypatch.setattr(stats, "BLOCK_CELLS", 3 * n_items)
  np.testing.assert_allclose(stats.item_weighted_auc(labels, scores, item_of_row, counts),
                             want, rtol=1e-12, atol=1e-12)


def test_paired_replicates_hand_computed():
  # Seed 0. A ranks every positive first: AUC 1 on any resample.  B scores
  # item 7 backwards (.2 < .8) and item 3 right (.6 > .4); pooled over both:
  # pairs (.2,.8) (.2,.4) (.6,.8) lose, (.6,.4) wins -> B = 1/4, d = 3/4.
  # Items are in np.unique order: [3, 7].  Resamples:
  #   {3, 3}: B = 1 -> d = 0;  {7, 7}: B = 0 -> d = 1;  {3, 7}: d = 3/4.
  a0, b0 = _seed([0.9, 0.1, 0.6, 0.4], [0.2, 0.8, 0.6, 0.4])
  # Seed 1: B equals A, so d = 0 on every resample.
  a1, b1 = _seed([0.9, 0.1, 0.6, 0.4], [0.9, 0.1, 0.6, 0.4])
  counts = np.array([[2, 0], [0, 2], [1, 1]])
  per_seed, reps = stats.paired_replicates([a0, a1], [b0, b1], "cold", [counts, counts])
  np.testing.assert_allclose(per_seed, [0.75, 0.0])
  np.testing.assert_allclose(reps, [0.0, 0.5, 0.375])  # mean over the two seeds


def test_identical_resamples_give_a_point_interval():
  a, b = _seed([0.9, 0.1, 0.6, 0.4], [0.2, 0.8, 0.6, 0.4])
  # Every resample draws each item once: the interval collapses to d.
  per_seed, reps = stats.paired_replicates([a], [b], "cold", [np.ones((5, 2), int)])
  np.testing.assert_allclose(reps, 0.75)
  assert per_seed[0] == 0.75


def test_paired_interval_outcomes_and_bold():
  rng = np.random.default_rng(1)
  n_items, rows = 40, 10
  owner = np.repeat(np.arange(n_items), rows)
  labels = rng.integers(0, 2, n_items * rows)
  signal = labels + rng.normal(0, 1.0, labels.size)
  good = {"labels": labels, "owner": owner}
  for p in ("cold", "warm_a"):
    good[f"prob_{p}"] = signal
  noise = dict(good, prob_cold=rng.random(labels.size), prob_warm_a=signal + 1e-9)
  res = stats.paired_interval([good, good], [noise, noise], n_boot=300,
                              phases=("cold", "warm_a"))
  assert res["cold"]["outcome"] == "win" and res["cold"]["lo"] > 0
  assert res["warm_a"]["outcome"] == "tie"  # identical rankings: no difference
  assert res["warm_a"]["lo"] <= 0 <= res["warm_a"]["hi"]
  flipped = stats.paired_interval([noise], [good], n_boot=300, phases=("cold",))
  assert flipped["cold"]["outcome"] == "loss"
  assert stats.format_diff(res["cold"]).startswith("**+")
  assert "**" not in stats.format_diff(res["warm_a"])
  again = stats.paired_interval([good, good], [noise, noise], n_boot=300,
                                phases=("cold",))
  assert again["cold"] == res["cold"]  # seeded


def test_rows_must_match():
  a, b = _seed([0.9, 0.1, 0.6, 0.4], [0.2, 0.8, 0.6, 0.4])
  b = dict(b, owner=np.array([7, 3, 7, 3]))
  with pytest.raises(ValueError, match="owner"):
    stats.paired_interval([a], [b], phases=("cold",))
