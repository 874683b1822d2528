"""Closed-form alignment maps of r_i onto the pretrained item embeddings e_i.

Pure jnp on r [n, D] (inputs of the fit items, old items only) and e [n, d]
(their pretrained ID embeddings); ``apply`` takes any leading shape:

- ``ridge``: ridge regression of e on r (intercept unpenalised);
- ``lowrank``: reduced-rank ridge (the ridge fit projected on the top
  singular directions of its fitted values);
- ``knn``: softmax-weighted average of the k nearest old items' embeddings
  (cosine similarity in text space).

A hyperparameter left at 0 is chosen by k-fold cross-validation over the fit
items (``cross_validate``, ``fit_cv``); ``fit_phi`` packs the chosen map (and
``prior``'s shrink, fit out of fold) as ``align.Mapper`` variables.  With a
few hundred old items and a 384-d r_i, a map with few effective parameters
is what transfers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import prior

KINDS = ("ridge", "lowrank", "knn")
# Hyperparameter grids searched by ``cross_validate`` (r is standardised to norm ~1).
LAMBDAS = tuple(float(x) for x in 10.0 ** np.arange(-2.0, 4.01, 0.5))
RANKS = (1, 2, 4, 8)
KNN_K = (5, 10, 20, 40)
KNN_TEMPERATURES = (0.02, 0.05, 0.1, 0.3, 1.0)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"a closed-form align.kind is one of {KINDS}, got {kind!r}")


@jax.jit
def _ridge_path(r: jnp.ndarray, e: jnp.ndarray, lams: jnp.ndarray):
  """Centred ridge weights for every lambda from one SVD.

  Returns:
    (mu_r [D], mu_e [d], w [L, D, d]) with w_l = (Rc^T Rc + l I)^-1 Rc^T Ec.
  """
  mu_r, mu_e = r.mean(0), e.mean(0)
  u, s, vt = jnp.linalg.svd(r - mu_r, full_matrices=False)
  uty = u.T @ (e - mu_e)
  gain = s / (s ** 2 + lams[:, None])  # [L, q]
  return mu_r, mu_e, jnp.einsum("qD,lq,qd->lDd", vt, gain, uty)


@functools.partial(jax.jit, static_argnums=2)
def _reduce_rank(rc: jnp.ndarray, w: jnp.ndarray, rank: int) -> jnp.ndarray:
  """Projects w [D, d] on the top ``rank`` right singular vectors of rc @ w."""
  _, _, vt = jnp.linalg.svd(rc @ w, full_matrices=False)
  return w @ (vt[:rank].T @ vt[:rank])


def fit_ridge(r: jnp.ndarray, e: jnp.ndarray, ridge_lambda: float) -> dict[str, Any]:
  """Ridge regression e ~ r with an unpenalised intercept.

  Args:
    r: [n, D] inputs.
    e: [n, d] targets.
    ridge_lambda: the penalty on w.

  Returns:
    {"linear": {"mu_r" [D], "mu_e" [d], "w" [D, d]}}.
  """
  mu_r, mu_e, w = _ridge_path(r, e, jnp.asarray([ridge_lambda], jnp.float32))
  return {"linear": {"mu_r": mu_r, "mu_e": mu_e, "w": w[0]}}


def fit_lowrank(r: jnp.ndarray, e: jnp.ndarray, ridge_lambda: float,
                rank: int) -> dict[str, Any]:
  """Reduced-rank ridge: the ridge map restricted to ``rank`` output directions.

  Args:
    r: [n, D] inputs.
    e: [n, d] targets.
    ridge_lambda: the penalty on w.
    rank: output directions kept.

  Returns:
    {"linear": {"mu_r", "mu_e", "w" [D, d] of rank ``rank``}}.
  """
  p = fit_ridge(r, e, ridge_lambda)["linear"]
  return {"linear": dict(p, w=_reduce_rank(r - p["mu_r"], p["w"], int(rank)))}


def fit_knn(r: jnp.ndarray, e: jnp.ndarray, knn_k: int,
            knn_temperature: float) -> dict[str, Any]:
  """Neighbour averaging in text space.

  Args:
    r: [n, D] reference inputs.
    e: [n, d] their targets.
    knn_k: neighbours averaged.
    knn_temperature: softmax temperature on cosine similarity.

  Returns:
    {"knn": {"r_ref" [n, D] unit rows, "e_ref" [n, d], "k" [], "log_t" []}}.
  """
  return {"knn": {"r_ref": prior.unit(r), "e_ref": e,
                  "k": jnp.asarray(knn_k, jnp.float32),
                  "log_t": jnp.log(jnp.asarray(knn_temperature, jnp.float32))}}


def kind_of(params: Any) -> str:
  """"linear" (ridge, lowrank) or "knn", from a fitted map's structure."""
  if "linear" in params:
    return "linear"
  if "knn" in params:
    return "knn"
  raise ValueError(f"not a closed-form map: {sorted(params)}")


