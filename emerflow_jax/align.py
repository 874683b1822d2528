"""Stage 2: align the LLM text vector r_i to the backbone's item-embedding space.

``align.kind`` picks the map, always fit on old items only, whose pretrained
ID embeddings e_i are the targets:

- ``mlp``: a Flax mapper ``g_phi`` (DESIGN §3), trained here with the
  backbone frozen on ``||g_phi(r_i) - e_i||^2 + lambda * BCE(f_theta(x_u,
  x_i, g_phi(r_i)), y)`` over old items and their rows (``train_mapper``);
- ``ridge``, ``lowrank``, ``knn``: closed forms (``closedform``), their
  hyperparameters chosen by k-fold cross-validation over old items.

The cold embedding of an emerging item is the map's output, optionally
shrunk toward the old-item mean by ``prior`` (``align.shrink``).  ``Mapper``
evaluates either kind, so the meta-learning stage calls one ``mapper.apply``
whatever the kind.  How well a fitted map generalises to items it never saw
is measured by ``align_diagnostics``.
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

from emerflow_jax import checkpoint, closedform, curves, pretrain, prior
from emerflow_jax.models import backbones

KINDS = ("mlp",) + closedform.KINDS

# The ``align`` options that act under some kinds only: {name: (kinds, the
# value that asks for nothing)}.  ``check_options`` refuses any other value
# under another kind, where the option would silently do nothing.
KIND_OPTIONS = {
    **{name: (("mlp",), value) for name, value in (
        ("hidden", (64,)), ("lam", 0.1), ("steps", 1000), ("lr", 1e-3),
        ("batch_rows", 1024), ("weight_decay", 1e-4), ("holdout", 0.2))},
    "shrink": (closedform.KINDS, "none"),
    "folds": (closedform.KINDS, 5),
    "diagnose": (closedform.KINDS, False),
    "ridge_lambda": (("ridge", "lowrank"), 0.0),
    "rank": (("lowrank",), 0),
    "knn_k": (("knn",), 0),
    "knn_temperature": (("knn",), 0.0),
}


def check_options(cfg: Any) -> None:
  """Raises on an ``align`` option set where ``align.kind`` ignores it.

  Args:
    cfg: an ``align`` config section.

  Raises:
    ValueError: naming the option, the kinds it acts under and its default.
  """
  kind = str(cfg.get("kind", "mlp"))
  if kind not in KINDS:
    raise ValueError(f"align.kind must be one of {KINDS}, got {kind!r}")
  for name, (kinds, default) in KIND_OPTIONS.items():
    value = cfg.get(name, default)
    value = tuple(value) if isinstance(value, list) else value
    if kind not in kinds and value != default:
      raise ValueError(
          f"align.{name}={value!r} acts only under align.kind in {kinds}; under "
          f"align.kind={kind!r} it would do nothing: leave it at {default!r}")


class Mapper(nn.Module):
  """g_phi: [n, D] text vectors (+ [n, S] side embeddings) -> [n, d].

  Variables made by ``closedform.fit_phi`` (``{"params": {"closed": ...,
  "prior": ...}}``) hold a closed-form map instead, which is applied (then
  the prior's shrink).
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
    if self.has_variable("params", "closed"):  # ``closedform.fit_phi``'s map
      p = self.variables["params"]
      g = closedform.apply(closedform.kind_of(p["closed"]), p["closed"], h)
      return g if "prior" not in p else prior.apply(p["prior"], h, g)
    for width in self.hidden:
      h = nn.gelu(nn.Dense(width)(h))
    return nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros)(h)


def standardize(vectors: np.ndarray, fit_items: np.ndarray) -> np.ndarray:
  """Z-scores every item's vector with mean/std of ``fit_items`` (old items only), / sqrt(D).

  Using only old items keeps emerging items' vectors out of any statistic.

  Args:
    vectors: [n_items, D] text vectors of every item.
    fit_items: indices of the items whose statistics are used (old items).

  Returns:
    [n_items, D] standardised vectors.
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

  Args:
    params: the frozen backbone's parameters.
    tables: its feature tables.
    items: [n] item indices.

  Returns:
    [n, F_side * d] concatenated side-field embeddings.
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
  """||g_phi(r_i) - e_i||^2 / ||e_i - mean e||^2 over ``items`` (1 = predicts the mean).

  Args:
    phi: the mapper's variables.
    mapper: g_phi.
    r: [n_items, D] text vectors.
    side: [n_items, ...] side embeddings, or None.
    targets: [n_items, d] pretrained ID embeddings.
    items: [m] the items scored.

  Returns:
    [] the FVU over ``items``.
  """
  pred = mapper.apply(phi, r[items], None if side is None else side[items])
  t = targets[items]
  return jnp.sum((pred - t) ** 2) / jnp.maximum(jnp.sum((t - t.mean(0)) ** 2), 1e-12)


def holdout_split(old_items: np.ndarray, holdout: float, key: jax.Array
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(held, fit) old items of ``train_mapper``'s early stopping for ``key``.

  Args:
    old_items: [n_old] item indices.
    holdout: the held-out fraction.
    key: ``train_mapper``'s key (the split uses its third sub-key).

  Returns:
    ([round(holdout * n_old)] held-out items, the other old items).
  """
  split_key = jax.random.split(key, 3)[2]
  old_items = np.asarray(old_items)
  n_hold = int(round(holdout * len(old_items)))
  perm = np.asarray(jax.random.permutation(split_key, len(old_items)))
  return old_items[perm[:n_hold]], old_items[perm[n_hold:]]


