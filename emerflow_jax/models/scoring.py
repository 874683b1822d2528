"""One item's rows scored with a candidate item embedding (backbone frozen).

The primitive every per-item rule differentiates: the shared fine-tuning
(``warmup.finetune``), EmerFlow's inner loop (``rule.adapt``) and the
baselines' one-step generators all score an item's rows with an embedding
``e`` [d] and take the masked BCE.  ``prepare`` does the item-embedding-free
part of the forward pass once, outside the loop that moves ``e``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from emerflow_jax.models import backbones


ROW_KEYS = ("users", "items", "labels", "mask")


def prepare(model: backbones.Backbone, params: Any, tables: backbones.Tables,
            rows: dict[str, jnp.ndarray]) -> dict[str, Any]:
  """``rows`` plus "prep": what their logits owe to everything but the item embedding.

  Only the item embedding changes in a warm-up or inner loop, so the rest of
  the rows' forward pass (``backbones.prepare_rows``) is computed once, before
  the loop; ``item_logits`` and ``item_loss`` then score prepared rows with the
  item-embedding-only scorer (exact for DeepFM, Wide&Deep and FM; the full
  forward pass for DCN).

  Args:
    rows: {"users", "items", "labels", "mask"}, each of one shape S ([R] or
      [n, R]).

  Returns:
    {"labels", "mask", "prep"} with S-shaped leaves in "prep" (+ a feature axis).
  """
  prep = backbones.prepare_rows(model, params, tables, rows["users"], rows["items"])
  return {"labels": rows["labels"], "mask": rows["mask"], "prep": prep}


def item_logits(model: backbones.Backbone, params: Any, tables: backbones.Tables,
                emb: jnp.ndarray, rows: dict[str, Any]) -> jnp.ndarray:
  """Logits [R] of one item's rows scored with embedding ``emb`` [d].

  ``rows`` are raw ({"users", "items", ...}) or ``prepare``d ({"prep", ...}).

  Args:
    model: the backbone module.
    params: its parameters.
    tables: its feature tables.
    emb: [d] the item embedding.
    rows: the item's rows, each [R] (raw or prepared).

  Returns:
    [R] logits.
  """
  if "prep" in rows:
    return backbones.score_prepared(model, params, tables, rows["prep"], emb)
  e = jnp.broadcast_to(emb, rows["users"].shape + emb.shape)
  return backbones.score(model, params, tables, rows["users"], rows["items"], e)


def item_loss(model: backbones.Backbone, params: Any, tables: backbones.Tables,
              emb: jnp.ndarray, rows: dict[str, jnp.ndarray]) -> jnp.ndarray:
  """Masked mean BCE of one item's rows with embedding ``emb``.

  Args:
    emb: [d] the item's embedding.
    rows: {"users", "items", "labels", "mask"} each [R], or ``prepare``d rows.

  Returns:
    scalar loss.
  """
  logits = item_logits(model, params, tables, emb, rows)
  return backbones.bce_loss(logits, rows["labels"], rows["mask"])
