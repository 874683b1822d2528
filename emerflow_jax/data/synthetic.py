"""A latent-factor world with known ground truth, for tests and scale runs.

Users and items have latent factors; the click probability is
``sigmoid(scale * <u, v> + item_bias)``.  Side features are coarse, noisy views
of the factors (so they help but do not identify an item), and the item "text
vector" is a random projection of the item factors plus noise, standing in for
an LLM embedding.  Item popularity follows a power law unless exact per-item
counts are given (used to reproduce the canonical ML-1M split arithmetic).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from emerflow_jax.data import dataset

_BLOCK = 1 << 20  # rows per block of the affinity product


def make_synthetic(n_users: int = 600, n_items: int = 500, dim: int = 8,
                   text_dim: int = 32, text_noise: float = 0.3,
                   mean_count: float = 60.0, zipf: float = 1.1,
                   item_counts: Sequence[int] | None = None,
                   signal: float = 2.0, n_genres: int = 12, seed: int = 0,
                   ) -> dataset.Dataset:
  """Generates a synthetic Dataset.

  Args:
    n_users: number of users.
    n_items: number of items (ignored when item_counts is given).
    dim: latent dimension of the true factors.
    text_dim: dimension of the item text vector.
    text_noise: std of the noise on the text vector, relative to its signal.
    mean_count: mean interactions per item for the power-law counts.
    zipf: power-law exponent of item popularity.
    item_counts: exact number of rows per item (overrides n_items/mean_count).
    signal: scale of the user-item affinity in the logit.
    n_genres: vocabulary of the genre-like item feature.
    seed: the only source of randomness.

  Returns:
    A validated Dataset whose ``item_vectors`` hold the text vectors.
  """
  rng = np.random.default_rng(seed)
  if item_counts is not None:
    counts = np.asarray(item_counts, np.int64)
    n_items = len(counts)
  else:
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    weights = ranks ** -zipf
    counts = np.maximum(1, np.round(weights / weights.mean() * mean_count))
    counts = rng.permutation(counts.astype(np.int64))
  u_fac = rng.normal(size=(n_users, dim)) / np.sqrt(dim)
  v_fac = rng.normal(size=(n_items, dim))
  bias = rng.normal(scale=0.5, size=n_items)

  items = np.repeat(np.arange(n_items), counts).astype(np.int32)
  users = rng.integers(0, n_users, size=len(items)).astype(np.int32)
  # In row blocks: the same values as one [rows, dim] product, at a fraction
  # of the memory in ML-1M-size and bigger worlds (benchmarks/scale.py).
  affinity = np.concatenate([
      np.sum(u_fac[users[i:i + _BLOCK]] * v_fac[items[i:i + _BLOCK]], -1)
      for i in range(0, max(len(items), 1), _BLOCK)])
  logits = signal * affinity + bias[items]
  labels = (rng.random(len(items)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
  # Each item is released at a random time; its interactions follow it.
  release = rng.uniform(0, 1000, size=n_items)
  times = release[items] + rng.exponential(100.0, size=len(items))

  # Side features: genre = a few nearest "genre centroids" of the item factor.
  centroids = rng.normal(size=(n_genres, dim))
  sims = v_fac @ centroids.T
  top = np.argsort(-sims, axis=1)[:, :2] + 1
  genres = top.astype(np.int32)
  pop_bucket = dataset.bucketize(bias, 5)  # a noisy "quality" side field
  u_group = dataset.bucketize(u_fac[:, 0], 4)

  proj = rng.normal(size=(dim, text_dim)) / np.sqrt(dim)
  text = v_fac @ proj
  text = text + text_noise * text.std() * rng.normal(size=text.shape)

  user_fields = {"user_id": np.arange(1, n_users + 1, dtype=np.int32),
                 "group": u_group}
  item_fields = {"item_id": np.arange(1, n_items + 1, dtype=np.int32),
                 "quality": pop_bucket, "genres": genres}
  vocab = {"user/user_id": n_users + 1, "user/group": 5,
           "item/item_id": n_items + 1, "item/quality": 6,
           "item/genres": n_genres + 1}
  raw = [{"name": f"item {i}", "genres": ", ".join(f"g{g}" for g in genres[i])}
         for i in range(n_items)]
  return dataset.Dataset(
      name="synthetic", item_type="item", users=users, items=items,
      labels=labels, times=times, user_fields=user_fields,
      item_fields=item_fields, vocab_sizes=vocab,
      item_keys=np.asarray([str(i) for i in range(n_items)]), item_raw=raw,
      item_vectors=text.astype(np.float32),
      info={"seed": seed, "true_item_factors": v_fac.astype(np.float32)},
  ).validate()
