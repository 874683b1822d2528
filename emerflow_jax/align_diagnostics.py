"""How well an alignment generalises: held-out FVU and cold AUC on old items.

An emerging item's cold embedding is the map's output for an item the map
never saw.  These functions measure that on OLD items only (never an
emerging item's rows): each old item is predicted by a map fit without it,
its rows are scored by the frozen backbone with that prediction in place of
its ID embedding, and the AUC is compared with the old-item mean embedding's.

- ``heldout_quality``: the numbers, given held-out predictions;
- ``from_folds``: from the out-of-fold predictions a closed-form fit's CV
  already made (``closedform.cross_validate``: free, what a run records);
- ``diagnostics``: a nested k-fold (hyperparameters chosen by an inner CV,
  the prior refit per fold), slower and unbiased (``align.diagnose``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import align, closedform, metrics, pretrain, prior, programs
from emerflow_jax.models import backbones



@programs.cached()
def _score_fn(model: backbones.Backbone):
  """``backbones.score`` for ``model``, compiled (once per model and row count)."""
  return jax.jit(functools.partial(backbones.score, model))


def _score(model, params, tables, rows, emb_rows: jnp.ndarray, chunk: int = 65536):
  """[R] logits of ``rows`` with item embeddings emb_rows [R, d], in chunks.

  Each chunk is zero-padded to a shape bucket (``pretrain.padded_rows``), so
  the seeds of a process, whose row counts differ, share one compiled score.
  """
  fn = _score_fn(model)
  out = []
  for i in range(0, len(rows["users"]), chunk):
    part = [np.asarray(rows["users"][i:i + chunk]), np.asarray(rows["items"][i:i + chunk]),
            np.asarray(emb_rows[i:i + chunk])]
    n = len(part[0])
    pad = pretrain.padded_rows(n, 1) - n
    part = [np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in part]
    out.append(np.asarray(fn(params, tables, *map(jnp.asarray, part)))[:n])
  return np.concatenate(out)


def heldout_quality(pred: Any, mean: Any, e: Any, items: np.ndarray,
                    model: backbones.Backbone, params: Any, tables: backbones.Tables,
                    rows: dict[str, np.ndarray], **tables_by_name: Any) -> dict[str, Any]:
  """Held-out FVU and cold AUC of predictions of items the map never saw.

  Args:
    pred: [n, d] held-out predictions of ``items``' embeddings.
    mean: [n, d] per item, the mean embedding of the items its map was fit on.
    e: [n, d] their pretrained ID embeddings (the targets).
    items: [n] their item indices (as in ``rows["items"]``).
    model, params, tables: the frozen backbone.
    rows: {"users", "items", "labels"} [R] rows of those items.
    **tables_by_name: more [n, d] embeddings to score, as "heldout_auc_<name>".

  Returns:
    {"n_items", "n_rows", "heldout_fvu", "heldout_auc" (rows scored with
    ``pred``), "heldout_auc_mean" (with ``mean``)} and the extra AUCs.
  """
  pos = np.full(int(max(np.max(items), np.max(rows["items"]))) + 1, -1)
  pos[np.asarray(items)] = np.arange(len(items))
  at = pos[np.asarray(rows["items"])]
  if np.any(at < 0):
    raise ValueError("diagnostics: rows of items outside ``items``")
  labels = np.asarray(rows["labels"])
  # Gathered on the host: a device gather of a seed-dependent row count would
  # compile anew for every seed (``_score`` pads to shared shape buckets).
  auc = lambda table: metrics.auc(
      labels, _score(model, params, tables, rows, np.asarray(table, np.float32)[at]))
  out = {"n_items": int(len(items)), "n_rows": int(len(labels)),
         "heldout_fvu": closedform.fvu(jnp.asarray(pred), jnp.asarray(e)),
         "heldout_auc": auc(pred), "heldout_auc_mean": auc(mean)}
  out.update({f"heldout_auc_{k}": auc(v) for k, v in tables_by_name.items()})
  return out


def from_folds(oof: Any, e: Any, fold: np.ndarray, items: np.ndarray,
               model: backbones.Backbone, params: Any, tables: backbones.Tables,
               rows: dict[str, np.ndarray]) -> dict[str, Any]:
  """``heldout_quality`` of the out-of-fold predictions of a k-fold CV.

  Args:
    oof: [n, d] each item's prediction by the fit on the other folds.
    e: [n, d] the targets.
    fold: [n] fold of each item.
    items: [n] their item indices.
    model, params, tables: the frozen backbone.
    rows: rows of those items.

  Returns:
    ``heldout_quality``'s dict; the mean embedding of an item is that of the
    other folds' items.
  """
  e = np.asarray(e, np.float32)
  mean = np.zeros_like(e)
  for f in np.unique(fold):
    mean[fold == f] = e[fold != f].mean(0)
  return heldout_quality(oof, mean, e, items, model, params, tables, rows)


def diagnostics(kind: str, r: np.ndarray, e: np.ndarray, items: np.ndarray,
                model: backbones.Backbone, params: Any, tables: backbones.Tables,
                rows: dict[str, np.ndarray], key: jax.Array, folds: int = 5,
                shrink: str = "none", **options: Any) -> dict[str, Any]:
  """Held-out quality of an alignment on old items, by k-fold over items.

  Every old item is predicted by a map (hyperparameters by an inner CV, and
  the prior) fit on the other folds, as an emerging item is.  Its rows are
  then scored by the frozen backbone with that out-of-fold embedding in place
  of its ID embedding, against the old-item mean of the other folds.

  Args:
    kind: ``align.KINDS`` ("mlp" is the MSE-only ``align.fit_mlp``).
    r: [n, D] inputs of the old items; e: [n, d] their pretrained ID embeddings.
    items: [n] their item indices (as in ``rows["items"]``).
    model, params, tables: the frozen backbone.
    rows: {"users", "items", "labels"} [R] rows of those items.
    key: folds and inits.
    folds: k.
    shrink: ``prior.SHRINKS``.
    **options: the map's fixed hyperparameters.

  Returns:
    {"kind", "shrink", "folds", "n_items", "n_rows", "heldout_fvu",
    "heldout_fvu_shrunk", "heldout_auc" (the map), "heldout_auc_shrunk",
    "heldout_auc_mean" (mean embedding), "heldout_auc_zero" (a zero
    embedding, about base's N(0, 0.01^2) start), "heldout_auc_own" (the items'
    own pretrained embeddings, an in-sample ceiling)}; the *_shrunk entries
    equal the map's when shrink is "none".
  """
  if kind == "mlp" and shrink != "none":
    raise ValueError("align.shrink needs a closed-form align.kind (ridge|lowrank|knn)")
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  k_out, k_in = jax.random.split(key)
  fold = closedform.fold_ids(r.shape[0], folds, k_out)
  pred, shrunk, mean = (np.zeros(e.shape, np.float32) for _ in range(3))
  for f in range(folds):
    te, tr = fold == f, fold != f
    k_f = jax.random.fold_in(k_in, f)
    if kind == "mlp":
      g = align.apply(kind, align.fit_mlp(r[tr], e[tr], k_f, **options), r[te])
    else:
      p, chosen, _ = closedform.fit_cv(kind, r[tr], e[tr], k_f, folds, **options)
      g = closedform.apply(kind, p, r[te])
    pred[te], shrunk[te], mean[te] = g, g, e[tr].mean(0)
    if shrink != "none":
      inner = closedform.fold_ids(int(tr.sum()), folds, k_f)
      oof = closedform.out_of_fold(kind, r[tr], e[tr], inner, **chosen)
      shrunk[te] = prior.apply(prior.fit(shrink, r[tr], e[tr], oof, inner), r[te], g)
  out = heldout_quality(pred, mean, e, items, model, params, tables, rows,
                        shrunk=shrunk, zero=np.zeros(e.shape), own=e)
  return dict({"kind": kind, "shrink": shrink, "folds": int(folds),
               "heldout_fvu_shrunk": closedform.fvu(jnp.asarray(shrunk), e)}, **out)

