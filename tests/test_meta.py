"""Tests of the meta-learning core on chunk tasks: vmap == loop, gradients, masks.

The flow tasks (one step size per warm phase) and the pooled pairwise AUC
loss are tested in test_meta_flow.py, on the same ``world``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emerflow_jax import align, meta, protocol, rule, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones, scoring


@pytest.fixture(scope="module")
def world():
  ds = synthetic.make_synthetic(n_users=60, n_items=40, mean_count=40, seed=3)
  split = protocol.split_emerging_items(ds, n_max=30, k=4)
  model = backbones.make_backbone("deepfm", ds, dim=4, mlp=(8,))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(0))
  # Make the backbone non-trivial so gradients are not ~0.
  params = jax.tree.map(lambda p: p * 30.0, params)
  r = align.standardize(ds.item_vectors, split.old_items)
  frozen = {"params": params, "tables": tables, "r": jnp.asarray(r)}
  mapper = align.Mapper(out_dim=4, hidden=(8,))
  phi = mapper.init(jax.random.key(1), frozen["r"][:2])
  meta_params = {"phi": phi, "log_alpha": rule.init_alpha(0.5, "per_dim", 4)}
  all_tasks = tasks.build_meta_tasks(ds, split, 4, 6, np.random.default_rng(0))
  batch = tasks.pad_tasks({k: v[:6] for k, v in all_tasks.items()}, 8)
  return dict(ds=ds, split=split, model=model, frozen=frozen, mapper=mapper,
              meta_params=meta_params, batch=batch)


def _one_task(batch, i):
  return {k: v[i] for k, v in batch.items() if k != "task_mask"}


def _jit_value_and_grad(loss):
  """jit(value_and_grad(loss)) of ``loss(meta_params, model, mapper, cfg, ...)``."""
  return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2, 3))


def _garble_padding(b):
  """``b`` with junk in every padded row and every masked task."""
  garbled = dict(b)
  for side in ("support", "query"):
    m = b[f"{side}/mask"] == 0
    garbled[f"{side}/users"] = jnp.where(m, 7, b[f"{side}/users"])
    garbled[f"{side}/labels"] = jnp.where(m, 1.0, b[f"{side}/labels"])
  garbled["item"] = jnp.where(b["task_mask"] == 0, 3, b["item"])
  return garbled


@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_loss_and_grad_equal_task_loop(world, first_order):
  cfg = meta.MetaConfig(inner_steps=2, first_order=first_order)
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  args = (world["model"], world["mapper"], cfg, world["frozen"])
  (loss, _), grads = _jit_value_and_grad(meta.batch_loss)(world["meta_params"], *args, b)
  real = int(b["task_mask"].sum())
  loop_losses, loop_grads = [], []
  one = _jit_value_and_grad(meta.task_loss)  # one program for every task
  for i in range(real):
    (l, _), g = one(world["meta_params"], *args, _one_task(b, i))
    loop_losses.append(l)
    loop_grads.append(g)
  np.testing.assert_allclose(loss, np.mean(loop_losses), rtol=1e-5, atol=1e-6)
  mean_g = jax.tree.map(lambda *g: sum(g) / real, *loop_grads)
  for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_g)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_adapt_gradient_matches_finite_differences(world):
  """d L(query; e_T) / d alpha via jax.grad vs central differences."""
  b = _one_task({k: jnp.asarray(v) for k, v in world["batch"].items()}, 0)
  fr = world["frozen"]
  loss_fn = functools.partial(scoring.item_loss, world["model"], fr["params"], fr["tables"])
  sup = {k: b[f"support/{k}"] for k in ("users", "items", "labels", "mask")}
  qry = {k: b[f"query/{k}"] for k in ("users", "items", "labels", "mask")}
  e0 = jnp.linspace(-0.3, 0.3, 4)

  @jax.jit
  def outer(alpha, e0):
    return loss_fn(rule.adapt(loss_fn, e0, sup, alpha, steps=3), qry)

  alpha = jnp.full((4,), 0.7)
  g_alpha, g_e0 = jax.grad(outer, argnums=(0, 1))(alpha, e0)
  eps = 1e-2
  for j in range(4):
    d = jnp.zeros(4).at[j].set(eps)
    fd_a = (outer(alpha + d, e0) - outer(alpha - d, e0)) / (2 * eps)
    fd_e = (outer(alpha, e0 + d) - outer(alpha, e0 - d)) / (2 * eps)
    np.testing.assert_allclose(g_alpha[j], fd_a, rtol=5e-2, atol=2e-4)
    np.testing.assert_allclose(g_e0[j], fd_e, rtol=5e-2, atol=2e-4)
  assert float(jnp.abs(g_alpha).max()) > 1e-5  # the check is not vacuous


def test_padded_rows_and_tasks_have_no_effect(world):
  cfg = meta.MetaConfig(inner_steps=2)
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  args = (world["meta_params"], world["model"], world["mapper"], cfg, world["frozen"])
  loss, _ = meta.batch_loss(*args, b)
  dead = b["task_mask"] == 0
  assert int((b["support/mask"] == 0).sum()) > 0 and int(dead.sum()) > 0
  loss2, _ = meta.batch_loss(*args, _garble_padding(b))
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)


def test_first_order_differs_from_second_order_only_in_curvature(world):
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  grads = {}
  for fo in (False, True):
    cfg = meta.MetaConfig(inner_steps=2, first_order=fo)
    grads[fo] = jax.grad(lambda p: meta.batch_loss(
        p, world["model"], world["mapper"], cfg, world["frozen"], b)[0])(
            world["meta_params"])
  # Same loss value path, different gradients: the Hessian term is dropped.
  diff = max(float(jnp.abs(a - c).max()) for a, c in
             zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])))
  assert diff > 1e-7
  # With T = 0 inner steps the two variants coincide exactly.
  g0 = [jax.grad(lambda p: meta.batch_loss(
      p, world["model"], world["mapper"], meta.MetaConfig(inner_steps=0, first_order=fo),
      world["frozen"], b)[0])(world["meta_params"]) for fo in (False, True)]
  for a, c in zip(jax.tree.leaves(g0[0]), jax.tree.leaves(g0[1])):
    np.testing.assert_array_equal(a, c)


def test_train_step_learns_and_does_not_recompile(world):
  cfg = meta.MetaConfig(inner_steps=2)
  tx = optax.adam(1e-2)
  step = meta.make_train_step(world["model"], world["mapper"], cfg, tx)
  p = jax.tree.map(jnp.copy, world["meta_params"])  # the step donates its state
  state = {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  losses = []
  for _ in range(15):
    state, m = step(state, world["frozen"], b)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert step._cache_size() == 1  # one compiled program for every call


def test_adapt_items_equals_per_item_adapt(world):
  cfg = meta.MetaConfig(inner_steps=3)
  ds, split = world["ds"], world["split"]
  batch = {k: jnp.asarray(v) for k, v in
           tasks.pack_phase(ds, split.warm_rows["warm_a"]).items()}
  n = batch["users"].shape[0]
  emb = jax.random.normal(jax.random.key(2), (n, 4)) * 0.1
  fr = world["frozen"]
  out = rule.adapt_items(world["meta_params"], world["model"], cfg, fr, emb, batch)
  loss_fn = functools.partial(scoring.item_loss, world["model"], fr["params"], fr["tables"])
  for i in range(n):
    rows = {k: v[i] for k, v in batch.items()}
    e = rule.adapt(loss_fn, emb[i], rows, rule.step_size(world["meta_params"]), 3)
    # Entries reach |e| ~ 40 here: float32 rounding (batched against
    # unbatched, the prepared rows against the full forward pass) is ~1e-6
    # of that scale.
    np.testing.assert_allclose(out[i], e, rtol=1e-5, atol=1e-6 * float(jnp.abs(e).max()))


def test_shrink_pulls_the_mapped_prior_toward_the_center(world):
  fr = dict(world["frozen"], center=jnp.asarray([0.5, -0.5, 0.25, 0.0]))
  items = jnp.asarray([0, 3, 5])
  g = meta.cold_embedding(world["meta_params"], world["mapper"], fr, items)
  for s in (1.0, 0.3, 0.0):
    p = dict(world["meta_params"], shrink=jnp.asarray(s))
    got = meta.cold_embedding(p, world["mapper"], fr, items)
    np.testing.assert_allclose(got, fr["center"] + s * (g - fr["center"]), rtol=1e-6,
                               atol=1e-7)
  # The shrink gets an outer gradient even when the mapper itself is frozen.
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  p = dict(world["meta_params"], shrink=jnp.asarray(0.8))
  cfg = meta.MetaConfig(inner_steps=2, train_init=False)
  grads = jax.grad(lambda q: meta.batch_loss(q, world["model"], world["mapper"], cfg, fr,
                                             b)[0])(p)
  assert float(jnp.abs(grads["shrink"])) > 1e-6
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(grads["phi"]))
