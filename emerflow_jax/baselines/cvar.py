"""CVAR (Zhao et al., SIGIR 2022): a conditional VAE from side information to the ID embedding.

Following the authors' final code (``model/warm.py`` and ``main.py`` of the
CVAR repository):

* an encoder q(z | e) from the ID embedding e and a prior p(z | side) from the
  side information, both Gaussian with one linear layer per moment;
* a decoder from z (and here the side information) back to an embedding;
* the loss on a minibatch of rows is
  ``BCE(backbone(x, decode(z_p))) + recon * ||decode(z) - e||^2 + wass * W``,
  with W the batch-summed 2-Wasserstein distance between the two Gaussians
  and z, z_p sampled with noise scaled by 1e-4;
* each minibatch takes ``iters`` Adam steps; a fresh Adam starts per call;
* the side input has its own trainable copy of the item side-field tables and
  its own item-ID table, so the generator can learn from an item's rows
  without touching the frozen backbone.

Cold: the CVAE is trained for ``epochs`` on old-item rows and a new item's
embedding is decoded from its prior.  After each warm phase: the shared
fine-tuning, then the CVAE is trained on that phase's rows (the now fine-tuned
embeddings are the reconstruction targets), then the embeddings are
regenerated from the prior and blended with the fine-tuned ones:
``keep * tuned + (1 - keep) * regenerated``.  CVAR replaces (keep = 0); on the
ML-100K validation items keeping 0.8 of the fine-tuned embedding was best, and
is the config default.

Deviations, each forced by the protocol: CVAR's decoder also reads the item's
total interaction count (``count``), which would leak an emerging item's future
(DESIGN §1), so it reads the side embedding instead; the side tables start from
the backbone's (CVAR starts them at N(0, 1)), and the own ID table starts at
zero, so an item with no rows yet contributes nothing through it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import methods
from emerflow_jax.baselines import metaemb
from emerflow_jax.models import backbones


class CVAE(nn.Module):
  """Posterior q(z|e), prior p(z|side) and decoder (z, side) -> e.

  Attributes:
    latent: dimension of z.
    out: embedding dimension d.
  """
  latent: int
  out: int

  def setup(self):
    init = metaemb.uniform_init(0.01)
    dense = functools.partial(nn.Dense, kernel_init=init, bias_init=init)
    self.enc_mean, self.enc_logv = dense(self.latent), dense(self.latent)
    self.prior_mean, self.prior_logv = dense(self.latent), dense(self.latent)
    self.dec = dense(self.out)

  def posterior(self, emb):
    return self.enc_mean(emb), self.enc_logv(emb)

  def prior(self, side):
    return self.prior_mean(side), self.prior_logv(side)

  def decode(self, z, side):
    """Embeddings decoded from latents and side inputs.

    Args:
      z: [..., latent] latent codes.
      side: [..., S] side inputs (``side_input``).

    Returns:
      [..., out] embeddings.
    """
    return self.dec(jnp.concatenate([z, side], -1))

  def __call__(self, emb, side):  # only for init: touches every layer
    mean, _ = self.posterior(emb)
    self.prior(side)
    return self.decode(mean, side)


def side_input(p: dict, tables: backbones.Tables, items: jnp.ndarray) -> jnp.ndarray:
  """S + [F * d (+ d)]: the CVAE's own side-field embeddings (and own ID row).

  Args:
    p: the CVAE's parameters (``CVAR.init_params``): "fields" (its own copy of
      the side-field tables by parameter name) and, if ``cvar.own_id``,
      "own_id" [n_ids, d].
    tables: feature tables.
    items: S int item indices.

  Returns:
    S + [F * d], or S + [F * d + d] with the own ID row appended, F the number
    of item side fields.
  """
  side = metaemb.side_embeddings(p["fields"], tables, items)
  if "own_id" in p:
    own = jnp.take(p["own_id"], backbones.item_ids(tables, items), axis=0)
    side = jnp.concatenate([side, own], -1)
  return side


def wasserstein(mean1, logv1, mean2, logv2) -> jnp.ndarray:
  """[B] squared 2-Wasserstein distance between diagonal Gaussians.

  Args:
    mean1: [B, z] means of the first Gaussians.
    logv1: [B, z] their log variances.
    mean2: [B, z] means of the second Gaussians.
    logv2: [B, z] their log variances.

  Returns:
    [B] distances, summed over the latent dimensions.
  """
  return (((mean1 - mean2) ** 2).sum(-1)
          + ((jnp.exp(0.5 * logv1) - jnp.exp(0.5 * logv2)) ** 2).sum(-1))


def generate(cvae: CVAE, p: dict, tables: backbones.Tables, items: jnp.ndarray,
             key: jax.Array, noise: float) -> jnp.ndarray:
  """[n, d] embeddings decoded from the prior p(z | side) of items [n].

  Args:
    cvae: the CVAE module.
    p: the CVAE's parameters ("nets", "fields", optional "own_id").
    tables: feature tables.
    items: [n] item indices.
    key: PRNG key of the latent sample.
    noise: scale of the sample's standard deviation (0 decodes the prior mean).

  Returns:
    [n, d] embeddings.
  """
  side = side_input(p, tables, items)
  mean, logv = cvae.apply(p["nets"], side, method=CVAE.prior)
  z = mean + noise * jnp.exp(0.5 * logv) * jax.random.normal(key, mean.shape)
  return cvae.apply(p["nets"], z, side, method=CVAE.decode)


def loss_terms(cvae: CVAE, p: dict, model: backbones.Backbone, params: Any,
               tables: backbones.Tables, rows: dict[str, jnp.ndarray],
               key: jax.Array, noise: float) -> dict[str, jnp.ndarray]:
  """CVAR's three loss terms on a minibatch of rows.

  Args:
    cvae: the CVAE module.
    p: the CVAE's parameters (trained).
    model: the backbone module.
    params: the frozen backbone's parameters.
    tables: feature tables.
    rows: "users", "items", "labels" [B] and "target" [B, d] (the ID
      embedding of each row's item, the reconstruction target).
    key: PRNG key of the two latent samples.
    noise: scale of the samples' standard deviation.

  Returns:
    {"main": BCE with the prior-decoded embedding, "recon": mean squared
    reconstruction error, "wass": batch-summed Wasserstein distance}.
  """
  side = side_input(p, tables, rows["items"])
  mean, logv = cvae.apply(p["nets"], rows["target"], method=CVAE.posterior)
  mean_p, logv_p = cvae.apply(p["nets"], side, method=CVAE.prior)
  k1, k2 = jax.random.split(key)
  z = mean + noise * jnp.exp(0.5 * logv) * jax.random.normal(k1, mean.shape)
  z_p = mean_p + noise * jnp.exp(0.5 * logv_p) * jax.random.normal(k2, mean.shape)
  recon = cvae.apply(p["nets"], z, side, method=CVAE.decode)
  emb_p = cvae.apply(p["nets"], z_p, side, method=CVAE.decode)
  logits = backbones.score(model, params, tables, rows["users"], rows["items"], emb_p)
  return {"main": backbones.bce_loss(logits, rows["labels"]),
          "recon": ((recon - rows["target"]) ** 2).sum(-1).mean(),
          "wass": wasserstein(mean, logv, mean_p, logv_p).sum()}


@functools.partial(jax.jit, static_argnames=("cvae", "model", "tx", "batch_size",
                                             "iters", "recon_w", "wass_w", "noise"))
def train_epoch(cvae: CVAE, model: backbones.Backbone, tx: optax.GradientTransformation,
                p: dict, opt_state: Any, params: Any, tables: backbones.Tables,
                rows: dict[str, jnp.ndarray], key: jax.Array, batch_size: int,
                iters: int, recon_w: float, wass_w: float, noise: float
                ) -> tuple[dict, Any, dict[str, jnp.ndarray]]:
  """One shuffled pass over rows [R], ``iters`` Adam steps per minibatch.

  Args:
    cvae: the CVAE module (static).
    model: the backbone module (static).
    tx: the optimizer (static; one object per learning rate, see ``_adam``).
    p: the CVAE's parameters.
    opt_state: ``tx``'s state for ``p``.
    params: the frozen backbone's parameters.
    tables: feature tables.
    rows: "users", "items", "labels" [R] and "target" [R, d].
    key: PRNG key of the shuffle and the latent samples.
    batch_size: rows per minibatch; the last R mod batch_size shuffled rows
      are dropped.
    iters: Adam steps per minibatch.
    recon_w: weight of the reconstruction term.
    wass_w: weight of the Wasserstein term.
    noise: scale of the latent samples' standard deviation.

  Returns:
    (p, opt_state, {"main", "recon", "wass", "loss"} each [n_batches, iters]).
  """
  n_batches = rows["users"].shape[0] // batch_size
  k_perm, k_steps = jax.random.split(key)
  perm = jax.random.permutation(k_perm, rows["users"].shape[0])
  perm = perm[:n_batches * batch_size].reshape(n_batches, batch_size)

  def total(p, batch, k):
    terms = loss_terms(cvae, p, model, params, tables, batch, k, noise)
    loss = terms["main"] + recon_w * terms["recon"] + wass_w * terms["wass"]
    return loss, dict(terms, loss=loss)

  def batch_step(carry, xs):
    idx, b = xs
    batch = {k: v[idx] for k, v in rows.items()}

    def iter_step(c, i):
      p, opt = c
      k = jax.random.fold_in(jax.random.fold_in(k_steps, b), i)
      grads, terms = jax.grad(total, has_aux=True)(p, batch, k)
      upd, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, upd), opt), terms

    return jax.lax.scan(iter_step, carry, jnp.arange(iters))

  (p, opt_state), terms = jax.lax.scan(batch_step, (p, opt_state),
                                       (perm, jnp.arange(n_batches)))
  return p, opt_state, terms


class CVAR(methods.Method):
  """CVAE generator, re-trained on each warm phase's rows."""
  name = "cvar"

  def plan(self, config: ml_collections.ConfigDict) -> methods.Plan:
    from emerflow_jax import space  # pylint: disable=g-import-not-at-top
    return methods.Plan(sections=("cvar",), search_space=dict(
        methods.warmup_space(), **{"cvar.keep": space.Float(0.0, 1.0),
                                   "cvar.iters": space.Int(1, 20),
                                   "cvar.lr": space.Float(1e-4, 1e-2, log=True)}))

  def _cvae(self, ctx: methods.Context) -> CVAE:
    return CVAE(latent=int(ctx.config.cvar.latent_dim), out=ctx.dim)

  def init_params(self, ctx: methods.Context, key: jax.Array) -> dict:
    """The CVAE's own parameters: nets, side-field tables (and own ID table).

    Args:
      ctx: the run's context (backbone parameters, tables, ``cvar`` config).
      key: PRNG key of the nets' initialisation.

    Returns:
      {"fields": copies of the backbone's side-field tables, "own_id": zeros
      like the backbone's ID table (only if ``cvar.own_id``), "nets": the CVAE's
      Flax variables}.
    """
    embed = metaemb.backbone_embed(ctx.params)
    fields = {k.replace("/", "_"): embed[k.replace("/", "_")]
              for k in metaemb.side_fields(ctx.tables)}
    p = {"fields": fields}
    if ctx.config.cvar.own_id:
      p["own_id"] = jnp.zeros_like(backbones.item_embedding_table(ctx.params))
    side = side_input(p, ctx.tables, jnp.asarray(ctx.split.old_items[:1]))
    p["nets"] = self._cvae(ctx).init(key, jnp.zeros((1, ctx.dim)), side)
    return p

  def train(self, ctx: methods.Context, p: dict, rows: dict[str, jnp.ndarray],
            epochs: int, key: jax.Array) -> tuple[dict, list[dict[str, float]]]:
    """Trains the CVAE on rows for some epochs with a fresh Adam (as CVAR does).

    Args:
      ctx: the run's context (``cvar`` config, backbone).
      p: the CVAE's parameters to start from.
      rows: "users", "items", "labels" [R] and "target" [R, d].
      epochs: passes over ``rows``.
      key: PRNG key; epoch e uses ``fold_in(key, e)``.

    Returns:
      (params, per-epoch mean of each loss term).
    """
    cfg = ctx.config.cvar
    tx = _adam(float(cfg.lr))
    opt_state = tx.init(p)
    batch_size = min(int(cfg.batch_size), int(rows["users"].shape[0]))
    history = []
    for e in range(epochs):
      p, opt_state, terms = train_epoch(
          self._cvae(ctx), ctx.model, tx, p, opt_state, ctx.params, ctx.tables, rows,
          jax.random.fold_in(key, e), batch_size=batch_size, iters=int(cfg.iters),
          recon_w=float(cfg.recon_weight), wass_w=float(cfg.wass_weight),
          noise=float(cfg.noise))
      history.append({k: float(v.mean()) for k, v in terms.items()})
    return p, history

  def fit(self, ctx: methods.Context) -> Any:
    k_init, k_train, k_gen = jax.random.split(ctx.key, 3)
    p = self.init_params(ctx, k_init)
    rows = ctx.split.base_rows
    items = jnp.asarray(ctx.ds.items[rows])
    table = backbones.item_embedding_table(ctx.params)
    data = {"users": jnp.asarray(ctx.ds.users[rows]), "items": items,
            "labels": jnp.asarray(ctx.ds.labels[rows]),
            "target": jnp.take(table, backbones.item_ids(ctx.tables, items), axis=0)}
    p, history = self.train(ctx, p, data, int(ctx.config.cvar.epochs), k_train)
    for e, h in enumerate(history):
      logging.info("cvar: epoch %d loss %.4f (main %.4f recon %.4f wass %.1f)",
                   e + 1, h["loss"], h["main"], h["recon"], h["wass"])
    return {"params": p, "key": k_gen, "history": history}

  def cold(self, ctx: methods.Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Implements ``methods.Method.cold``: decodes each item's prior.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned ("params", "key").
      items: [n] item ids.

    Returns:
      [n, d] embeddings decoded from p(z | side), sampled with key 0.
    """
    return _generate(self._cvae(ctx), state["params"], ctx.tables, jnp.asarray(items),
                     jax.random.fold_in(state["key"], 0), float(ctx.config.cvar.noise))

  def refine(self, ctx: methods.Context, state: Any, emb: jnp.ndarray,
             batch: dict[str, np.ndarray], items: np.ndarray, phase: int
             ) -> tuple[jnp.ndarray, Any]:
    """Implements ``methods.Method.refine``: fine-tune, retrain, blend.

    Args:
      ctx: the run's context.
      state: "params", "key" (and "history") from ``fit`` or the last phase.
      emb: [n, d] current embeddings of ``items``.
      batch: the phase's rows, each [n, K], with "mask" [n, K].
      items: [n] item ids.
      phase: 0, 1, 2 for warm_a, warm_b, warm_c.

    Returns:
      (``keep * tuned + (1 - keep) * regenerated`` [n, d], the state with the
      CVAE retrained on this phase's rows).
    """
    cfg = ctx.config.cvar
    tuned, _ = super().refine(ctx, state, emb, batch, items, phase)
    key = jax.random.fold_in(state["key"], phase + 1)  # key 0 drew the cold sample
    k_train, k_gen = jax.random.split(key)
    n, k = batch["users"].shape
    owner = jnp.repeat(jnp.arange(n), k)
    mask = np.asarray(batch["mask"]).reshape(-1) > 0
    rows = {"users": jnp.asarray(batch["users"]).reshape(-1)[mask],
            "items": jnp.asarray(batch["items"]).reshape(-1)[mask],
            "labels": jnp.asarray(batch["labels"]).reshape(-1)[mask],
            "target": tuned[owner][mask]}
    p, _ = self.train(ctx, state["params"], rows, int(cfg.warm_epochs), k_train)
    fresh = _generate(self._cvae(ctx), p, ctx.tables, jnp.asarray(items), k_gen,
                      float(cfg.noise))
    keep = float(cfg.keep)
    return keep * tuned + (1.0 - keep) * fresh, dict(state, params=p)


_generate = jax.jit(generate, static_argnums=(0, 5))


@functools.lru_cache(maxsize=None)
def _adam(lr: float) -> optax.GradientTransformation:
  # One object per learning rate, so the jitted epoch (static on tx) compiles once.
  return optax.adam(lr)

