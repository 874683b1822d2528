"""EmerG's GNN CTR backbone (Wang et al., KDD 2024), the fifth backbone.

A port of ``GNN`` in ``model/gnn.py`` of the public EmerG code
(LARS-research/EmerG).  For field embeddings E [F, d] of one row and a
feature-interaction graph G_l [F, F] per layer l = 1..L (L = 3):

    h_0 = E;   a_l = G_l @ E;   h_l = act(a_l) * h_{l-1}

(``act`` is LeakyReLU(0.01) except at the last layer, ``*`` elementwise), so
h_l carries field interactions up to order l + 1.  The L + 1 states, each
flattened to F * d, are mixed by one multi-head self-attention layer (3 heads,
scaled dot product, reshaped exactly as the reference does), summed over the
states and read out by the reference's attentional prediction:
``sum_f sigmoid(W2 flat(relu h))_f * (w1 . relu(h_f))``.  The module returns
logits (the reference returns probabilities).

Which graph is used (the item-embedding hook, ``item_emb``):

* ``None`` or ``[B, d]``: the global graphs G_l, learned parameters
  (the reference's ``basegraph`` mode, in which it pretrains);
* ``[B, d + L * F * F]``: the item-ID embedding followed by that row's item's
  own graphs (``item_input``): EmerG's item-specific graph.  ``backbones.score``
  passes it through unchanged, so every harness function that scores an item
  embedding scores an (embedding, graph) pair as well.

Deviations from the reference, each because the backbone here is pretrained
once and then frozen for every method (DESIGN §5):

* the item-graph mode uses the same message ``G_l @ E`` as the global mode;
  the reference's ``generategraph`` mode multiplies by an extra ``W_l``
  [d, d] per layer that pretraining never trains (its meta-training trains it,
  with every other backbone weight);
* no ``mask_test``: the reference zeroes the rows and columns of the last four
  fields of every generated graph (a MovieLens-1M field layout on a hard-coded
  ``cuda:0``), which cuts those fields out of message passing;
* sequence fields are sum-pooled over non-padding entries (the reference sums
  the padding row too), and ``count`` / ``time_stamp`` never exist here.

Initialisation: the global graphs start at U(-0.01, 0.01) as in the
reference's ``init()``, the dense layers at Flax's defaults (LeCun normal,
zero bias).  The reference draws every weight from U(-0.01, 0.01); through
the attention and read-out that makes the logit a product of four tiny
factors, and on the tiny test world pretraining then did not move the loss
from log 2 at all.  The shared field embedding keeps its N(0, 0.01^2).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from emerflow_jax.models import layers

KIND = "emerg_gnn"
GRAPH_PARAM = "graph"


def _uniform(scale: float = 0.01):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class SelfAttention(nn.Module):
  """The reference's ``MultiHeadSelfAttention`` (one layer, no dropout, no norm).

  Queries and keys are linear maps of the flattened states, values of each
  field's embedding; the reference then ``view``s them as
  [B * heads, T * F, d], which mixes heads and states in memory order.  Row-major
  ``reshape`` is the same operation, so the port is exact.

  Attributes:
    n_fields: F.
    dim: d (also the attention dimension).
    heads: number of heads (3 in the reference).
  """
  n_fields: int
  dim: int
  heads: int = 3

  @nn.compact
  def __call__(self, hs: jnp.ndarray) -> jnp.ndarray:
    """hs: [B, T, F * d] -> [B, T, F * d]."""
    b, t, _ = hs.shape
    f, d, k = self.n_fields, self.dim, self.heads
    q = nn.Dense(d * f * k, use_bias=False, name="W_q")(hs)
    key = nn.Dense(d * f * k, use_bias=False, name="W_k")(hs)
    v = nn.Dense(d * k, use_bias=False, name="W_v")(hs.reshape(b, t, f, d))
    q, key, v = (z.reshape(b * k, -1, d) for z in (q, key, v))
    att = jax.nn.softmax(q @ key.transpose(0, 2, 1) / jnp.sqrt(float(d)), axis=-1)
    out = (att @ v).reshape(b, t, f, k * d)
    out = nn.Dense(d, name="W_res")(out)
    return nn.relu(out.reshape(b, t, f * d))


class EmerGGNN(nn.Module):
  """EmerG's GNN over the shared field embedding.

  Attributes:
    vocab_sizes: (field key, vocab size) pairs; the order fixes the field stack.
    dim: embedding dimension (16 in the reference).
    gnn_layers: L, message-passing layers (3 in the reference).
    heads: attention heads (3 in the reference).
    kind: always "emerg_gnn" (the harness reads ``model.kind``).
  """
  vocab_sizes: Sequence[tuple[str, int]]
  dim: int = 16
  gnn_layers: int = 3
  heads: int = 3
  kind: str = KIND

  @property
  def n_fields(self) -> int:
    return len(self.vocab_sizes)

  @property
  def graph_size(self) -> int:
    """L * F * F: the width of one item's graphs in ``item_emb``."""
    return self.gnn_layers * self.n_fields * self.n_fields

  @nn.compact
  def __call__(self, x: dict[str, jnp.ndarray],
               item_emb: jnp.ndarray | None = None) -> jnp.ndarray:
    """Logits [B] of rows x (field -> [B] / [B, L]).

    Args:
      x: gathered field ids.
      item_emb: None, [B, d] (global graphs) or [B, d + L * F * F] (own graphs).

    Returns:
      [B] logits.
    """
    f, d, n_layers = self.n_fields, self.dim, self.gnn_layers
    id_emb, graph = split_item_input(self, item_emb)
    e = layers.FieldEmbedding(self.vocab_sizes, d, name="embed")(x, id_emb)
    b = e.shape[0]
    base = self.param(GRAPH_PARAM, _uniform(), (n_layers, f, f))
    if graph is None:
      graph = jnp.broadcast_to(base, (b, n_layers, f, f))
    h, states = e, [e]
    for l in range(n_layers):
      a = jnp.einsum("bfg,bgd->bfd", graph[:, l], e)
      if l != n_layers - 1:
        a = nn.leaky_relu(a, 0.01)
      h = a * h
      states.append(h)
    hs = jnp.stack(states, axis=1).reshape(b, n_layers + 1, f * d)
    out = SelfAttention(f, d, self.heads, name="attention")(hs).sum(axis=1)
    y = nn.relu(out.reshape(b, f, d))
    score = nn.Dense(1, use_bias=False, name="mlp1")(y)[..., 0]
    weight = nn.sigmoid(nn.Dense(f, use_bias=False, name="mlp2")(y.reshape(b, f * d)))
    return (weight * score).sum(axis=-1)