def apply(kind: str, params: Any, r: jnp.ndarray) -> jnp.ndarray:
  """The fitted map of ``kind`` applied to r.

  Args:
    kind: one of ``KINDS``, or "linear".
    params: what ``fit`` returned.
    r: [..., D] inputs.

  Returns:
    [..., d] predictions.
  """
  if kind in ("ridge", "lowrank", "linear"):
    p = params["linear"]
    return (r - p["mu_r"]) @ p["w"] + p["mu_e"]
  _check_kind(kind)
  p = params["knn"]
  sims = prior.unit(r) @ p["r_ref"].T  # [..., n] cosine similarities
  near = prior.top_k_mask(sims, p["k"])
  logits = jnp.where(near, sims / jnp.exp(p["log_t"]), -jnp.inf)
  return jax.nn.softmax(logits, axis=-1) @ p["e_ref"]


def fit(kind: str, r: jnp.ndarray, e: jnp.ndarray, **options: Any) -> Any:
  """``fit_<kind>(r, e, **options)``.

  Args:
    kind: one of ``KINDS``.
    r: [n, D] inputs.
    e: [n, d] targets.
    **options: that kind's hyperparameters (``candidates`` lists them).

  Returns:
    The fitted map's params (``apply`` takes them).
  """
  _check_kind(kind)
  if kind == "ridge":
    return fit_ridge(r, e, options["ridge_lambda"])
  if kind == "lowrank":
    return fit_lowrank(r, e, options["ridge_lambda"], options["rank"])
  return fit_knn(r, e, options["knn_k"], options["knn_temperature"])


def fold_ids(n: int, folds: int, key: jax.Array) -> np.ndarray:
  """Balanced fold indices in a random order.

  Args:
    n: items.
    folds: k.
    key: PRNG key of the order.

  Returns:
    [n] fold index of each item.
  """
  return np.asarray(jax.random.permutation(key, jnp.arange(n) % folds))


def fvu(pred: Any, e: Any) -> float:
  """Fraction of variance unexplained, sum ||pred - e||^2 / sum ||e - mean e||^2.

  Computed on the host in float64 (arrays of either kind).

  Args:
    pred: [n, d] predictions.
    e: [n, d] targets.

  Returns:
    The FVU (0 = perfect, 1 = no better than the mean).
  """
  pred, e = np.asarray(pred, np.float64), np.asarray(e, np.float64)
  return float(np.sum((pred - e) ** 2) / max(np.sum((e - e.mean(0)) ** 2), 1e-12))


def candidates(kind: str, dim: int, **options: Any) -> list[dict[str, Any]]:
  """Option dicts to cross-validate: a given (> 0) value is kept, else its grid.

  Args:
    kind: one of ``KINDS``.
    dim: the target dimension d (ranks below it only).
    **options: fixed hyperparameters; 0 or missing ones are searched.

  Returns:
    One option dict per candidate.
  """
  _check_kind(kind)
  def pick(name, grid):
    return [options[name]] if options.get(name) else list(grid)
  if kind == "ridge":
    return [{"ridge_lambda": l} for l in pick("ridge_lambda", LAMBDAS)]
  if kind == "lowrank":
    return [{"ridge_lambda": l, "rank": k} for l in pick("ridge_lambda", LAMBDAS)
            for k in pick("rank", [k for k in RANKS if k < dim])]
  return [{"knn_k": k, "knn_temperature": t} for k in pick("knn_k", KNN_K)
          for t in pick("knn_temperature", KNN_TEMPERATURES)]


@functools.partial(jax.jit, static_argnames=("ranks",))
def _linear_path(r_fit: jnp.ndarray, e_fit: jnp.ndarray, r_new: jnp.ndarray,
                 lams: jnp.ndarray, ranks: tuple[int, ...] | None) -> jnp.ndarray:
  """Predictions on r_new of every ridge (``ranks`` None) or lowrank fit at once.

  Returns:
    [L, n_new, d] for ridge, [L, R, n_new, d] for lowrank (lambda x rank).
  """
  mu_r, mu_e, w = _ridge_path(r_fit, e_fit, lams)  # w [L, D, d]
  if ranks is not None:
    rc = r_fit - mu_r
    def reduce(wl):
      _, _, vt = jnp.linalg.svd(rc @ wl, full_matrices=False)
      return jnp.stack([wl @ (vt[:k].T @ vt[:k]) for k in ranks])
    w = jax.vmap(reduce)(w)  # [L, R, D, d]
  return (r_new - mu_r) @ w + mu_e


