"""Tests for the Dataset structure: validation errors and the encoding helpers."""

import dataclasses

import numpy as np
import pytest

from emerflow_jax.data import dataset


def _copy(ds, **changes):
  """A copy of ``ds`` with fresh field dicts (session fixtures stay intact)."""
  fresh = dataclasses.replace(ds, user_fields=dict(ds.user_fields),
                              item_fields=dict(ds.item_fields),
                              vocab_sizes=dict(ds.vocab_sizes))
  return dataclasses.replace(fresh, **changes)


def test_valid_dataset_passes_and_reports_sizes(tiny_ds):
  assert tiny_ds.validate() is tiny_ds
  assert tiny_ds.n_rows == len(tiny_ds.items)
  assert tiny_ds.n_users == 60 and tiny_ds.n_items == 40


@pytest.mark.parametrize("change, message", [
    (lambda d: {"labels": d.labels[:-1]}, "labels has shape"),
    (lambda d: {"times": d.times[:, None]}, "times has shape"),
    (lambda d: {"users": np.where(np.arange(d.n_rows) == 3, d.n_users, d.users)},
     "user index out of range"),
    (lambda d: {"items": np.where(np.arange(d.n_rows) == 3, -1, d.items)},
     "item index out of range"),
    (lambda d: {"labels": np.where(np.arange(d.n_rows) == 0, 0.5, d.labels)},
     "labels must be 0 or 1"),
    (lambda d: {"labels": np.where(np.arange(d.n_rows) == 0, np.nan, d.labels)},
     "labels must be 0 or 1"),
    (lambda d: {"times": np.where(np.arange(d.n_rows) == 5, np.nan, d.times)},
     "non-finite times"),
    (lambda d: {"times": np.where(np.arange(d.n_rows) == 5, np.inf, d.times)},
     "non-finite times"),
    (lambda d: {"item_raw": d.item_raw[:-1]}, "one entry per item"),
    (lambda d: {"item_vectors": d.item_vectors[:-1]}, "item_vectors has"),
    (lambda d: {"item_vectors": np.where(np.arange(d.n_items)[:, None] == 2,
                                         np.nan, d.item_vectors)},
     "item_vectors has NaN"),
])
def test_validate_names_the_problem(tiny_ds, change, message):
  bad = _copy(tiny_ds, **change(tiny_ds))
  with pytest.raises(dataset.DataError, match=message):
    bad.validate()


def test_validate_checks_field_tables(tiny_ds):
  bad = _copy(tiny_ds)
  bad.item_fields["quality"] = bad.item_fields["quality"][:-1]
  with pytest.raises(dataset.DataError, match="item/quality has 39 rows, want 40"):
    bad.validate()
  bad = _copy(tiny_ds)
  bad.item_fields["genres"] = bad.item_fields["genres"].copy()
  bad.item_fields["genres"][0, 0] = bad.vocab_sizes["item/genres"]
  with pytest.raises(dataset.DataError, match="item/genres values outside"):
    bad.validate()
  bad = _copy(tiny_ds)
  del bad.vocab_sizes["user/group"]
  with pytest.raises(dataset.DataError, match="no vocab size for user/group"):
    bad.validate()
  bad = _copy(tiny_ds)
  del bad.item_fields["item_id"]
  with pytest.raises(dataset.DataError, match="item_id"):
    bad.validate()


def test_encode_categorical_starts_at_one_and_is_sorted():
  codes, vocab = dataset.encode_categorical(["b", "a", "c", "a"])
  assert vocab == {"a": 1, "b": 2, "c": 3}
  np.testing.assert_array_equal(codes, [2, 1, 3, 1])
  assert codes.dtype == np.int32


def test_encode_sequences_pads_truncates_and_drops_rare_tokens():
  seqs = [["x", "y", "z"], ["y"], [], ["x", "y", "rare"]]
  out, vocab = dataset.encode_sequences(seqs, max_len=2, min_count=2)
  assert vocab == {"x": 1, "y": 2}  # "z" and "rare" occur once
  np.testing.assert_array_equal(out, [[1, 2], [2, 0], [0, 0], [1, 2]])
  out, vocab = dataset.encode_sequences(seqs, max_len=4)
  assert len(vocab) == 4 and out.shape == (4, 4)
  np.testing.assert_array_equal(out[0], [vocab["x"], vocab["y"], vocab["z"], 0])


def test_tokenize_lowercases_and_splits_on_punctuation():
  assert dataset.tokenize("Toy Story 2: Woody's Return!") == [
      "toy", "story", "2", "woody", "s", "return"]


def test_bucketize_is_monotone_and_maps_nan_to_zero():
  values = np.asarray([5.0, np.nan, 1.0, 3.0, 2.0, 4.0, np.inf, 6.0])
  out = dataset.bucketize(values, 3)
  assert out[1] == 0 and out[6] == 0
  ok = np.isfinite(values)
  assert set(out[ok]) == {1, 2, 3}
  order = np.argsort(values[ok])
  assert np.all(np.diff(out[ok][order]) >= 0)
