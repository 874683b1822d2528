"""A cold prior that knows how much to trust itself (``align.shrink``).

The aligned embedding g of an item is pulled toward the old-item mean c by an
item-dependent factor s in [0, 1]::

    e_0 = c + s(r, g) * (g - c)

- ``none``: s = 1, the map as is;
- ``global``: one s, the least-squares shrink of out-of-fold predictions of
  old items toward c (James-Stein in spirit: the fraction of the predicted
  deviation that held-out items bear out), clipped to [0, 1];
- ``gate``: s = sigmoid(b + w . f) on three features of the item, fit on the
  same out-of-fold predictions: how close its text is to old items' (mean
  top-k cosine), how much its text neighbours' embeddings disagree, and how far
  g moves from c.

Both are fit only on predictions the map made for items it never saw, so
where the text says nothing (held-out predictions uncorrelated with the
targets) s goes to 0 and the prior is the mean embedding, which is what base
and DropoutNet-like priors give an unseen item.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHRINKS = ("none", "global", "gate")


def unit(x: jnp.ndarray) -> jnp.ndarray:
  """Rows of x [..., D] scaled to unit norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k_mask(sims: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """[..., n] bool, True at each row's k largest entries (ties kept).

  ``k`` may be a traced scalar (a float leaf of a params pytree), so the
  threshold is read from the sorted row instead of ``lax.top_k``.

  Args:
    sims: [..., n] scores.
    k: [] how many to keep (may be traced).

  Returns:
    [..., n] bool mask.
  """
  n = sims.shape[-1]
  k = jnp.clip(jax.lax.stop_gradient(k).astype(jnp.int32), 1, n)
  kth = jnp.take(jnp.sort(sims, axis=-1), n - k, axis=-1)
  return sims >= kth[..., None]


def global_factor(g: jnp.ndarray, e: jnp.ndarray, center: jnp.ndarray) -> jnp.ndarray:
  """argmin_s sum_i ||c + s (g_i - c) - e_i||^2, clipped to [0, 1].

  Args:
    g: [n, d] out-of-fold predictions; e: [n, d] targets; center: [d].

  Returns:
    Scalar s.
  """
  dg, de = g - center, e - center
  return jnp.clip(jnp.sum(dg * de) / jnp.maximum(jnp.sum(dg * dg), 1e-12), 0.0, 1.0)


def features(r_ref: jnp.ndarray, e_ref: jnp.ndarray, r: jnp.ndarray, g: jnp.ndarray,
             center: jnp.ndarray, scale: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """The gate's inputs for items (r, g) against reference old items.

  Args:
    r_ref: [n, D] reference inputs; e_ref: [n, d] their embeddings.
    r: [..., D] the items' inputs; g: [..., d] their aligned embeddings.
    center: [d] the old-item mean; scale: scalar mean ||e - c||^2.
    k: neighbours (scalar).

  Returns:
    [..., 3]: mean top-k cosine to the references, the neighbours' embedding
    spread / scale, ||g - c||^2 / scale.
  """
  sims = unit(r) @ unit(r_ref).T  # [..., n]
  near = top_k_mask(sims, k).astype(sims.dtype)
  cnt = near.sum(-1)
  close = (sims * near).sum(-1) / cnt
  mu = (near @ e_ref) / cnt[..., None]  # [..., d]
  sq = jnp.sum(e_ref ** 2, -1)  # ||e_j - mu||^2 = ||e_j||^2 - 2 e_j.mu + ||mu||^2
  spread = (near @ sq - 2 * jnp.sum((near @ e_ref) * mu, -1)) / cnt + jnp.sum(mu ** 2, -1)
  move = jnp.sum((g - center) ** 2, -1)
  return jnp.stack([close, spread / scale, move / scale], -1)


def gate_factor(theta: dict[str, jnp.ndarray], f: jnp.ndarray) -> jnp.ndarray:
  """s = sigmoid(b + w . (f - f_mu) / f_sd): [..., 3] features -> [...].

  Args:
    theta: {"b", "w", "f_mu", "f_sd"} of the gate.
    f: [..., 3] per-item features.

  Returns:
    [...] shrink factors in (0, 1).
  """
  z = (f - theta["f_mu"]) / theta["f_sd"]
  return jax.nn.sigmoid(theta["b"] + z @ theta["w"])


def gate_loss(theta: dict[str, jnp.ndarray], f: jnp.ndarray, g: jnp.ndarray,
              e: jnp.ndarray, center: jnp.ndarray, scale: jnp.ndarray,
              l2: float) -> jnp.ndarray:
  """Mean ||c + s_i (g_i - c) - e_i||^2 / scale + l2 ||w||^2 over [n] items.

  Args:
    theta: the gate's parameters.
    f: [n, 3] features.
    g: [n, d] aligned embeddings.
    e: [n, d] target embeddings.
    center: [d] old-item mean c.
    scale: [] normaliser of the squared error.
    l2: penalty on w.

  Returns:
    [] the loss.
  """
  s = gate_factor(theta, f)[:, None]
  err = jnp.sum((center + s * (g - center) - e) ** 2, -1)
  return jnp.mean(err) / scale + l2 * jnp.sum(theta["w"] ** 2)


def fit_gate(f: jnp.ndarray, g: jnp.ndarray, e: jnp.ndarray, center: jnp.ndarray,
             scale: jnp.ndarray, s0: jnp.ndarray, steps: int = 300, lr: float = 0.05,
             l2: float = 1e-2) -> dict[str, jnp.ndarray]:
  """Adam on ``gate_loss`` from the global shrink s0 (w = 0): the gate's theta.

  Args:
    f: [n, 3] features.
    g: [n, d] aligned embeddings.
    e: [n, d] target embeddings.
    center: [d] old-item mean.
    scale: [] normaliser of the squared error.
    s0: [] the global shrink to start from.
    steps: Adam steps.
    lr: learning rate.
    l2: penalty on w.

  Returns:
    The gate's theta.
  """
  s0 = jnp.clip(s0, 0.02, 0.98)
  theta = {"w": jnp.zeros(f.shape[-1], jnp.float32), "b": jnp.log(s0 / (1 - s0)),
           "f_mu": f.mean(0), "f_sd": f.std(0) + 1e-6}
  learned = {"w": theta["w"], "b": theta["b"]}
  tx = optax.adam(lr)
  loss = lambda p: gate_loss(dict(theta, **p), f, g, e, center, scale, l2)

  def step(carry, _):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (learned, _), _ = jax.lax.scan(step, (learned, tx.init(learned)), None, length=int(steps))
  return dict(theta, **learned)


def fit(kind: str, r: jnp.ndarray, e: jnp.ndarray, oof: jnp.ndarray, fold: np.ndarray,
        k: int = 10) -> dict[str, Any]:
  """The prior's params from out-of-fold predictions of old items.

  Args:
    kind: global|gate.
    r: [n, D] old items' inputs; e: [n, d] their embeddings.
    oof: [n, d] each item's prediction by a map fit on the other folds.
    fold: [n] the folds ``oof`` was made with (the gate's neighbour features
      of an item are taken against the other folds, as for an emerging item).
    k: the gate's neighbours.

  Returns:
    {"center", "s"} (global) or {"center", "scale", "k", "r_ref", "e_ref",
    "theta"} (gate).
  """
  r, e, oof = (jnp.asarray(x, jnp.float32) for x in (r, e, oof))
  center = e.mean(0)
  s0 = global_factor(oof, e, center)
  if kind == "global":
    return {"center": center, "s": s0}
  if kind != "gate":
    raise ValueError(f"align.shrink must be one of {SHRINKS}, got {kind!r}")
  scale = jnp.mean(jnp.sum((e - center) ** 2, -1))
  kk = jnp.asarray(k, jnp.float32)
  f = jnp.zeros((r.shape[0], 3), jnp.float32)
  for j in np.unique(fold):
    te = fold == j
    f = f.at[te].set(features(r[~te], e[~te], r[te], oof[te], center, scale, kk))
  theta = fit_gate(f, oof, e, center, scale, s0)
  # Held-out predictions that do not point toward the targets at all: trust none.
  theta["b"] = jnp.where(s0 > 0, theta["b"], -jnp.inf)
  return {"center": center, "scale": scale, "k": kk, "r_ref": r, "e_ref": e,
          "theta": theta}


def factor(params: dict[str, Any], r: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
  """The shrink s of items r [..., D] with aligned embeddings g [..., d]: [...].

  Args:
    params: the prior's params (global or gate).
    r: [..., D] text vectors.
    g: [..., d] aligned embeddings.

  Returns:
    [...] shrink factors s.
  """
  if "s" in params:
    return jnp.broadcast_to(params["s"], g.shape[:-1])
  f = features(params["r_ref"], params["e_ref"], r, g, params["center"], params["scale"],
               params["k"])
  return gate_factor(params["theta"], f)


def apply(params: dict[str, Any], r: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
  """e_0 = c + s (g - c): [..., d].

  Args:
    params: the prior's params.
    r: [..., D] text vectors.
    g: [..., d] aligned embeddings.

  Returns:
    [..., d] shrunk embeddings.
  """
  return params["center"] + factor(params, r, g)[..., None] * (g - params["center"])
