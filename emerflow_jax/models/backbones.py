"""CTR backbones (DeepFM, Wide&Deep, FM, DCN) and the pure scoring functions.

Every backbone is a Linen module applied as a pure function::

    logits = model.apply(params, x, item_emb=None)      # x: field -> [B] / [B, L]

and everything downstream goes through ``score``/``bce_loss``, which gather the
fields of (user, item) index arrays of any leading shape from device-resident
feature tables.  ``item_emb`` replaces the item-ID embedding: it is how every
method (EmerFlow, base, the baselines) injects an emerging item's embedding.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.models import layers

Tables = dict[str, jnp.ndarray]
ITEM_ID = "item/item_id"
ITEM_ID_PARAM = "item_item_id"


class Backbone(nn.Module):
  """One of the four CTR backbones over a shared field embedding.

  Attributes:
    kind: "deepfm", "widedeep", "fm" or "dcn".
    vocab_sizes: (field key, vocab size) pairs; the order fixes the field stack.
    dim: embedding dimension (16 in DESIGN §6).
    mlp: hidden sizes of the deep part ((16, 16) in DESIGN §6).
    cross_layers: DCN cross layers.
  """
  kind: str
  vocab_sizes: Sequence[tuple[str, int]]
  dim: int = 16
  mlp: Sequence[int] = (16, 16)
  cross_layers: int = 2

  @nn.compact
  def __call__(self, x: dict[str, jnp.ndarray],
               item_emb: jnp.ndarray | None = None) -> jnp.ndarray:
    e = layers.FieldEmbedding(self.vocab_sizes, self.dim, name="embed")(x, item_emb)
    flat = e.reshape(e.shape[0], -1)
    if self.kind == "dcn":
      cross = layers.CrossNetwork(self.cross_layers, name="cross")(flat)
      deep = layers.MLP(self.mlp, name="mlp")(flat)
      return nn.Dense(1, name="out")(jnp.concatenate([cross, deep], -1))[:, 0]
    # The first-order ("wide") term is linear in the field embeddings, so an
    # overridden item embedding reaches it too.
    linear = nn.Dense(1, name="linear")(flat)[:, 0]
    if self.kind == "fm":
      return linear + layers.fm_interaction(e)
    if self.kind == "deepfm":
      deep = nn.Dense(1, name="deep_out")(layers.MLP(self.mlp, name="mlp")(flat))
      return linear + layers.fm_interaction(e) + deep[:, 0]
    if self.kind == "widedeep":
      deep = nn.Dense(1, name="deep_out")(layers.MLP(self.mlp, name="mlp")(flat))
      return linear + deep[:, 0]
    raise ValueError(f"unknown backbone {self.kind!r}")


def make_backbone(kind: str, ds: dataset_lib.Dataset, dim: int = 16,
                  mlp: Sequence[int] = (16, 16), cross_layers: int = 2) -> Backbone:
  """Builds the backbone for a dataset's fields (user fields first, then item).

  Args:
    kind: "deepfm", "widedeep", "dcn", "fm" or "emerg_gnn".
    ds: the dataset (its fields).
    dim: embedding dimension d.
    mlp: hidden sizes of the deep part.
    cross_layers: DCN cross layers.

  Returns:
    The backbone module.
  """
  keys = [f"user/{f}" for f in ds.user_fields] + [f"item/{f}" for f in ds.item_fields]
  vocab = tuple((k, ds.vocab_sizes[k]) for k in keys)
  if kind == "emerg_gnn":  # EmerG's GNN (models/emerg_gnn.py); mlp/cross unused
    from emerflow_jax.models import emerg_gnn  # pylint: disable=g-import-not-at-top
    return emerg_gnn.make(vocab, dim)
  return Backbone(kind=kind, vocab_sizes=vocab, dim=dim, mlp=tuple(mlp),
                  cross_layers=cross_layers)


def make_tables(ds: dataset_lib.Dataset) -> Tables:
  """Feature tables as device arrays, keyed like the backbone's fields."""
  out = {f"user/{f}": jnp.asarray(t) for f, t in ds.user_fields.items()}
  out.update({f"item/{f}": jnp.asarray(t) for f, t in ds.item_fields.items()})
  return out