def train_mapper(mapper: Mapper, model: backbones.Backbone, params: Any,
                 tables: backbones.Tables, r: np.ndarray, side: np.ndarray | None,
                 old_items: np.ndarray, old_rows: dict[str, np.ndarray],
                 key: jax.Array, steps: int, lr: float, lam: float,
                 batch_rows: int, weight_decay: float, ckpt_dir: str | os.PathLike,
                 holdout: float = 0.0, log=logging.info, writer: Any = None) -> Any:
  """Trains g_phi on old items; resumes from ``ckpt_dir``.

  With ``holdout`` > 0, that fraction of old items is kept out of the MSE term
  and the mapper returned is the one with the lowest held-out fraction of
  variance unexplained (checked every steps/20): early stopping on old items
  only, since an emerging item's target is never known.
  At every check the
  FVU of the fit items (and of the held-out ones) goes to ``writer``
  as ``fvu_train`` (``fvu_heldout``), at the step reached.

  Args:
    r: [n_items, D] standardised vectors; side: [n_items, S] or None.
    old_items: [n_old] item indices whose pretrained embeddings are targets.
    old_rows: {"users", "items", "labels"} [n] old-item rows for the BCE term.
    key: PRNG key.
    steps, lr, lam, batch_rows, weight_decay: training settings.
    ckpt_dir: Orbax directory.
    holdout: fraction of old items held out for early stopping.
    log: where progress lines go.
    writer: optional ``curves`` writer for the FVU curves.

  Returns:
    The mapper parameters phi.
  """
  init_key, state_key, _ = jax.random.split(key, 3)
  r = jnp.asarray(r)
  side = None if side is None else jnp.asarray(side)
  targets = jnp.take(backbones.item_embedding_table(params),
                     backbones.item_ids(tables, jnp.arange(r.shape[0])), axis=0)
  held, fit_items = (jnp.asarray(x) for x in holdout_split(old_items, holdout, key))
  n_hold = int(held.shape[0])
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

  train_fvu = jax.jit(lambda phi: fraction_unexplained(phi, mapper, r, side, targets,
                                                      fit_items))
  check = max(1, steps // 20)
  save_every = max(1, steps // 5)
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    state, done = ckpt.restore_or(state)
    start = int(done or 0)
    if done is not None:
      log(f"align: resumed at step {done}")
    for i in range(start, steps):
      state, aux = step(state)
      if (i + 1) % check == 0 or i + 1 == steps:
        if n_hold:
          state, score = keep_best(state)
        curve = {"fvu_heldout": score} if n_hold else {}
        if writer is not None:
          curves.write(writer, i + 1, dict(curve, fvu_train=train_fvu(state["params"])))
      if (i + 1) % save_every == 0 or i + 1 == steps:
        held_msg = (f" held-out FVU {float(score):.3f} (best "
                    f"{float(state['best_score']):.3f})" if n_hold else "")
        log(f"align: step {i + 1}/{steps} loss {float(aux['loss']):.4f} "
            f"fvu {float(aux['mse']):.4f} bce {float(aux['bce']):.4f}{held_msg}")
        ckpt.save(i + 1, state)
  return state["best"] if n_hold else state["params"]


def targets(params: Any, tables: backbones.Tables, items: np.ndarray) -> jnp.ndarray:
  """[n, d] pretrained ID embeddings of item indices [n] (the alignment targets).

  Args:
    params: the pretrained backbone's parameters.
    tables: its feature tables.
    items: [n] item indices.

  Returns:
    [n, d] their ID embeddings.
  """
  return jnp.take(backbones.item_embedding_table(params),
                  backbones.item_ids(tables, jnp.asarray(items)), axis=0)


def config_options(cfg: Any) -> tuple[str, str, int, dict[str, Any]]:
  """(kind, shrink, folds, closed-form options) of an ``align`` config section."""
  opts = {"ridge_lambda": float(cfg.get("ridge_lambda", 0.0)),
          "rank": int(cfg.get("rank", 0)), "knn_k": int(cfg.get("knn_k", 0)),
          "knn_temperature": float(cfg.get("knn_temperature", 0.0))}
  return (str(cfg.get("kind", "mlp")), str(cfg.get("shrink", "none")),
          int(cfg.get("folds", 5)), opts)


def fit_mlp(r: jnp.ndarray, e: jnp.ndarray, key: jax.Array, hidden: Sequence[int] = (64,),
            steps: int = 500, lr: float = 3e-3, weight_decay: float = 1e-4) -> Any:
  """The MLP mapper on the MSE term alone (full batch, AdamW): Mapper variables.

  ``train_mapper`` adds the BCE term over rows; this is the version the
  diagnostics can refit per fold without a backbone.

  Args:
    r: [n, D] inputs.
    e: [n, d] targets.
    key: PRNG key of the init.
    hidden: hidden layer sizes.
    steps: full-batch AdamW steps.
    lr: learning rate.
    weight_decay: AdamW decay.

  Returns:
    The Mapper's variables.
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


def apply(kind: str, params: Any, r: jnp.ndarray) -> jnp.ndarray:
  """The fitted map of ``kind`` (``KINDS``) on r [..., D] -> [..., d].

  ``mlp`` rebuilds the ``Mapper`` from its parameters' shapes; the other
  kinds are ``closedform.apply``.

  Args:
    kind: one of ``KINDS``.
    params: the fitted map's params.
    r: [..., D] inputs.

  Returns:
    [..., d] predictions.
  """
  if kind == "mlp":
    layers = sorted(params["params"], key=lambda n: int(n.split("_")[-1]))
    widths = [params["params"][n]["kernel"].shape[-1] for n in layers]
    return Mapper(out_dim=widths[-1], hidden=tuple(widths[:-1])).apply(params, r)
  if kind not in KINDS:
    raise ValueError(f"align.kind must be one of {KINDS}, got {kind!r}")
  return closedform.apply(kind, params, r)
