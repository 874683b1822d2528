"""Per-phase refinement of emerging-item embeddings (backbone frozen).

Two rules, both applied to all items at once (vmapped over the item axis):

* ``finetune``: a few full-batch Adam steps on the item embeddings only, each
  item driven by its own phase rows.  This is the shared refinement every
  baseline ends in (the CVAR code base's warm-up, made batched).
* ``adapt_items``: EmerFlow's meta-learned rule ``rule.adapt`` (T steps of
  ``e <- e - alpha * grad``) vmapped over items.

Only item embeddings change.  warm_a starts from the cold embedding, warm_b and
warm_c continue from the previous phase's result (the caller threads it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import programs, tasks
from emerflow_jax.models import backbones, scoring


@functools.partial(jax.jit, static_argnames=("model", "steps", "lr"))
def finetune(model: backbones.Backbone, params: Any, tables: backbones.Tables,
             emb: jnp.ndarray, batch: dict[str, jnp.ndarray], steps: int,
             lr: float) -> jnp.ndarray:
  """Adam on the item embeddings only.

  Args:
    model, params, tables: the frozen backbone.
    emb: [n, d] current embeddings of n items.
    batch: Packed phase rows, each [n, K].
    steps: full-batch Adam steps.
    lr: Adam learning rate.

  Returns:
    [n, d] refined embeddings.
  """
  # The rows' forward pass up to the item embedding, once for all steps.
  batch = scoring.prepare(model, params, tables, {k: batch[k] for k in scoring.ROW_KEYS})

  def total(e):
    # Summing per-item losses gives each item exactly its own gradient.
    per_item = jax.vmap(scoring.item_loss, in_axes=(None, None, None, 0, 0))(
        model, params, tables, e, batch)
    return per_item.sum()

  tx = optax.adam(lr)

  def step(carry, _):
    e, opt = carry
    g = jax.grad(total)(e)
    upd, opt = tx.update(g, opt, e)
    return (optax.apply_updates(e, upd), opt), None

  (emb, _), _ = jax.lax.scan(step, (emb, tx.init(emb)), None, length=steps)
  return emb


def predict(model: backbones.Backbone, params: Any, tables: backbones.Tables,
            emb: jnp.ndarray, rows: tasks.Packed, owner: np.ndarray,
            chunk: int = 65536) -> np.ndarray:
  """Probabilities for flat test rows, each scored with its item's embedding.

  Args:
    emb: [n_items_in_set, d] embeddings.
    rows: flat Packed test rows [n_test].
    owner: [n_test] position of each row's item in ``emb``.

  Returns:
    [n_test] float64 probabilities.
  """
  fn = _predict_fn(model)
  out = []
  for s in range(0, len(owner), chunk):
    sl = slice(s, s + chunk)
    out.append(np.asarray(fn(params, tables, rows["users"][sl], rows["items"][sl],
                             emb[owner[sl]])))
  return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@programs.cached()
def _predict_fn(model: backbones.Backbone) -> Callable[..., jnp.ndarray]:
  def fn(params, tables, users, items, e):
    return jax.nn.sigmoid(backbones.score(model, params, tables, users, items, e))
  return jax.jit(fn)
