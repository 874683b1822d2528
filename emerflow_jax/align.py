"""Stage 2: align the LLM text vector r_i to the backbone's item-embedding space.

``align.kind`` picks the map, always fit on old items only, whose pretrained
ID embeddings e_i are the targets:

- ``mlp``: a Flax mapper ``g_phi`` (DESIGN §3), trained with the backbone
  frozen on ``||g_phi(r_i) - e_i||^2 + lambda * BCE(f_theta(x_u, x_i,
  g_phi(r_i)), y)`` over old items and their rows (``train_mapper``);
- ``ridge``: closed-form ridge regression of e on r;
- ``lowrank``: reduced-rank ridge (the ridge fit projected on the top
  singular directions of its fitted values);
- ``knn``: softmax-weighted average of the k nearest old items' embeddings
  (cosine similarity in text space).

Closed forms pick their hyperparameters by k-fold cross-validation over old
items inside the fit (``fit_cv``).  With a few hundred old items and a
384-d r_i, a map with few effective parameters is what transfers.  The cold
embedding of an emerging item is the map's output, optionally shrunk toward
the old-item mean by ``prior`` (``align.shrink``).  ``Mapper`` evaluates
either kind, so the meta-learning stage calls one ``mapper.apply`` whatever
the kind.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import checkpoint, metrics, pretrain, prior
from emerflow_jax.models import backbones

KINDS = ("mlp", "ridge", "lowrank", "knn")
# Hyperparameter grids searched by ``fit_cv`` (r is standardised to norm ~1).
LAMBDAS = tuple(float(x) for x in 10.0 ** np.arange(-2.0, 4.01, 0.5))
RANKS = (1, 2, 4, 8)
KNN_K = (5, 10, 20, 40)
KNN_TEMPERATURES = (0.02, 0.05, 0.1, 0.3, 1.0)


class Mapper(nn.Module):
  """g_phi: [n, D] text vectors (+ [n, S] side embeddings) -> [n, d].

  Variables made by ``fit_phi`` (``{"params": {"closed": ..., "prior": ...}}``)
  hold a closed-form map instead, which is applied (then the prior's shrink).
  The MLP's output layer starts at zero, so an untrained mapper predicts the (near
  zero) embedding of an untrained ID instead of a large random vector: with a
  few hundred old items and a 384-d input, anything the text cannot explain
  should stay shrunk towards the mean, and early stopping picks how far to go.
  """
  out_dim: int
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, r: jnp.ndarray, side: jnp.ndarray | None = None) -> jnp.ndarray:
    h = r if side is None else jnp.concatenate([r, side], axis=-1)
    if self.has_variable("params", "closed"):  # a closed-form map (``fit_phi``)
      p = self.variables["params"]
      g = apply(kind_of(p["closed"]), p["closed"], h)
      return g if "prior" not in p else prior.apply(p["prior"], h, g)
    for width in self.hidden:
      h = nn.gelu(nn.Dense(width)(h))
    return nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros)(h)


def standardize(vectors: np.ndarray, fit_items: np.ndarray) -> np.ndarray:
  """Z-scores every item's vector with mean/std of ``fit_items`` (old items only), / sqrt(D).

  Using only old items keeps emerging items' vectors out of any statistic.
  """
  ref = vectors[fit_items]
  mu = ref.mean(0)
  sd = ref.std(0) + 1e-6
  # Divide by sqrt(D) as well so an item's vector has norm ~1 whatever D is.
  return ((vectors - mu) / sd / np.sqrt(vectors.shape[1])).astype(np.float32)


def item_side_embeddings(params: Any, tables: backbones.Tables,
                         items: jnp.ndarray) -> jnp.ndarray:
  """Frozen backbone embeddings of every item field except the ID: [n, F_side*d].

  Sequence fields are sum-pooled over non-padding entries, as in the backbone.
  """
  embed = params["params"]["embed"]
  out = []
  for key in sorted(tables):
    if not key.startswith("item/") or key == backbones.ITEM_ID:
      continue
    table = embed[key.replace("/", "_")]
    ids = jnp.take(tables[key], items, axis=0)
    if ids.ndim == 2:
      out.append((jnp.take(table, ids, axis=0) * (ids > 0)[..., None]).sum(1))
    else:
      out.append(jnp.take(table, ids, axis=0))
  if not out:
    return jnp.zeros((items.shape[0], 0), jnp.float32)
  return jnp.concatenate(out, axis=-1)


def align_loss(phi: Any, mapper: Mapper, model: backbones.Backbone, params: Any,
               tables: backbones.Tables, r: jnp.ndarray, side: jnp.ndarray | None,
               targets: jnp.ndarray, target_var: jnp.ndarray,
               rows: dict[str, jnp.ndarray],
               lam: float) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """L_align over a batch of old items and a batch of their rows.

  Args:
    phi: mapper parameters.
    mapper, model, params, tables: the mapper and the frozen backbone.
    r: [n_items_total, D] standardised vectors of ALL items (gathered by index).
    side: [n_items_total, S] side embeddings or None.
    targets: [n_items_total, d] pretrained ID embeddings (only old rows used).
    target_var: scalar, mean squared distance of old targets to their mean.
    rows: {"items": [b] old item indices for the MSE term, "users", "row_items",
      "labels": [B] old-item rows for the BCE term}.
    lam: weight of the BCE term.

  Returns:
    (loss, {"mse", "bce"}).
  """
  def embed(idx):
    return mapper.apply(phi, r[idx], None if side is None else side[idx])

  # Normalised by the targets' variance (fraction of variance unexplained), so
  # lam means the same thing whatever scale pretraining left the embeddings at.
  mse = jnp.mean(jnp.sum((embed(rows["items"]) - targets[rows["items"]]) ** 2, -1))
  mse = mse / target_var
  logits = backbones.score(model, params, tables, rows["users"], rows["row_items"],
                           embed(rows["row_items"]))
  bce = backbones.bce_loss(logits, rows["labels"])
  return mse + lam * bce, {"mse": mse, "bce": bce}


def fraction_unexplained(phi: Any, mapper: Mapper, r: jnp.ndarray,
                         side: jnp.ndarray | None, targets: jnp.ndarray,
                         items: jnp.ndarray) -> jnp.ndarray:
  """||g_phi(r_i) - e_i||^2 / ||e_i - mean e||^2 over ``items`` (1 = predicts the mean)."""
  pred = mapper.apply(phi, r[items], None if side is None else side[items])
  t = targets[items]
  return jnp.sum((pred - t) ** 2) / jnp.maximum(jnp.sum((t - t.mean(0)) ** 2), 1e-12)


def train_mapper(mapper: Mapper, model: backbones.Backbone, params: Any,
                 tables: backbones.Tables, r: np.ndarray, side: np.ndarray | None,
                 old_items: np.ndarray, old_rows: dict[str, np.ndarray],
                 key: jax.Array, steps: int, lr: float, lam: float,
                 batch_rows: int, weight_decay: float, ckpt_dir: str | os.PathLike,
                 holdout: float = 0.0, log=logging.info) -> Any:
  """Trains g_phi on old items; resumes from ``ckpt_dir``.

  With ``holdout`` > 0, that fraction of old items is kept out of the MSE term
  and the mapper returned is the one with the lowest held-out fraction of
  variance unexplained (checked every steps/20): early stopping on old items
  only, since an emerging item's target is never known.

  Args:
    r: [n_items, D] standardised vectors; side: [n_items, S] or None.
    old_items: [n_old] item indices whose pretrained embeddings are targets.
    old_rows: {"users", "items", "labels"} [n] old-item rows for the BCE term.
    key: PRNG key.
    steps, lr, lam, batch_rows, weight_decay: training settings.
    ckpt_dir: Orbax directory.
    holdout: fraction of old items held out for early stopping.

  Returns:
    The mapper parameters phi.
  """
  init_key, state_key, split_key = jax.random.split(key, 3)
  r = jnp.asarray(r)
  side = None if side is None else jnp.asarray(side)
  targets = jnp.take(backbones.item_embedding_table(params),
                     backbones.item_ids(tables, jnp.arange(r.shape[0])), axis=0)
  old_items = np.asarray(old_items)
  n_hold = int(round(holdout * len(old_items)))
  perm = np.asarray(jax.random.permutation(split_key, len(old_items)))
  held = jnp.asarray(old_items[perm[:n_hold]])
  fit_items = jnp.asarray(old_items[perm[n_hold:]])
  t_old = targets[fit_items]
  target_var = jnp.mean(jnp.sum((t_old - t_old.mean(0)) ** 2, -1))
  phi = mapper.init(init_key, r[:2], None if side is None else side[:2])
  tx = optax.adamw(lr, weight_decay=weight_decay)
  state = {"params": phi, "opt_state": tx.init(phi), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(state_key),
           "best": jax.tree.map(jnp.copy, phi),  # own buffers: the state is donated
           "best_score": jnp.asarray(jnp.inf, jnp.float32)}
  users = jnp.asarray(old_rows["users"])
  items = jnp.asarray(old_rows["items"])
  labels = jnp.asarray(old_rows["labels"])
  n_items_batch = min(256, int(fit_items.shape[0]))
  batch_rows = min(batch_rows, int(users.shape[0]))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state):
    k = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_items, k_rows = jax.random.split(k)
    it = jax.random.choice(k_items, fit_items, (n_items_batch,), replace=False)
    ridx = jax.random.randint(k_rows, (batch_rows,), 0, users.shape[0])
    batch = {"items": it, "users": users[ridx], "row_items": items[ridx],
             "labels": labels[ridx]}
    (loss, aux), grads = jax.value_and_grad(align_loss, has_aux=True)(
        state["params"], mapper, model, params, tables, r, side, targets,
        target_var, batch, lam)
    return pretrain.apply_gradients(state, grads, tx), dict(aux, loss=loss)

  @jax.jit
  def keep_best(state):
    score = fraction_unexplained(state["params"], mapper, r, side, targets, held)
    better = score < state["best_score"]
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), state["params"],
                        state["best"])
    return dict(state, best=best, best_score=jnp.minimum(score, state["best_score"])), score

  check = max(1, steps // 20)
  save_every = max(1, steps // 5)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = int(done or 0)
    if done is not None:
      log(f"align: resumed at step {done}")
    for i in range(start, steps):
      state, aux = step(state)
      if n_hold and ((i + 1) % check == 0 or i + 1 == steps):
        state, score = keep_best(state)
      if (i + 1) % save_every == 0 or i + 1 == steps:
        held_msg = (f" held-out FVU {float(score):.3f} (best "
                    f"{float(state['best_score']):.3f})" if n_hold else "")
        log(f"align: step {i + 1}/{steps} loss {float(aux['loss']):.4f} "
            f"fvu {float(aux['mse']):.4f} bce {float(aux['bce']):.4f}{held_msg}")
        ckpt.save(i + 1, state)
  return state["best"] if n_hold else state["params"]


def targets(params: Any, tables: backbones.Tables, items: np.ndarray) -> jnp.ndarray:
  """[n, d] pretrained ID embeddings of item indices [n] (the alignment targets)."""
  return jnp.take(backbones.item_embedding_table(params),
                  backbones.item_ids(tables, jnp.asarray(items)), axis=0)


def config_options(cfg: Any) -> tuple[str, str, int, dict[str, Any]]:
  """(kind, shrink, folds, closed-form options) of an ``align`` config section."""
  opts = {"ridge_lambda": float(cfg.get("ridge_lambda", 0.0)),
          "rank": int(cfg.get("rank", 0)), "knn_k": int(cfg.get("knn_k", 0)),
          "knn_temperature": float(cfg.get("knn_temperature", 0.0))}
  return (str(cfg.get("kind", "mlp")), str(cfg.get("shrink", "none")),
          int(cfg.get("folds", 5)), opts)


# Closed-form maps.  Pure jnp on r [n, D] (inputs of the fit items) and e
# [n, d] (their pretrained ID embeddings); ``apply`` takes any leading shape.

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
  """Ridge regression e ~ r (intercept unpenalised): {"linear": {mu_r, mu_e, w [D, d]}}."""
  mu_r, mu_e, w = _ridge_path(r, e, jnp.asarray([ridge_lambda], jnp.float32))
  return {"linear": {"mu_r": mu_r, "mu_e": mu_e, "w": w[0]}}


def fit_lowrank(r: jnp.ndarray, e: jnp.ndarray, ridge_lambda: float,
                rank: int) -> dict[str, Any]:
  """Reduced-rank ridge: the ridge map restricted to ``rank`` output directions."""
  p = fit_ridge(r, e, ridge_lambda)["linear"]
  return {"linear": dict(p, w=_reduce_rank(r - p["mu_r"], p["w"], int(rank)))}


def fit_knn(r: jnp.ndarray, e: jnp.ndarray, knn_k: int,
            knn_temperature: float) -> dict[str, Any]:
  """Neighbour averaging: {"knn": {r_ref [n, D] unit rows, e_ref [n, d], k, log_t}}."""
  return {"knn": {"r_ref": prior.unit(r), "e_ref": e,
                  "k": jnp.asarray(knn_k, jnp.float32),
                  "log_t": jnp.log(jnp.asarray(knn_temperature, jnp.float32))}}


def fit_mlp(r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, hidden: Sequence[int] = (64,),
            steps: int = 500, lr: float = 3e-3, weight_decay: float = 1e-4) -> Any:
  """The MLP mapper on the MSE term alone (full batch, AdamW): Mapper variables.

  ``train_mapper`` adds the BCE term over rows; this is the version the
  diagnostics can refit per fold without a backbone.
  """
  mapper = Mapper(out_dim=e.shape[-1], hidden=tuple(hidden))
  phi = mapper.init(key, r[:2])
  tx = optax.adamw(lr, weight_decay=weight_decay)
  var = jnp.mean(jnp.sum((e - e.mean(0)) ** 2, -1))

  def loss(p):
    return jnp.mean(jnp.sum((mapper.apply(p, r) - e) ** 2, -1)) / var

  def step(carry, _):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (phi, _), _ = jax.lax.scan(step, (phi, tx.init(phi)), None, length=int(steps))
  return phi


def kind_of(params: Any) -> str:
  """"linear" (ridge, lowrank), "knn" or "mlp", from the params' structure."""
  if "linear" in params:
    return "linear"
  return "knn" if "knn" in params else "mlp"


