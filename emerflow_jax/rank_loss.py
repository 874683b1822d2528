"""Pooled pairwise ranking losses: a smooth 1 - AUC over the rows of a batch.

The protocol scores emerging items by the AUC of their pooled test rows, so
EmerFlow's outer loss (``meta.batch_loss`` with ``outer_loss="auc"``) can be
the pairwise logistic loss over every (positive, negative) pair of the
pooled query rows (``pairwise_auc_loss``, quadratic in the rows, blocked to
bound memory), or an unbiased estimate of it over sampled partners
(``sampled_pairwise_auc_loss`` = ``draw_auc_pairs`` + ``paired_auc_loss``,
linear in the rows).  Pure jnp; every function takes flattened or any-shaped
logits, labels and masks of one shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pairwise_auc_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                      mask: jnp.ndarray, block: int = 2048) -> jnp.ndarray:
  """Mean of softplus(s_neg - s_pos) over all (positive, negative) row pairs.

  A smooth upper bound on the share of mis-ordered pairs (1 - AUC) of the
  pooled rows; rows with mask 0 take part in no pair.  With n rows the pair
  matrix is n x n: above ``block`` rows it is summed ``block`` rows at a time
  under ``jax.checkpoint``, so memory stays O(block * n) in the forward and
  the backward pass (4,096 tasks x 40 query rows would otherwise need
  hundreds of GB).

  Args:
    logits, labels, mask: any shape, same for all three (flattened).
    block: rows per block of the pair matrix (static).

  Returns:
    scalar loss (0 when there is no pair).
  """
  s, y, m = logits.reshape(-1), labels.reshape(-1), mask.reshape(-1)
  pos, neg = y * m, (1.0 - y) * m
  n_pairs = jnp.maximum(pos.sum() * neg.sum(), 1.0)

  def block_sum(s_b, pos_b):
    return (pos_b[:, None] * neg[None, :] * jax.nn.softplus(s[None, :] - s_b[:, None])).sum()

  n = s.shape[0]
  if n <= block:
    return block_sum(s, pos) / n_pairs
  pad = -n % block
  s_b = jnp.pad(s, (0, pad)).reshape(-1, block)
  pos_b = jnp.pad(pos, (0, pad)).reshape(-1, block)  # padded rows are no positive
  sums = jax.lax.map(lambda a: jax.checkpoint(block_sum)(*a), (s_b, pos_b))
  return sums.sum() / n_pairs


def sampled_pairwise_auc_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                              mask: jnp.ndarray, key: jax.Array,
                              pairs: int) -> jnp.ndarray:
  """An unbiased, near-linear-cost estimate of ``pairwise_auc_loss``.

  The exact loss is (1 / PN) sum over positives i and negatives j of
  f(s_j - s_i), f = softplus, i.e. both ``E_i E_j f`` and ``E_j E_i f`` with i
  uniform over the P positives and j over the N negatives.  Each positive row
  draws ``pairs`` negatives and each negative row ``pairs`` positives
  (uniformly, with replacement, among the masked-in rows); the estimate
  averages the two halves.  The draws depend on labels and mask only, never
  on the scores, so the expected value *and gradient* (w.r.t. the scores)
  equal the exact ones, at O(n log n + n * pairs) cost instead of O(n^2).

  Args:
    logits, labels, mask: any shape, same for all three (flattened).
    key: PRNG key of the draws.
    pairs: partners drawn per row (static).

  Returns:
    scalar estimate (0 when there is no pair).
  """
  return paired_auc_loss(logits, labels, mask,
                         draw_auc_pairs(labels, mask, key, pairs))


def draw_auc_pairs(labels: jnp.ndarray, mask: jnp.ndarray, key: jax.Array,
                   pairs: int) -> jnp.ndarray:
  """Partners of ``sampled_pairwise_auc_loss``: [n, pairs] row indices.

  Row i draws ``pairs`` rows of the other class, uniformly with replacement
  among the masked-in rows (a row with no partner class draws a masked row,
  which ``paired_auc_loss`` weighs 0).  Depends on labels and mask only.

  Args:
    labels: [n] 0/1 labels.
    mask: [n] 1 for real rows.
    key: PRNG key.
    pairs: partners per row.

  Returns:
    [n, pairs] partner row indices.
  """
  y, m = labels.reshape(-1), mask.reshape(-1)
  pos, neg = y * m, (1.0 - y) * m
  n = y.shape[0]
  u = jax.random.uniform(key, (n, pairs))

  def draw(weights):
    # One stable sort puts the class's rows first; a uniform position among
    # the first ``count`` picks one of them (weight-0 rows are never drawn).
    members = jnp.argsort(-weights, stable=True)
    at = jnp.minimum(jnp.floor(u * weights.sum()).astype(jnp.int32), n - 1)
    return members[at]

  return jnp.where((pos > 0)[:, None], draw(neg), draw(pos)).astype(jnp.int32)


def paired_auc_loss(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray,
                    partner: jnp.ndarray) -> jnp.ndarray:
  """The pairwise logistic loss over given pairs (``draw_auc_pairs``).

  Args:
    logits, labels, mask: any shape, same for all three (flattened to [n]).
    partner: [n, m] partner of each row.

  Returns:
    0.5 * (mean over positives of their partners' mean softplus(s_j - s_i)
    + the same over negatives): the exact pooled loss in expectation.
  """
  s, y, m = logits.reshape(-1), labels.reshape(-1), mask.reshape(-1)
  pos, neg = y * m, (1.0 - y) * m
  is_pos = (pos > 0)[:, None]
  s_pos = jnp.where(is_pos, s[:, None], s[partner])
  s_neg = jnp.where(is_pos, s[partner], s[:, None])
  w = (pos[:, None] * neg[partner] / jnp.maximum(pos.sum(), 1.0)
       + neg[:, None] * pos[partner] / jnp.maximum(neg.sum(), 1.0))
  return 0.5 * (w * jax.nn.softplus(s_neg - s_pos)).sum() / partner.shape[1]
