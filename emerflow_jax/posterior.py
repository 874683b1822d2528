"""Content-based regeneration after a warm phase: every new item's rows inform the prior.

After phase p each new item has an embedding adapted from its own K rows.
Alone those are noisy; together with the old items they are also many more
(text, embedding) pairs than the old items alone.  CVAR exploits this by
re-training its content generator on the warm rows; here the same idea is a
closed form: a ridge map from text r to embedding, fitted on the old items'
pretrained embeddings *and* the new items' adapted ones, predicts each new
item **leave-one-out** (from every other item, never from itself), and the
item keeps a share ``keep_p`` of its own adapted embedding::

    e_i <- keep_p * e_i + (1 - keep_p) * ridge_{-i}(r_i)

Leave-one-out predictions of ridge come from one fit through the hat matrix
(``loo_ridge``), so the step costs one [D, D] solve per phase.  Only rows the
protocol has revealed (the phases so far) enter; the test rows never do.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAMBDAS = (1.0, 10.0, 100.0, 1e3, 1e4)


@jax.jit
def loo_ridge(r: jnp.ndarray, e: jnp.ndarray, lam: jnp.ndarray) -> jnp.ndarray:
  """Leave-one-out predictions of a ridge map r -> e with an intercept.

  Args:
    r: [n, D] inputs.
    e: [n, d] targets.
    lam: [] ridge penalty (the intercept is not penalised).

  Returns:
    [n, d]: row i predicted by the map fitted on every row but i.
  """
  n = r.shape[0]
  mu_r, mu_e = r.mean(0), e.mean(0)
  rc, ec = r - mu_r, e - mu_e
  gram = rc.T @ rc + lam * jnp.eye(r.shape[1], dtype=r.dtype)
  inv_rt = jnp.linalg.solve(gram, rc.T)            # [D, n]
  pred = rc @ (inv_rt @ ec) + mu_e
  # Leverage of row i: its ridge part plus the intercept's 1/n (centred inputs).
  h = jnp.sum(rc * inv_rt.T, axis=1) + 1.0 / n
  return (pred - h[:, None] * e) / (1.0 - h)[:, None]


def choose_lambda(r: np.ndarray, e: np.ndarray, lambdas: Sequence[float] = LAMBDAS
                  ) -> float:
  """The penalty with the smallest leave-one-out squared error on (r, e).

  Args:
    r: [n, D] old items' text vectors.
    e: [n, d] their pretrained embeddings.
    lambdas: candidates.

  Returns:
    The chosen penalty.
  """
  r, e = jnp.asarray(r), jnp.asarray(e)
  errs = [float(jnp.mean((loo_ridge(r, e, jnp.asarray(lam, r.dtype)) - e) ** 2))
          for lam in lambdas]
  return float(lambdas[int(np.argmin(errs))])


def regenerate(r_old: jnp.ndarray, e_old: jnp.ndarray, r_new: jnp.ndarray,
               e_new: jnp.ndarray, lam: float, keep: float) -> jnp.ndarray:
  """Blends each new item's embedding with its leave-one-out content prediction.

  Args:
    r_old: [m, D] old items' text vectors.
    e_old: [m, d] their (frozen) embeddings.
    r_new: [n, D] the new items' text vectors.
    e_new: [n, d] their embeddings after the phase.
    lam: ridge penalty.
    keep: share of the item's own embedding kept (1 = no regeneration).

  Returns:
    [n, d] blended embeddings.
  """
  if keep >= 1.0:
    return e_new
  r = jnp.concatenate([r_old, r_new], 0)
  e = jnp.concatenate([e_old, e_new], 0)
  loo = loo_ridge(r, e, jnp.asarray(lam, r.dtype))[r_old.shape[0]:]
  return keep * e_new + (1.0 - keep) * loo
