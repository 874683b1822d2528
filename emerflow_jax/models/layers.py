"""Building blocks shared by the backbones: field embeddings, MLP, cross layers."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class FieldEmbedding(nn.Module):
  """Embeds every field of a batch into a [B, F, d] stack.

  Categorical fields ``[B]`` look up one row; sequence fields ``[B, L]`` are
  sum-pooled over their non-zero (non-padding) entries, as in the CVAR/EmerG
  MovieLens preprocessing.  The ``item/item_id`` slot can be overridden by a
  given ``[B, d]`` embedding: that is the single hook every warm-up method uses.

  Attributes:
    vocab_sizes: (field key, vocabulary size) pairs, in a fixed order.
    dim: embedding dimension d.
  """
  vocab_sizes: Sequence[tuple[str, int]]
  dim: int = 16

  @nn.compact
  def __call__(self, x: dict[str, jnp.ndarray],
               item_emb: jnp.ndarray | None = None) -> jnp.ndarray:
    init = nn.initializers.normal(stddev=0.01)
    out = []
    for key, size in self.vocab_sizes:
      table = self.param(key.replace("/", "_"), init, (size, self.dim))
      if key == "item/item_id" and item_emb is not None:
        out.append(item_emb)
        continue
      ids = x[key]
      if ids.ndim == 2:  # sequence field: masked sum-pooling
        vecs = jnp.take(table, ids, axis=0) * (ids > 0)[..., None]
        out.append(vecs.sum(axis=1))
      else:
        out.append(jnp.take(table, ids, axis=0))
    return jnp.stack(out, axis=1)


class MLP(nn.Module):
  """ReLU MLP with the given hidden sizes."""
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    return h


class CrossNetwork(nn.Module):
  """DCN cross layers: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l."""
  n_layers: int = 2

  @nn.compact
  def __call__(self, x0: jnp.ndarray) -> jnp.ndarray:
    x = x0
    for i in range(self.n_layers):
      w = nn.Dense(1, use_bias=False, name=f"w_{i}")(x)
      b = self.param(f"b_{i}", nn.initializers.zeros, (x0.shape[-1],))
      x = x0 * w + b + x
    return x


def fm_interaction(e: jnp.ndarray) -> jnp.ndarray:
  """Second-order FM term 0.5 * sum_d[(sum_f e)^2 - sum_f e^2]: [B, F, d] -> [B]."""
  s = e.sum(axis=1)
  return 0.5 * (s * s - (e * e).sum(axis=1)).sum(axis=-1)