def apply(kind: str, params: Any, r: jnp.ndarray) -> jnp.ndarray:
  """The fitted map of ``kind`` on r [..., D] -> [..., d]."""
  if kind in ("ridge", "lowrank", "linear"):
    p = params["linear"]
    return (r - p["mu_r"]) @ p["w"] + p["mu_e"]
  if kind == "knn":
    p = params["knn"]
    sims = prior.unit(r) @ p["r_ref"].T  # [..., n] cosine similarities
    near = prior.top_k_mask(sims, p["k"])
    logits = jnp.where(near, sims / jnp.exp(p["log_t"]), -jnp.inf)
    return jax.nn.softmax(logits, axis=-1) @ p["e_ref"]
  if kind == "mlp":
    layers = sorted(params["params"], key=lambda n: int(n.split("_")[-1]))
    widths = [params["params"][n]["kernel"].shape[-1] for n in layers]
    return Mapper(out_dim=widths[-1], hidden=tuple(widths[:-1])).apply(params, r)
  raise ValueError(f"align.kind must be one of {KINDS}, got {kind!r}")


def fit(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array | None = None,
        **options: Any) -> Any:
  """``fit_<kind>(r [n, D], e [n, d], **options)``; ``key`` is the MLP's init."""
  if kind == "ridge":
    return fit_ridge(r, e, options["ridge_lambda"])
  if kind == "lowrank":
    return fit_lowrank(r, e, options["ridge_lambda"], options["rank"])
  if kind == "knn":
    return fit_knn(r, e, options["knn_k"], options["knn_temperature"])
  if kind == "mlp":
    return fit_mlp(r, e, jax.random.key(0) if key is None else key, **options)
  raise ValueError(f"align.kind must be one of {KINDS}, got {kind!r}")


