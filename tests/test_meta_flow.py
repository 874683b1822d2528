"""Tests of flow meta-tasks and the pooled pairwise AUC outer loss.

A flow task replays the protocol on one old item: warm phases a, b, c in
sequence, one step size per phase, the later rows as the query.  The shared
``world`` (backbone, mapper, chunk tasks) comes from test_meta.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import meta, rank_loss, rule, tasks
from emerflow_jax.models import scoring

from test_meta import _garble_padding, _jit_value_and_grad, _one_task, world  # pylint: disable=unused-import


@pytest.fixture(scope="module")
def flow(world):
  all_tasks = tasks.build_flow_tasks(world["ds"], world["split"], 4, 6,
                                     np.random.default_rng(0))
  batch = tasks.pad_tasks({k: v[:5] for k, v in all_tasks.items()}, 8)
  meta_params = dict(world["meta_params"],
                     log_alpha=jnp.log(jnp.asarray([[0.4] * 4, [0.2] * 4, [0.1] * 4])))
  return dict(batch={k: jnp.asarray(v) for k, v in batch.items()}, meta_params=meta_params)


def _flow_cfg(**kw):
  return meta.MetaConfig(**dict(dict(inner_steps=2, phase_alpha=True, rule="adam"), **kw))


@pytest.mark.parametrize("first_order", [False, True])
def test_flow_vmapped_loss_and_grad_equal_task_loop(world, flow, first_order):
  cfg = _flow_cfg(first_order=first_order)
  args = (world["model"], world["mapper"], cfg, world["frozen"])
  b = flow["batch"]
  (loss, _), grads = _jit_value_and_grad(meta.batch_loss)(flow["meta_params"], *args, b)
  real = int(b["task_mask"].sum())
  one = _jit_value_and_grad(meta.task_loss)  # one program for every task
  outs = [one(flow["meta_params"], *args, _one_task(b, i)) for i in range(real)]
  np.testing.assert_allclose(loss, np.mean([o[0][0] for o in outs]), rtol=1e-5, atol=1e-6)
  mean_g = jax.tree.map(lambda *g: sum(g) / real, *[o[1] for o in outs])
  for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_g)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_flow_task_is_phases_in_sequence_with_their_own_step_sizes(world, flow):
  """flow_task_loss == adapting phase by phase by hand, alpha_p in phase p."""
  cfg = _flow_cfg(beta=0.3)
  task = _one_task(flow["batch"], 0)
  fr = world["frozen"]
  loss_fn = functools.partial(scoring.item_loss, world["model"], fr["params"], fr["tables"])
  rows = lambda prefix, p=None: {k: (task[f"{prefix}/{k}"] if p is None
                                     else task[f"{prefix}/{k}"][p])
                                 for k in ("users", "items", "labels", "mask")}
  e = meta.cold_embedding(flow["meta_params"], world["mapper"], fr, task["item"])
  l0 = loss_fn(e, rows("support", 0))
  alphas = rule.step_size(flow["meta_params"])
  q = []
  for p in range(3):
    e = rule.adapt(loss_fn, e, rows("support", p), alphas[p], 2, rule="adam")
    q.append(loss_fn(e, rows("query")))
  want = 0.3 * l0 + 0.7 * np.mean(q)
  got, aux = meta.task_loss(flow["meta_params"], world["model"], world["mapper"], cfg, fr,
                            task)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(aux["query_e1"], q[0], rtol=1e-5)
  assert len(set(np.round(q, 6))) == 3  # each phase moved the embedding


def test_phase_step_size_gradients_match_finite_differences(world, flow):
  cfg = _flow_cfg()
  task = _one_task(flow["batch"], 1)
  args = (world["model"], world["mapper"], cfg, world["frozen"])

  @jax.jit
  def outer(log_alpha):
    return meta.task_loss(dict(flow["meta_params"], log_alpha=log_alpha), *args, task)[0]

  la = flow["meta_params"]["log_alpha"]
  g = jax.grad(outer)(la)
  eps = 2e-3
  for p in range(3):
    for j in (0, 3):
      d = jnp.zeros_like(la).at[p, j].set(eps)
      fd = (outer(la + d) - outer(la - d)) / (2 * eps)
      np.testing.assert_allclose(g[p, j], fd, rtol=5e-2, atol=2e-4)
  assert float(jnp.abs(g).max()) > 1e-5


def test_flow_padded_rows_and_tasks_have_no_effect(world, flow):
  for outer_loss in ("bce", "auc"):
    cfg = _flow_cfg(outer_loss=outer_loss)
    args = (flow["meta_params"], world["model"], world["mapper"], cfg, world["frozen"])
    b = flow["batch"]
    loss, _ = meta.batch_loss(*args, b)
    dead = b["task_mask"] == 0
    assert int(dead.sum()) > 0
    loss2, _ = meta.batch_loss(*args, _garble_padding(b))
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)


def test_pairwise_auc_loss_matches_a_loop_over_pairs():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 5)).astype(np.float32)
  y = (rng.random((3, 5)) < 0.5).astype(np.float32)
  m = (rng.random((3, 5)) < 0.8).astype(np.float32)
  total, n = 0.0, 0
  for i in range(15):
    for j in range(15):
      a, b = divmod(i, 5), divmod(j, 5)
      if m[a] and m[b] and y[a] == 1 and y[b] == 0:
        total += np.log1p(np.exp(s[b] - s[a]))
        n += 1
  np.testing.assert_allclose(rank_loss.pairwise_auc_loss(s, y, m), total / n, rtol=1e-5)
  # Perfectly ordered, widely separated scores: loss ~0; reversed: large.
  y1 = np.array([1, 1, 0, 0], np.float32)
  good = rank_loss.pairwise_auc_loss(np.array([9., 8., -8., -9.]), y1, np.ones(4))
  bad = rank_loss.pairwise_auc_loss(np.array([-9., -8., 8., 9.]), y1, np.ones(4))
  assert float(good) < 1e-6 < 16 < float(bad)
  assert float(rank_loss.pairwise_auc_loss(s, np.ones_like(y), m)) == 0.0  # no pair
  # Blockwise (memory-bounded) summation: same value and gradient.
  dense = jax.value_and_grad(rank_loss.pairwise_auc_loss)(s, y, m)
  for block in (4, 7):
    blocked = jax.value_and_grad(rank_loss.pairwise_auc_loss)(s, y, m, block)
    np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-6)
    np.testing.assert_allclose(blocked[1], dense[1], rtol=1e-5, atol=1e-7)


def _small_pool(seed=0, n=14):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(2, n // 2)).astype(np.float32) * 2
  y = (rng.random((2, n // 2)) < 0.4).astype(np.float32)
  m = (rng.random((2, n // 2)) < 0.8).astype(np.float32)
  return s, y, m


def test_sampled_pairs_give_the_exact_loss_and_gradient_in_expectation():
  s, y, m = _small_pool()
  exact, g_exact = jax.value_and_grad(rank_loss.pairwise_auc_loss)(s, y, m)
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  vals, grads = jax.jit(jax.vmap(jax.value_and_grad(rank_loss.sampled_pairwise_auc_loss),
                                 in_axes=(None, None, None, 0, None)), static_argnums=4)(
      s, y, m, keys, 2)
  vals, grads = np.asarray(vals, np.float64), np.asarray(grads, np.float64)
  se = vals.std() / np.sqrt(draws)
  assert vals.std() > 1e-3  # the estimate is random: the check can fail
  assert abs(vals.mean() - float(exact)) < 5 * se
  g_se = grads.std(0) / np.sqrt(draws)
  real = np.asarray(m) > 0
  z = np.abs(grads.mean(0) - np.asarray(g_exact))[real] / np.maximum(g_se[real], 1e-9)
  assert z.max() < 5.5, z
  # Masked rows get no gradient in any draw.
  assert np.all(grads[:, ~real] == 0)
  # The check has power: a 5 % bias would be caught.
  assert abs(vals.mean() * 1.05 - float(exact)) > 5 * se


def test_sampled_pairs_are_exact_with_one_pair_and_ignore_masked_rows():
  s = np.array([0.3, -1.2, 5.0, 2.0], np.float32)
  y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  m = np.array([1.0, 1.0, 0.0, 0.0], np.float32)  # one positive, one negative
  key = jax.random.key(3)
  exact = jax.value_and_grad(rank_loss.pairwise_auc_loss)(s, y, m)
  got = jax.value_and_grad(rank_loss.sampled_pairwise_auc_loss)(s, y, m, key, 3)
  np.testing.assert_allclose(got[0], exact[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], exact[1], rtol=1e-6, atol=1e-8)
  s2, y2, m2 = _small_pool(1)
  garbled = np.where(m2 == 0, 100.0, s2).astype(np.float32)
  y_garbled = np.where(m2 == 0, 1.0 - y2, y2).astype(np.float32)
  np.testing.assert_allclose(rank_loss.sampled_pairwise_auc_loss(s2, y2, m2, key, 4),
                             rank_loss.sampled_pairwise_auc_loss(garbled, y_garbled, m2, key, 4),
                             rtol=1e-6)
  assert float(rank_loss.sampled_pairwise_auc_loss(s2, np.ones_like(y2), m2, key, 4)) == 0.0


def test_sampled_auc_outer_loss_needs_a_key_and_follows_the_exact_one(world, flow):
  b = flow["batch"]
  args = (flow["meta_params"], world["model"], world["mapper"])
  exact, _ = meta.batch_loss(*args, _flow_cfg(outer_loss="auc"), world["frozen"], b)
  cfg = _flow_cfg(outer_loss="auc", auc_pairs=64)
  with pytest.raises(ValueError, match="need a key"):
    meta.batch_loss(*args, cfg, world["frozen"], b)
  f = jax.jit(lambda k: meta.batch_loss(*args, cfg, world["frozen"], b, k)[0])
  a, c = f(jax.random.key(0)), f(jax.random.key(1))
  assert float(a) != float(c)
  np.testing.assert_allclose(a, exact, rtol=0.05)


def test_auc_outer_loss_pools_the_query_rows_of_every_task(world, flow):
  """batch_loss("auc") == beta * mean support BCE + (1-beta) * mean_p pooled pairs."""
  cfg = _flow_cfg(outer_loss="auc", beta=0.2)
  b = flow["batch"]
  args = (world["model"], world["mapper"], cfg, world["frozen"])
  real = int(b["task_mask"].sum())
  per = [meta.task_loss(flow["meta_params"], *args, _one_task(b, i))[1] for i in range(real)]
  logits = np.stack([np.asarray(a["query_logits"]) for a in per])  # [n, P, Q]
  labels = np.asarray(b["query/labels"][:real])
  mask = np.asarray(b["query/mask"][:real])
  rank = np.mean([rank_loss.pairwise_auc_loss(logits[:, p], labels, mask) for p in range(3)])
  want = 0.2 * np.mean([a["support_e0"] for a in per]) + 0.8 * rank
  got, metrics = meta.batch_loss(flow["meta_params"], *args, b)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["query_rank"], rank, rtol=1e-5)


def test_phase_alpha_needs_flow_tasks(world):
  b = {k: jnp.asarray(v) for k, v in world["batch"].items()}
  with pytest.raises(ValueError, match="flow tasks"):
    meta.batch_loss(world["meta_params"], world["model"], world["mapper"],
                    _flow_cfg(), world["frozen"], b)
  with pytest.raises(ValueError, match="bce or auc"):
    meta.batch_loss(world["meta_params"], world["model"], world["mapper"],
                    meta.MetaConfig(outer_loss="hinge"), world["frozen"], b)


def test_adapt_items_uses_the_step_size_of_its_phase(world, flow):
  cfg = _flow_cfg(inner_steps=3)
  ds, split = world["ds"], world["split"]
  batch = {k: jnp.asarray(v) for k, v in
           tasks.pack_phase(ds, split.warm_rows["warm_b"]).items()}
  emb = jax.random.normal(jax.random.key(2), (batch["users"].shape[0], 4)) * 0.1
  fr = world["frozen"]
  shared = dict(flow["meta_params"], log_alpha=flow["meta_params"]["log_alpha"][1])
  want = rule.adapt_items(shared, world["model"], meta.MetaConfig(inner_steps=3, rule="adam"),
                          fr, emb, batch)
  got = rule.adapt_items(flow["meta_params"], world["model"], cfg, fr, emb, batch, 1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  other = rule.adapt_items(flow["meta_params"], world["model"], cfg, fr, emb, batch, 2)
  assert not np.allclose(other, want)
  assert rule.adapt_items._cache_size() >= 1
  n = rule.adapt_items._cache_size()
  rule.adapt_items(flow["meta_params"], world["model"], cfg, fr, emb, batch, 0)
  assert rule.adapt_items._cache_size() == n  # the phase is traced, not static


def test_cold_phase_joins_the_outer_average(world, flow):
  """cold_in_outer: the query loss at e_0 is averaged with the P warm phases."""
  args = (flow["meta_params"], world["model"], world["mapper"])
  task = _one_task(flow["batch"], 2)
  fr = world["frozen"]
  warm, aux = meta.task_loss(*args, _flow_cfg(beta=0.2), fr, task)
  both, aux2 = meta.task_loss(*args, _flow_cfg(beta=0.2, cold_in_outer=True), fr, task)
  # outer = 0.2 * support + 0.8 * mean(phases): recover the phase means and compare.
  mean_warm = (warm - 0.2 * aux["support_e0"]) / 0.8
  mean_both = (both - 0.2 * aux2["support_e0"]) / 0.8
  np.testing.assert_allclose(mean_both, (aux["query_e0"] + 3 * mean_warm) / 4, rtol=1e-5)
  assert aux2["query_logits"].shape[0] == 4 and aux["query_logits"].shape[0] == 3
