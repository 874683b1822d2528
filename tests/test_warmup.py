"""Tests for the batched per-phase refinement of item embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emerflow_jax import tasks, warmup
from emerflow_jax.models import backbones, scoring

STEPS, LR = 4, 0.05


def _phase(ds, split, n=None):
  batch = tasks.pack_phase(ds, split.warm_rows["warm_a"][:n])
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _emb(n, seed=0):
  return jnp.asarray(0.1 * np.random.default_rng(seed).normal(size=(n, 4)),
                     jnp.float32)


def test_finetune_only_changes_items_with_rows(tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split)
  n = batch["users"].shape[0]
  no_rows = np.arange(n) % 3 == 0
  batch["mask"] = jnp.where(jnp.asarray(no_rows)[:, None], 0.0, batch["mask"])
  emb = _emb(n)
  before = jax.tree.map(np.asarray, bb.params)
  out = warmup.finetune(bb.model, bb.params, bb.tables, emb, batch,
                        steps=STEPS, lr=LR)
  assert out.shape == emb.shape
  np.testing.assert_array_equal(out[no_rows], emb[no_rows])
  moved = np.abs(np.asarray(out - emb)).max(axis=1)
  assert np.all(moved[~no_rows] > 1e-3)
  # The backbone is untouched.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                   bb.params))


def test_finetune_lowers_each_items_loss(tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split)
  emb = _emb(batch["users"].shape[0])
  out = warmup.finetune(bb.model, bb.params, bb.tables, emb, batch,
                        steps=STEPS, lr=LR)
  per_item = jax.jit(jax.vmap(
      lambda e, r: scoring.item_loss(bb.model, bb.params, bb.tables, e, r)))
  assert np.all(np.asarray(per_item(out, batch)) < np.asarray(per_item(emb, batch)))


def test_vmapped_finetune_equals_a_per_item_loop(tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split)
  n = batch["users"].shape[0]
  emb = _emb(n, seed=1)
  together = warmup.finetune(bb.model, bb.params, bb.tables, emb, batch,
                             steps=STEPS, lr=LR)
  for e in range(n):
    one = {k: v[e:e + 1] for k, v in batch.items()}
    alone = warmup.finetune(bb.model, bb.params, bb.tables, emb[e:e + 1], one,
                            steps=STEPS, lr=LR)
    np.testing.assert_allclose(alone[0], together[e], atol=1e-5, rtol=0)


def test_second_call_with_the_same_shapes_does_not_recompile(
    tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split, n=5)  # a shape no other test uses
  size0 = warmup.finetune._cache_size()
  a = warmup.finetune(bb.model, bb.params, bb.tables, _emb(5), batch,
                      steps=STEPS, lr=LR)
  assert warmup.finetune._cache_size() == size0 + 1  # the counter does count
  other = dict(batch, labels=1.0 - batch["labels"])
  b = warmup.finetune(bb.model, bb.params, bb.tables, _emb(5, seed=9), other,
                      steps=STEPS, lr=LR)
  assert warmup.finetune._cache_size() == size0 + 1
  assert not np.allclose(a, b)


def test_predict_scores_each_row_with_its_items_embedding(
    tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  rows = tasks.pack_flat(tiny_ds, tiny_split.test_rows)
  owner = tiny_split.test_owner
  emb = _emb(len(tiny_split.emerging_items), seed=2)
  prob = warmup.predict(bb.model, bb.params, bb.tables, emb, rows, owner)
  assert prob.shape == (len(owner),) and prob.dtype == np.float64
  ref = jax.jit(lambda u, i, e: jax.nn.sigmoid(
      backbones.score(bb.model, bb.params, bb.tables, u, i, e)))(
          rows["users"], rows["items"], emb[owner])
  np.testing.assert_allclose(prob, ref, rtol=1e-5)
  # Chunking is invisible (two chunks: at most two more programs).
  chunked = warmup.predict(bb.model, bb.params, bb.tables, emb, rows, owner,
                           chunk=-(-len(owner) // 2))
  np.testing.assert_allclose(chunked, prob, rtol=1e-6)
  # Another item's embedding changes exactly that item's rows.
  emb2 = emb.at[0].add(1.0)
  prob2 = warmup.predict(bb.model, bb.params, bb.tables, emb2, rows, owner)
  np.testing.assert_array_equal(prob2[owner != 0], prob[owner != 0])
  assert np.all(prob2[owner == 0] != prob[owner == 0])


def test_item_loss_ignores_masked_rows(tiny_ds, tiny_split, tiny_backbone):
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split, n=1)
  one = {k: v[0] for k, v in batch.items()}
  e = _emb(1)[0]
  half = dict(one, mask=one["mask"].at[3:].set(0.0))
  loss = jax.jit(lambda e, r: scoring.item_loss(bb.model, bb.params, bb.tables, e, r))
  # Masked rows may hold anything.
  noisy = dict(half, labels=half["labels"].at[3:].set(1.0 - half["labels"][3:]),
               users=half["users"].at[3:].set(0))
  assert float(loss(e, noisy)) == float(loss(e, half))
  full = float(loss(e, one))
  sub = {k: v[:3] for k, v in one.items()}
  assert float(loss(e, half)) == pytest.approx(float(loss(e, sub)), rel=1e-6)
  assert float(loss(e, half)) != pytest.approx(full, rel=1e-6)


def test_finetune_on_prepared_rows_equals_the_full_forward_fine_tuning(
    tiny_ds, tiny_split, tiny_backbone):
  """The item-embedding-only scorer changes nothing but the cost."""
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split)
  emb = _emb(batch["users"].shape[0], seed=3)
  tx = optax.adam(LR)

  @jax.jit
  def reference(e):  # the plain loop: every step runs the full forward pass
    def total(e):
      return jax.vmap(lambda x, r: scoring.item_loss(bb.model, bb.params, bb.tables, x, r))(
          e, batch).sum()
    opt = tx.init(e)
    for _ in range(STEPS):
      upd, opt = tx.update(jax.grad(total)(e), opt, e)
      e = optax.apply_updates(e, upd)
    return e

  assert "prep" in scoring.prepare(bb.model, bb.params, bb.tables, batch)
  out = warmup.finetune(bb.model, bb.params, bb.tables, emb, batch, steps=STEPS, lr=LR)
  np.testing.assert_allclose(out, reference(emb), rtol=1e-5, atol=1e-6)
  assert not np.allclose(out, emb)


def test_finetune_equals_full_model_adam_with_all_but_the_item_ids_frozen(
    tiny_ds, tiny_split, tiny_backbone):
  # The reference warm-up (``only_optimize_itemid``) trains the whole model
  # with every parameter but the item-ID table frozen; ours must be that.
  bb = tiny_backbone
  batch = _phase(tiny_ds, tiny_split)
  emb = _emb(batch["users"].shape[0], seed=2)
  ours = warmup.finetune(bb.model, bb.params, bb.tables, emb, batch, steps=STEPS, lr=LR)

  full = {"backbone": bb.params, "item_id": emb}
  labels = {"backbone": jax.tree.map(lambda _: "frozen", bb.params), "item_id": "train"}
  tx = optax.multi_transform({"train": optax.adam(LR), "frozen": optax.set_to_zero()},
                             labels)

  def loss(p):
    e = jnp.broadcast_to(p["item_id"][:, None, :], batch["users"].shape + (4,))
    logits = backbones.score(bb.model, p["backbone"], bb.tables, batch["users"],
                             batch["items"], e)
    per_row = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]) * batch["mask"]
    return (per_row.sum(1) / jnp.maximum(batch["mask"].sum(1), 1.0)).sum()

  opt = tx.init(full)
  for _ in range(STEPS):
    upd, opt = tx.update(jax.grad(loss)(full), opt, full)
    full = optax.apply_updates(full, upd)
  np.testing.assert_allclose(ours, full["item_id"], atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, bb.params),
               jax.tree.map(np.asarray, full["backbone"]))