def fold_ids(n: int, folds: int, key: jax.Array) -> np.ndarray:
  """[n] fold index of each item, balanced, in a random order."""
  return np.asarray(jax.random.permutation(key, jnp.arange(n) % folds))


def fvu(pred: jnp.ndarray, e: jnp.ndarray) -> float:
  """Fraction of variance unexplained, sum ||pred - e||^2 / sum ||e - mean e||^2."""
  return float(jnp.sum((pred - e) ** 2) / jnp.maximum(jnp.sum((e - e.mean(0)) ** 2), 1e-12))


def candidates(kind: str, dim: int, **options: Any) -> list[dict[str, Any]]:
  """Option dicts to cross-validate: a given (> 0) value is kept, else its grid."""
  def pick(name, grid):
    return [options[name]] if options.get(name) else list(grid)
  if kind == "ridge":
    return [{"ridge_lambda": l} for l in pick("ridge_lambda", LAMBDAS)]
  if kind == "lowrank":
    return [{"ridge_lambda": l, "rank": k} for l in pick("ridge_lambda", LAMBDAS)
            for k in pick("rank", [k for k in RANKS if k < dim])]
  if kind == "knn":
    return [{"knn_k": k, "knn_temperature": t} for k in pick("knn_k", KNN_K)
            for t in pick("knn_temperature", KNN_TEMPERATURES)]
  return [dict(options)]


