"""Tests for the synthetic latent-factor world."""

import numpy as np
import pytest

from emerflow_jax.data import synthetic


def _small(**kw):
  args = dict(n_users=50, n_items=30, mean_count=20, seed=1)
  args.update(kw)
  return synthetic.make_synthetic(**args)


def test_same_seed_same_world_other_seed_other_world():
  a, b, c = _small(), _small(), _small(seed=2)
  for f in ("users", "items", "labels", "times"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
  assert not np.array_equal(a.item_vectors, c.item_vectors)


def test_exact_item_counts_are_honoured():
  counts = [5, 0, 12, 1, 7]
  ds = synthetic.make_synthetic(n_users=20, item_counts=counts, seed=0)
  assert ds.n_items == 5 and ds.n_rows == 25
  np.testing.assert_array_equal(np.bincount(ds.items, minlength=5), counts)


def test_power_law_counts_have_the_requested_scale():
  ds = _small(n_items=200, mean_count=30, zipf=1.1)
  counts = np.bincount(ds.items, minlength=200)
  assert counts.min() >= 1
  assert 25 <= counts.mean() <= 35
  assert counts.max() > 5 * np.median(counts)  # heavy head


def test_fields_follow_the_dataset_conventions():
  ds = _small()
  ds.validate()
  np.testing.assert_array_equal(ds.item_fields["item_id"], np.arange(1, 31))
  np.testing.assert_array_equal(ds.user_fields["user_id"], np.arange(1, 51))
  assert ds.item_vectors.shape == (30, 32) and ds.item_vectors.dtype == np.float32
  assert ds.info["true_item_factors"].shape == (30, 8)
  assert set(np.unique(ds.labels)) <= {0.0, 1.0}
  assert 0.1 < ds.labels.mean() < 0.9


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_text_vectors_are_a_noisy_linear_view_of_the_true_factors(noise):
  ds = _small(n_items=120, text_noise=noise, seed=4)
  v = ds.info["true_item_factors"].astype(np.float64)
  text = ds.item_vectors.astype(np.float64)
  coef, *_ = np.linalg.lstsq(v, text, rcond=None)
  resid = text - v @ coef
  rel = np.linalg.norm(resid) / np.linalg.norm(text)
  if noise == 0.0:
    assert rel < 1e-5  # exactly a projection of the factors
  else:
    assert 0.1 < rel < 0.5  # informative, but not the factors themselves
