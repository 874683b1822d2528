"""MetaEmb: the inner step is one SGD step, the vmapped meta loss is the task loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import methods, tasks, train
from emerflow_jax.baselines import metaemb
from emerflow_jax.models import backbones


@pytest.fixture
def ctx(tiny_context):
  """The shared tiny world and its pretrained DeepFM."""
  return tiny_context(**{"metaemb.epochs": 2, "metaemb.batch_tasks": 8})


def _field_stack(ctx, users, items, item_emb):
  """[R, F, d] field embeddings computed by hand (lookup, sum-pool sequences)."""
  embed = ctx.params["params"]["embed"]
  out = []
  for key, _ in ctx.model.vocab_sizes:
    if key == backbones.ITEM_ID:
      out.append(jnp.broadcast_to(item_emb, (len(users), item_emb.shape[-1])))
      continue
    ids = ctx.tables[key][users if key.startswith("user/") else items]
    vecs = embed[key.replace("/", "_")][ids]
    if ids.ndim == 2:
      vecs = (vecs * (ids > 0)[..., None]).sum(1)
    out.append(vecs)
  return jnp.stack(out, 1)


def test_inner_step_is_one_hand_computed_sgd_step(tiny_ds, tiny_split, random_params,
                                                  tiny_context, tmp_path):
  model = backbones.make_backbone("fm", tiny_ds, 4)
  tables = backbones.make_tables(tiny_ds)
  config = tiny_context(**{"metaemb.epochs": 2, "metaemb.batch_tasks": 8}).config
  ctx = methods.context_for(config, tiny_ds, tiny_split, model, tables,
                            random_params(model, tables), jax.random.key(1), tmp_path)
  rows = tasks.pack_rows(ctx.ds, [ctx.split.meta_chunks[0][0]], 8)
  rows = {k: jnp.asarray(v[0]) for k, v in rows.items()}
  rows["mask"] = rows["mask"].at[-1].set(0.0)  # a padded row must not count
  emb = jax.random.normal(jax.random.key(3), (ctx.dim,)) * 0.1
  lr = 0.5
  # FM: logit = <W, flat(e)> + b + 0.5 * sum((sum_f e_f)^2 - sum_f e_f^2), so
  # d logit / d e_item = W[item slot] + sum of the other fields' embeddings.
  slot = [k for k, _ in ctx.model.vocab_sizes].index(backbones.ITEM_ID)

  @jax.jit
  def by_hand(emb):
    stack = _field_stack(ctx, rows["users"], rows["items"], emb)
    w = ctx.params["params"]["linear"]["kernel"][:, 0].reshape(-1, ctx.dim)[slot]
    dlogit = w + stack.sum(1) - emb
    logits = backbones.score(ctx.model, ctx.params, ctx.tables, rows["users"],
                             rows["items"], jnp.broadcast_to(emb, stack[:, 0].shape))
    resid = (jax.nn.sigmoid(logits) - rows["labels"]) * rows["mask"] / rows["mask"].sum()
    return emb - lr * (resid[:, None] * dlogit).sum(0)

  want = by_hand(emb)
  got = jax.jit(metaemb.inner_step, static_argnums=0)(
      ctx.model, ctx.params, ctx.tables, emb, rows, lr)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_vmapped_meta_loss_equals_task_loop(ctx):
  rng = np.random.default_rng(0)
  all_tasks = tasks.build_meta_tasks(ctx.ds, ctx.split, 5, 10, rng)
  batch = tasks.pad_tasks({k: v[:7] for k, v in all_tasks.items()}, 8)  # 1 padded
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  gen = metaemb.TwoLayer(hidden=8, out=ctx.dim)
  side = metaemb.side_embeddings(ctx.params["params"]["embed"], ctx.tables, batch["item"])
  # jit rebuilds the tables dict in sorted key order; the fields must not move.
  np.testing.assert_array_equal(side, jax.jit(metaemb.side_embeddings)(
      ctx.params["params"]["embed"], ctx.tables, batch["item"]))
  gen_params = gen.init(jax.random.key(0), side)
  # Larger weights than the U(-0.01, 0.01) init, so every term matters.
  gen_params = jax.tree.map(lambda x: x * 30.0, gen_params)
  args = (ctx.model, ctx.params, ctx.tables)
  real = {k: v for k, v in batch.items() if k != "task_mask"}
  one = jax.jit(lambda p, t: metaemb.task_loss(gen, p, *args, t, 0.5, 0.1))
  one_grad = jax.jit(jax.grad(lambda p, t: metaemb.task_loss(gen, p, *args, t, 0.5, 0.1)))
  vm, g_vm = jax.jit(jax.value_and_grad(
      lambda p: metaemb.meta_loss(gen, p, *args, batch, 0.5, 0.1)))(gen_params)
  loop, g_loop = 0.0, jax.tree.map(jnp.zeros_like, gen_params)
  for t in range(7):  # the real tasks; the padded one must add nothing
    task = {k: v[t] for k, v in real.items()}
    loop += one(gen_params, task) / 7
    g_loop = jax.tree.map(lambda a, b: a + b / 7, g_loop, one_grad(gen_params, task))
  np.testing.assert_allclose(vm, loop, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_vm), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_end_to_end_and_resume(ctx):
  method = metaemb.MetaEmb()
  state = method.fit(ctx)
  sp = ctx.split
  out, _ = train.evaluate_items(method, ctx, state, sp.emerging_items, sp.warm_rows,
                                sp.test_rows, sp.test_owner)
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in out["auc"].values())
  # A second fit finds the finished checkpoint and trains nothing more.
  again = method.fit(ctx)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  cold = method.cold(ctx, state, sp.emerging_items)
  assert cold.shape == (len(sp.emerging_items), ctx.dim)
  # Items with different side fields get different cold embeddings.
  assert float(jnp.std(cold, axis=0).max()) > 0