def _predict_all(kind: str, r_fit, e_fit, r_new, cands) -> np.ndarray:
  """Predictions on r_new of a fit on (r_fit, e_fit) for every candidate.

  Ridge and lowrank take one program for all candidates (one SVD serves
  every lambda, a batched one every rank) and one transfer, indexed on the
  host (a device slice per candidate cost more than the fit); knn fits each
  candidate.

  Returns:
    [len(cands), n_new, d] (numpy).
  """
  if kind in ("ridge", "lowrank"):
    lams = sorted({c["ridge_lambda"] for c in cands})
    ranks = tuple(sorted({int(c["rank"]) for c in cands})) if kind == "lowrank" else None
    out = np.asarray(_linear_path(r_fit, e_fit, r_new, jnp.asarray(lams, jnp.float32), ranks))
    li = [lams.index(c["ridge_lambda"]) for c in cands]
    if ranks is None:
      return out[li]
    return out[li, [ranks.index(int(c["rank"])) for c in cands]]
  return np.stack([np.asarray(apply(kind, fit(kind, r_fit, e_fit, **c), r_new))
                   for c in cands])


def out_of_fold(kind: str, r: jnp.ndarray, e: jnp.ndarray, fold: np.ndarray,
                **options: Any) -> jnp.ndarray:
  """Each item predicted by a fit on the other folds.

  Args:
    kind: one of ``KINDS``.
    r: [n, D] inputs.
    e: [n, d] targets.
    fold: [n] fold of each item.
    **options: the kind's hyperparameters.

  Returns:
    [n, d] out-of-fold predictions.
  """
  pred = jnp.zeros_like(e)
  for f in np.unique(fold):
    te = fold == f
    pred = pred.at[te].set(_predict_all(kind, r[~te], e[~te], r[te], [options])[0])
  return pred


def cross_validate(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array,
                   folds: int = 5, **options: Any) -> dict[str, Any]:
  """k-fold CV over the items of every candidate (``candidates``) of ``kind``.

  Args:
    kind: ``KINDS``.
    r: [n, D] inputs; e: [n, d] targets.
    key: the fold assignment.
    folds: k.
    **options: fixed hyperparameters (a 0 or missing one is searched).

  Returns:
    {"candidates": option dicts, "fvus": their pooled held-out FVU,
    "best": the index of the lowest, "oof": [n, d] out-of-fold predictions
    of the best, "fold": [n] fold of each item}.
  """
  cands = candidates(kind, e.shape[-1], **options)
  fold = fold_ids(r.shape[0], folds, key)
  r_np, e_np = np.asarray(r), np.asarray(e)
  preds = np.zeros((len(cands),) + e_np.shape, np.float32)
  for f in range(folds):
    te = fold == f
    preds[:, te] = _predict_all(kind, r_np[~te], e_np[~te], r_np[te], cands)
  scores = [fvu(p, e_np) for p in preds]
  best = int(np.argmin(scores))
  return {"candidates": cands, "fvus": scores, "best": best,
          "oof": jnp.asarray(preds[best]), "fold": fold}


def fit_cv(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, folds: int = 5,
           **options: Any) -> tuple[Any, dict[str, Any], float]:
  """Fits ``kind`` on all of (r, e) with the options k-fold CV over its items picks.

  Args:
    kind: one of ``KINDS``.
    r: [n, D] inputs.
    e: [n, d] targets.
    key: PRNG key of the folds.
    folds: k.
    **options: fixed hyperparameters (a 0 or missing one is searched).

  Returns:
    (params, chosen options, their pooled held-out FVU).
  """
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  cv = cross_validate(kind, r, e, key, folds, **options)
  chosen = cv["candidates"][cv["best"]]
  return fit(kind, r, e, **chosen), chosen, cv["fvus"][cv["best"]]


def fit_phi(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, folds: int = 5,
            shrink: str = "none", **options: Any) -> tuple[Any, dict[str, Any]]:
  """A closed-form map (and its prior) as ``align.Mapper`` variables.

  Args:
    kind: ridge|lowrank|knn.
    r: [n, D] inputs of the old items; e: [n, d] their pretrained ID embeddings.
    key: fold assignment.
    folds: k of the k-fold CV (hyperparameters, and the prior's out-of-fold fit).
    shrink: ``prior.SHRINKS``.
    **options: fixed hyperparameters (a 0 or missing one is chosen by CV).

  Returns:
    ({"params": {"closed": map, ["prior": shrink params]}}, the CV's
    ``cross_validate`` dict plus "chosen" (its options), "cv_fvu" (their
    held-out FVU) and "train_fvu" (the map fit on all items, on them)).
  """
  if kind == "mlp":
    raise ValueError("align.shrink needs a closed-form align.kind (ridge|lowrank|knn); "
                     "the MLP trains with align.train_mapper")
  k_cv, k_prior = jax.random.split(key)
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  cv = cross_validate(kind, r, e, k_cv, folds, **options)
  chosen = cv["candidates"][cv["best"]]
  params = fit(kind, r, e, **chosen)
  phi = {"params": {"closed": params}}
  info = dict(cv, chosen=chosen, cv_fvu=cv["fvus"][cv["best"]],
              train_fvu=fvu(apply(kind, params, r), e))
  if shrink != "none":
    fold = fold_ids(r.shape[0], folds, k_prior)
    oof = out_of_fold(kind, r, e, fold, **chosen)
    phi["params"]["prior"] = prior.fit(shrink, r, e, oof, fold)
  return phi, info