def split_item_input(model: EmerGGNN, item_emb: jnp.ndarray | None
                     ) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
  """(ID embedding [B, d] or None, graphs [B, L, F, F] or None) of ``item_emb``.

  Args:
    model: the EmerG GNN.
    item_emb: [B, d + L*F*F] representations, or None.

  Returns:
    (ID embeddings, graphs).
  """
  if item_emb is None:
    return None, None
  width, d = item_emb.shape[-1], model.dim
  if width == d:
    return item_emb, None
  if width != d + model.graph_size:
    raise ValueError(f"emerg_gnn: item_emb has width {width}; want {d} (ID "
                     f"embedding) or {d + model.graph_size} (+ L*F*F graph)")
  f = model.n_fields
  graph = item_emb[..., d:].reshape(item_emb.shape[:-1] + (model.gnn_layers, f, f))
  return item_emb[..., :d], graph


def item_input(id_emb: jnp.ndarray, graph: jnp.ndarray) -> jnp.ndarray:
  """The hook's input for items with their own graphs.

  Args:
    id_emb: S + [d] item-ID embeddings.
    graph: S + [L, F, F] their graphs.

  Returns:
    S + [d + L * F * F].
  """
  flat = graph.reshape(graph.shape[:-3] + (-1,))
  return jnp.concatenate([id_emb, flat], axis=-1)


def global_graph(params: Any) -> jnp.ndarray:
  """The pretrained global graphs [L, F, F]."""
  return params["params"][GRAPH_PARAM]


def make(vocab_sizes: Sequence[tuple[str, int]], dim: int = 16) -> EmerGGNN:
  """The backbone for ``backbones.make_backbone(KIND, ...)``.

  Args:
    vocab_sizes: (field, vocabulary size) per field.
    dim: embedding dimension d.

  Returns:
    The EmerG GNN module.
  """
  return EmerGGNN(vocab_sizes=tuple(vocab_sizes), dim=dim)