def _predict_all(kind: str, r_fit, e_fit, r_new, cands, key) -> list[jnp.ndarray]:
  """Predictions on r_new of a fit on (r_fit, e_fit) for every candidate."""
  if kind in ("ridge", "lowrank"):  # one SVD serves every lambda
    lams = sorted({c["ridge_lambda"] for c in cands})
    mu_r, mu_e, w = _ridge_path(r_fit, e_fit, jnp.asarray(lams, jnp.float32))
    out = []
    for c in cands:
      wl = w[lams.index(c["ridge_lambda"])]
      if kind == "lowrank":
        wl = _reduce_rank(r_fit - mu_r, wl, int(c["rank"]))
      out.append((r_new - mu_r) @ wl + mu_e)
    return out
  return [apply(kind, fit(kind, r_fit, e_fit, key, **c), r_new) for c in cands]


def out_of_fold(kind: str, r: jnp.ndarray, e: jnp.ndarray, fold: np.ndarray,
                key: jax.Array | None = None, **options: Any) -> jnp.ndarray:
  """[n, d] predictions of each item by a fit on the other folds (``fold`` [n])."""
  pred = jnp.zeros_like(e)
  for f in np.unique(fold):
    te = fold == f
    pred = pred.at[te].set(_predict_all(kind, r[~te], e[~te], r[te], [options], key)[0])
  return pred


