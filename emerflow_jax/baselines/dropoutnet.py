"""DropoutNet (Volkovs et al., NeurIPS 2017), as in the CVAR code base.

The method lives in pretraining: with probability ``rate`` a minibatch's
item-ID embeddings are replaced by their mean (``pretrain.make_epoch_fn``), so
the backbone learns to score from the side fields when the ID embedding says
nothing.  A new item's cold embedding is therefore that same mean, and the
phases then use the shared fine-tuning.

The rate comes from ``config.dropoutnet.rate`` through the plan: the
harness pretrains the main backbone with that item dropout (its cache key
includes the rate), so the backbone ``fit`` sees is always the right one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import methods
from emerflow_jax.models import backbones


def row_weighted_mean(ctx: methods.Context) -> jnp.ndarray:
  """[d] mean ID embedding over the old-item rows.

  Pretraining replaces a batch by the mean over the batch's rows, so its
  expectation weights each old item by its row count; this is the embedding the
  dropout taught the backbone to handle.
  """
  table = backbones.item_embedding_table(ctx.params)
  items = ctx.ds.items[ctx.split.base_rows]
  counts = np.bincount(items, minlength=ctx.ds.n_items).astype(np.float32)
  ids = backbones.item_ids(ctx.tables, np.arange(ctx.ds.n_items))
  emb = jnp.take(table, ids, axis=0)
  return (jnp.asarray(counts)[:, None] * emb).sum(0) / counts.sum()


class DropoutNet(methods.Method):
  """Item-embedding dropout in pretraining; the mean embedding when cold."""
  name = "dropoutnet"

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    """Pretrains main with ``dropoutnet.rate`` item dropout."""
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    rate = float(config.dropoutnet.rate)
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"dropoutnet.rate must be in [0, 1), got {rate}")
    return methods.Plan(
        backbones=(methods.BackboneSpec(item_dropout=rate),), sections=("dropoutnet",),
        search_space=dict(methods.warmup_space(),
                          **{"dropoutnet.rate": space.Float(0.0, 0.5)}))

  def fit(self, ctx: methods.Context) -> Any:
    return {"mean": row_weighted_mean(ctx)}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Implements ``methods.Method.cold``: every item gets the mean ID embedding.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned ({"mean": [d]}).
      items: [n] item ids; only their number is read.

    Returns:
      [n, d] copies of the row-weighted mean old-item embedding.
    """
    return jnp.broadcast_to(state["mean"], (len(items), ctx.dim))
