"""Tests for the backbone building blocks (field embedding, MLP, cross, FM)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax.models import layers

VOCAB = (("user/user_id", 5), ("item/item_id", 7), ("item/genres", 4))


def _params(module, x, seed=0, scale=0.5):
  """NumPy-drawn parameters with the module's shapes (nothing to compile)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def _batch():
  return {"user/user_id": jnp.asarray([1, 2, 4]),
          "item/item_id": jnp.asarray([3, 6, 1]),
          "item/genres": jnp.asarray([[1, 2, 0], [3, 0, 0], [0, 0, 0]])}


def test_field_embedding_looks_up_and_sum_pools_non_padding():
  emb = layers.FieldEmbedding(VOCAB, dim=3)
  x = _batch()
  p = _params(emb, x)
  out = np.asarray(emb.apply(p, x))
  t = {k: np.asarray(v) for k, v in p["params"].items()}
  assert out.shape == (3, 3, 3)  # [B, F, d] in VOCAB order
  np.testing.assert_allclose(out[:, 0], t["user_user_id"][[1, 2, 4]], rtol=1e-6)
  np.testing.assert_allclose(out[:, 1], t["item_item_id"][[3, 6, 1]], rtol=1e-6)
  g = t["item_genres"]
  np.testing.assert_allclose(out[0, 2], g[1] + g[2], rtol=1e-6)
  np.testing.assert_allclose(out[1, 2], g[3], rtol=1e-6)
  np.testing.assert_allclose(out[2, 2], 0.0)  # only padding: empty sum
  # The padding row 0 never contributes, whatever it holds.
  p2 = jax.tree.map(lambda a: a, p)
  p2["params"]["item_genres"] = p["params"]["item_genres"].at[0].set(100.0)
  np.testing.assert_array_equal(emb.apply(p2, x), out)


def test_field_embedding_item_override_replaces_only_the_item_slot():
  emb = layers.FieldEmbedding(VOCAB, dim=3)
  x = _batch()
  p = _params(emb, x)
  plain = np.asarray(emb.apply(p, x))
  new = jnp.arange(9.0).reshape(3, 3)
  over = np.asarray(emb.apply(p, x, item_emb=new))
  np.testing.assert_array_equal(over[:, 1], new)
  np.testing.assert_array_equal(np.delete(over, 1, axis=1), np.delete(plain, 1, axis=1))


def test_mlp_is_a_relu_stack():
  mlp = layers.MLP((4, 2))
  h = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  p = _params(mlp, h)
  out = np.asarray(mlp.apply(p, h))
  d0, d1 = p["params"]["Dense_0"], p["params"]["Dense_1"]
  ref = np.maximum(np.asarray(h) @ d0["kernel"] + d0["bias"], 0)
  ref = np.maximum(ref @ d1["kernel"] + d1["bias"], 0)
  assert out.shape == (5, 2)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_cross_network_matches_the_dcn_formula():
  cross = layers.CrossNetwork(n_layers=2)
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
  p = _params(cross, x0)["params"]
  out = np.asarray(cross.apply({"params": p}, x0))
  x0n = np.asarray(x0)
  x = x0n
  for i in range(2):
    w = np.asarray(p[f"w_{i}"]["kernel"])  # [6, 1]
    x = x0n * (x @ w) + np.asarray(p[f"b_{i}"]) + x
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_fields", [2, 5])
def test_fm_interaction_equals_the_pairwise_sum(n_fields):
  e = np.random.default_rng(n_fields).normal(size=(3, n_fields, 4))
  ref = sum(np.sum(e[:, i] * e[:, j], -1)
            for i, j in itertools.combinations(range(n_fields), 2))
  np.testing.assert_allclose(layers.fm_interaction(jnp.asarray(e, jnp.float32)),
                             ref, rtol=1e-4, atol=1e-5)
