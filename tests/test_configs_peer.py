"""Tests for the ``:peer`` variant of the MovieLens-100K config."""

import pytest

from emerflow_jax import data, protocol
from experiments.configs import movielens100k


def test_peer_variant_is_the_reference_setting():
  c = movielens100k.get_config("peer")
  d = movielens100k.get_config()
  assert c.optim.batch_size == 256 and c.optim.epochs == 1 and c.optim.lr == 1e-3
  # One epoch of 256-row minibatches over a phase's 472 x 10 rows.
  assert c.warmup.steps == 19 and c.warmup.lr == 1e-3
  assert c.cvar.keep == 0.0 and c.cvar.iters == 10 and c.cvar.warm_epochs == 1
  assert c.emerg.lr == 1e-4 and c.emerg.inner_lr == 1e-3 and c.emerg.warm_steps == 17
  assert c.data.val_fraction == 0.0
  assert (c.data.n_max, c.data.k) == (d.data.n_max, d.data.k) == (100, 10)
  assert d.optim.epochs != 1  # the default stays the validated one


def test_peer_has_no_count_feature_and_one_epoch_matches_the_split(data_dir):
  c = movielens100k.get_config("peer")
  c.data.dir = str(data_dir)
  c.data.download = False
  ds = data.load_dataset(c.data)
  fields = set(ds.user_fields) | set(ds.item_fields)
  assert not any("count" in f for f in fields), fields
  split = protocol.split_emerging_items(ds, c.data.n_max, c.data.k)
  rows = split.warm_rows["warm_a"].size
  assert c.warmup.steps == -(-rows // c.optim.batch_size)