def gather_inputs(tables: Tables, users: jnp.ndarray,
                  items: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """Looks up every field for [B] user and item indices.

  Args:
    tables: the feature tables.
    users: [B] user indices.
    items: [B] item indices.

  Returns:
    field name -> [B, width] codes.
  """
  return {k: jnp.take(t, users if k.startswith("user/") else items, axis=0)
          for k, t in tables.items()}


def init_params(model: Backbone, tables: Tables, key: jax.Array) -> Any:
  """Initialises backbone parameters from a dummy batch of two rows.

  Args:
    model: the backbone.
    tables: its feature tables.
    key: PRNG key.

  Returns:
    The parameters.
  """
  idx = jnp.zeros((2,), jnp.int32)
  return model.init(key, gather_inputs(tables, idx, idx))


def score(model: Backbone, params: Any, tables: Tables, users: jnp.ndarray,
          items: jnp.ndarray, item_emb: jnp.ndarray | None = None) -> jnp.ndarray:
  """Logits for (user, item) pairs of any leading shape S.

  Args:
    model: the backbone.
    params: its parameters.
    tables: feature tables.
    users: S int user indices.
    items: S int item indices.
    item_emb: optional S + [d] item embeddings overriding the item-ID table.

  Returns:
    S logits.
  """
  shape = users.shape
  x = gather_inputs(tables, users.reshape(-1), items.reshape(-1))
  if item_emb is not None:
    item_emb = item_emb.reshape(-1, item_emb.shape[-1])
  return model.apply(params, x, item_emb=item_emb).reshape(shape)


# Backbones whose logits are exactly ``c + u . e + deep(pre + W e)`` in the item
# embedding e: everything else in a row's forward pass can be computed once.
PARTIAL_KINDS = ("deepfm", "widedeep", "fm")


def prepare_rows(model: Backbone, params: Any, tables: Tables, users: jnp.ndarray,
                 items: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """The part of the rows' logits that does not depend on the item embedding.

  An inner loop changes only the item embedding e, so for DeepFM, Wide&Deep
  and FM everything else (the other fields' embeddings, the FM and wide terms
  they give, the first MLP layer's other inputs) is computed here once:

    logit(e) = bias + lin . e + deep(relu(pre + W1_item e))

  where the FM term 0.5 sum[(S + e)^2 - Q - e^2] = 0.5 sum[S^2 - Q] + S . e
  (S, Q: sum and sum of squares of the other fields' embeddings) is linear in
  e.  DCN's cross layers are not (x0 holds e), so it keeps the rows and
  ``score_prepared`` runs the full forward pass.

  Args:
    model: the backbone.
    params: its parameters.
    tables: feature tables.
    users: S int user indices.
    items: S int item indices.

  Returns:
    {"bias": S, "lin": S + [d], "pre": S + [H1] (deep kinds)} for
    ``PARTIAL_KINDS``; {"users", "items"} (S) otherwise.
  """
  if model.kind not in PARTIAL_KINDS:
    return {"users": users, "items": items}
  shape, d = users.shape, model.dim
  x = gather_inputs(tables, users.reshape(-1), items.reshape(-1))
  zero = jnp.zeros((users.size, d), jnp.float32)
  p = params["params"]
  e = layers.FieldEmbedding(model.vocab_sizes, d).apply({"params": p["embed"]}, x, zero)
  flat = e.reshape(e.shape[0], -1)  # the item slot holds zeros
  lo, hi = _item_slot(model)
  w_lin = p["linear"]["kernel"][:, 0]
  bias = flat @ w_lin + p["linear"]["bias"][0]
  lin = jnp.broadcast_to(w_lin[lo:hi], flat.shape[:1] + (d,))
  if model.kind in ("deepfm", "fm"):
    s = e.sum(axis=1)
    bias = bias + 0.5 * (s * s - (e * e).sum(axis=1)).sum(axis=-1)
    lin = lin + s
  out = {"bias": bias.reshape(shape), "lin": lin.reshape(shape + (d,))}
  if model.kind != "fm":
    first = p["mlp"]["Dense_0"]
    pre = flat @ first["kernel"] + first["bias"]
    out["pre"] = pre.reshape(shape + pre.shape[-1:])
  return out


def score_prepared(model: Backbone, params: Any, tables: Tables,
                   prepared: dict[str, jnp.ndarray], item_emb: jnp.ndarray) -> jnp.ndarray:
  """Logits of prepared rows (``prepare_rows``) with item embeddings ``item_emb``.

  Args:
    model, params, tables: the backbone (tables are read by the fallback only).
    prepared: ``prepare_rows`` of S rows.
    item_emb: S + [d] item embeddings, or [d] for all rows.

  Returns:
    S logits, equal to ``score(..., item_emb)`` up to float rounding.
  """
  if "users" in prepared:
    users = prepared["users"]
    e = jnp.broadcast_to(item_emb, users.shape + (model.dim,))
    return score(model, params, tables, users, prepared["items"], e)
  p = params["params"]
  out = prepared["bias"] + (prepared["lin"] * item_emb).sum(axis=-1)
  if "pre" not in prepared:
    return out
  lo, hi = _item_slot(model)
  h = jax.nn.relu(prepared["pre"] + item_emb @ p["mlp"]["Dense_0"]["kernel"][lo:hi])
  for i in range(1, len(model.mlp)):
    dense = p["mlp"][f"Dense_{i}"]
    h = jax.nn.relu(h @ dense["kernel"] + dense["bias"])
  return out + (h @ p["deep_out"]["kernel"])[..., 0] + p["deep_out"]["bias"][0]


def _item_slot(model: Backbone) -> tuple[int, int]:
  """Columns of the item-ID embedding in the flattened [F * d] field stack."""
  j = [k for k, _ in model.vocab_sizes].index(ITEM_ID)
  return j * model.dim, (j + 1) * model.dim


def bce_loss(logits: jnp.ndarray, labels: jnp.ndarray,
             mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean binary cross-entropy over the rows where mask is 1.

  Args:
    logits: [...] logits.
    labels: [...] 0/1 labels.
    mask: [...] 1 for real rows, or None.

  Returns:
    [] the mean loss.
  """
  per_row = optax.sigmoid_binary_cross_entropy(logits, labels)
  if mask is None:
    return per_row.mean()
  mask = mask.astype(per_row.dtype)
  return (per_row * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def item_embedding_table(params: Any) -> jnp.ndarray:
  """The pretrained item-ID embedding table [n_items + 1, d] (row 0 = padding)."""
  return params["params"]["embed"][ITEM_ID_PARAM]


def item_ids(tables: Tables, items: np.ndarray | jnp.ndarray) -> jnp.ndarray:
  """Item-ID codes (rows of the item embedding table) of item indices.

  Args:
    tables: the feature tables.
    items: item indices of any shape.

  Returns:
    Their item-ID codes, of the same shape.
  """
  return jnp.take(tables[ITEM_ID], items, axis=0)
