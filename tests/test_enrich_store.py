"""Tests for emerflow_jax.enrich.store: append/read, torn lines, validation."""

import json

import numpy as np
import pytest

from emerflow_jax.enrich import store


def _records(keys):
  return [{"key": k, "text": f"name: {k}"} for k in keys]


def test_append_read_round_trip(tmp_path):
  path = tmp_path / store.TEXTS
  assert store.read_records(path) == []
  assert store.append_records(path, _records(["a", "b"])) == 2
  store.append_records(path, _records(["c"]))
  assert store.read_records(path) == _records(["a", "b", "c"])


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
  path = tmp_path / store.TEXTS
  store.append_records(path, _records(["a", "b"]))
  with open(path, "ab") as f:
    f.write(b'{"key": "c", "te')  # a write cut by a kill
  assert [r["key"] for r in store.read_records(path)] == ["a", "b"]
  assert path.read_bytes().endswith(b"te")  # reading alone changes nothing
  store.read_records(path, repair=True)
  assert path.read_bytes().endswith(b"}\n")
  store.append_records(path, _records(["c"]))
  assert [r["key"] for r in store.read_records(path)] == ["a", "b", "c"]


def test_bad_or_duplicate_lines_name_file_line_and_item(tmp_path):
  path = tmp_path / store.TEXTS
  store.append_records(path, _records(["a", "b", "a"]))
  with pytest.raises(store.StoreError, match=r"texts.jsonl:3: duplicate item 'a'"):
    store.read_records(path)
  path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
  with pytest.raises(store.StoreError, match=r"texts.jsonl:2: not valid JSON"):
    store.read_records(path)
  path.write_text('{"text": "x"}\n')
  with pytest.raises(store.StoreError, match=r"texts.jsonl:1: record has no 'key'"):
    store.read_records(path)


def _vector_store(tmp_path, keys=("a", "b", "c"), dim=4, encoder="enc@1"):
  vectors = np.arange(len(keys) * dim, dtype=np.float32).reshape(len(keys), dim)
  store.write_manifest(tmp_path, {"encoder": encoder, "dim": dim})
  store.write_vectors(tmp_path, list(keys), vectors)
  return vectors


def test_vectors_round_trip_in_requested_order(tmp_path):
  vectors = _vector_store(tmp_path)
  got = store.load_vectors(tmp_path, ["c", "a"], encoder="enc@1", dim=4)
  np.testing.assert_array_equal(got, vectors[[2, 0]])
  assert got.dtype == np.float32
  assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_missing_item_names_store_and_item(tmp_path):
  _vector_store(tmp_path)
  with pytest.raises(store.StoreError, match=rf"{tmp_path}.*item 'z' is missing"):
    store.load_vectors(tmp_path, ["a", "z"])


def test_duplicate_item_names_store_and_item(tmp_path):
  _vector_store(tmp_path)
  np.save(tmp_path / store.KEYS, np.asarray(["a", "b", "a"]))
  with pytest.raises(store.StoreError, match=rf"{tmp_path}.*duplicate item 'a'"):
    store.load_vectors(tmp_path, ["a"])


def test_wrong_dimension_is_refused(tmp_path):
  _vector_store(tmp_path)
  with pytest.raises(store.StoreError, match=rf"{tmp_path}.*dim 4, want 8"):
    store.load_vectors(tmp_path, ["a"], dim=8)
  np.save(tmp_path / store.VECTORS, np.zeros((3, 5), np.float32))
  with pytest.raises(store.StoreError, match=rf"{tmp_path}.*dimension 5, want 4"):
    store.load_vectors(tmp_path, ["a"])


def test_nan_names_store_and_item(tmp_path):
  vectors = _vector_store(tmp_path)
  vectors[1, 2] = np.nan
  np.save(tmp_path / store.VECTORS, vectors)
  with pytest.raises(store.StoreError, match=rf"{tmp_path}.*item 'b' has NaN"):
    store.load_vectors(tmp_path, ["a"])
  with pytest.raises(store.StoreError, match="item 'c' has NaN or inf"):
    store.write_vectors(tmp_path, ["a", "b", "c"],
                        np.asarray([[0.0], [1.0], [np.inf]]))


def test_encoder_mismatch_is_refused(tmp_path):
  _vector_store(tmp_path, encoder="minilm@1")
  with pytest.raises(store.StoreError,
                     match=rf"store {tmp_path}: manifest encoder is 'minilm@1'"):
    store.load_vectors(tmp_path, ["a"], encoder="other@2")


def test_missing_files_are_named(tmp_path):
  with pytest.raises(store.StoreError, match="no manifest.json"):
    store.load_vectors(tmp_path, ["a"])
  store.write_manifest(tmp_path, {"encoder": "e"})
  with pytest.raises(store.StoreError, match="no vectors.npy"):
    store.load_vectors(tmp_path, ["a"])
  (tmp_path / store.MANIFEST).write_text("{")
  with pytest.raises(store.StoreError, match="manifest.json: not valid JSON"):
    store.read_manifest(tmp_path)


def test_manifest_round_trip_and_check(tmp_path):
  store.write_manifest(tmp_path, {"source": "llm", "dim": 3})
  assert json.loads((tmp_path / store.MANIFEST).read_text())["dim"] == 3
  store.check_manifest(tmp_path, store.read_manifest(tmp_path), {"dim": 3})
  with pytest.raises(store.StoreError, match="manifest source is 'llm'"):
    store.check_manifest(tmp_path, store.read_manifest(tmp_path),
                         {"source": "raw"})