def fit_cv(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, folds: int = 5,
           **options: Any) -> tuple[Any, dict[str, Any], float]:
  """Fits ``kind`` on all of (r, e) with the options k-fold CV over its items picks.

  Returns:
    (params, chosen options, their pooled held-out FVU).
  """
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  cands = candidates(kind, e.shape[-1], **options)
  fold = fold_ids(r.shape[0], folds, key)
  preds = [jnp.zeros_like(e) for _ in cands]
  for f in range(folds):
    te = fold == f
    for i, p in enumerate(_predict_all(kind, r[~te], e[~te], r[te], cands, key)):
      preds[i] = preds[i].at[te].set(p)
  scores = [fvu(p, e) for p in preds]
  best = int(np.argmin(scores))
  return fit(kind, r, e, key, **cands[best]), cands[best], scores[best]


def fit_phi(kind: str, r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, folds: int = 5,
            shrink: str = "none", **options: Any) -> tuple[Any, dict[str, Any]]:
  """A closed-form map (and its prior) as ``Mapper`` variables.

  Args:
    kind: ridge|lowrank|knn.
    r: [n, D] inputs of the old items; e: [n, d] their pretrained ID embeddings.
    key: fold assignment.
    folds: k of the k-fold CV (hyperparameters, and the prior's out-of-fold fit).
    shrink: ``prior.SHRINKS``.
    **options: fixed hyperparameters (a 0 or missing one is chosen by CV).

  Returns:
    ({"params": {"closed": map, ["prior": shrink params]}},
     {chosen options, "cv_fvu": their held-out FVU}).
  """
  if kind == "mlp":
    raise ValueError("align.shrink needs a closed-form align.kind (ridge|lowrank|knn); "
                     "the MLP trains with train_mapper")
  k_cv, k_prior = jax.random.split(key)
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  params, chosen, cv = fit_cv(kind, r, e, k_cv, folds, **options)
  phi, info = {"params": {"closed": params}}, dict(chosen, cv_fvu=cv)
  if shrink != "none":
    fold = fold_ids(r.shape[0], folds, k_prior)
    oof = out_of_fold(kind, r, e, fold, **chosen)
    phi["params"]["prior"] = prior.fit(shrink, r, e, oof, fold)
  return phi, info


