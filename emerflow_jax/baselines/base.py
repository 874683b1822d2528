"""``base``: a fresh random item embedding, then per-phase fine-tuning.

The cold embedding is drawn like the backbone's own embedding initialiser
(normal, std 0.01), so a cold item looks like an untrained ID to the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import methods


class Base(methods.Method):
  name = "base"

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Implements ``methods.Method.cold``: a fresh N(0, 0.01^2) embedding per item.

    Args:
      ctx: the run's context (its key and embedding width d).
      state: unused (``fit`` returns None).
      items: [n] item ids; only their number is read.

    Returns:
      [n, d] random embeddings, drawn from ``ctx.key`` folded with n.
    """
    key = jax.random.fold_in(ctx.key, len(items))
    return 0.01 * jax.random.normal(key, (len(items), ctx.dim))