def _score(model, params, tables, rows, emb_rows: jnp.ndarray, chunk: int = 65536):
  """[R] logits of ``rows`` with item embeddings emb_rows [R, d], in chunks."""
  out = [backbones.score(model, params, tables, jnp.asarray(rows["users"][i:i + chunk]),
                         jnp.asarray(rows["items"][i:i + chunk]), emb_rows[i:i + chunk])
         for i in range(0, len(rows["users"]), chunk)]
  return np.concatenate([np.asarray(o) for o in out])


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
    kind: ``KINDS`` ("mlp" is the MSE-only ``fit_mlp``).
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
  r, e = jnp.asarray(r, jnp.float32), jnp.asarray(e, jnp.float32)
  k_out, k_in = jax.random.split(key)
  fold = fold_ids(r.shape[0], folds, k_out)
  pred, shrunk, mean = (np.zeros(e.shape, np.float32) for _ in range(3))
  for f in range(folds):
    te, tr = fold == f, fold != f
    k_f = jax.random.fold_in(k_in, f)
    if kind == "mlp":
      p, chosen = fit_mlp(r[tr], e[tr], k_f, **options), options
    else:
      p, chosen, _ = fit_cv(kind, r[tr], e[tr], k_f, folds, **options)
    g = apply(kind, p, r[te])
    pred[te], shrunk[te], mean[te] = g, g, e[tr].mean(0)
    if shrink != "none":
      inner = fold_ids(int(tr.sum()), folds, k_f)
      oof = out_of_fold(kind, r[tr], e[tr], inner, k_f, **chosen)
      shrunk[te] = prior.apply(prior.fit(shrink, r[tr], e[tr], oof, inner), r[te], g)
  pos = np.full(int(max(np.max(items), np.max(rows["items"]))) + 1, -1)
  pos[np.asarray(items)] = np.arange(len(items))
  at = pos[np.asarray(rows["items"])]
  if np.any(at < 0):
    raise ValueError("diagnostics: rows of items outside ``items``")
  labels = np.asarray(rows["labels"])
  auc = lambda table: metrics.auc(
      labels, _score(model, params, tables, rows, jnp.asarray(table)[at]))
  return {"kind": kind, "shrink": shrink, "folds": int(folds), "n_items": int(r.shape[0]),
          "n_rows": int(len(labels)), "heldout_fvu": fvu(jnp.asarray(pred), e),
          "heldout_fvu_shrunk": fvu(jnp.asarray(shrunk), e),
          "heldout_auc": auc(pred), "heldout_auc_shrunk": auc(shrunk),
          "heldout_auc_mean": auc(mean), "heldout_auc_zero": auc(np.zeros(e.shape)),
          "heldout_auc_own": auc(e)}
