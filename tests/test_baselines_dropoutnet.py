"""DropoutNet: a fraction `rate` of pretraining batches score with the mean embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emerflow_jax import methods, pretrain, tasks, train
from emerflow_jax.baselines import dropoutnet
from emerflow_jax.models import backbones
from experiments.configs import common


def test_plan_pretrains_main_with_the_configured_rate():
  config = common.base_config("synthetic", n_max=40, k=5)
  config.dropoutnet.rate = 0.3
  method = methods.get_method("dropoutnet")
  plan = method.plan(config)
  assert [(b.role, b.item_dropout) for b in plan.backbones] == [("main", 0.3)]
  assert plan.sections == ("dropoutnet",) and "dropoutnet.rate" in plan.search_space
  config.dropoutnet.rate = 1.5
  with pytest.raises(ValueError, match="rate"):
    method.plan(config)


def test_dropped_batches_use_the_mean_at_the_configured_rate(tiny_ds, tiny_split,
                                                            random_params):
  ds, split = tiny_ds, tiny_split
  config = common.base_config("synthetic", n_max=40, k=5)
  config.dropoutnet.rate = 0.3
  rate = dropoutnet.DropoutNet().plan(config).backbones[0].item_dropout
  model = backbones.make_backbone("deepfm", ds, 4, (8,))
  tables = backbones.make_tables(ds)
  # N(0, 0.3^2) parameters: the two candidate losses are far apart.
  params = random_params(model, tables)
  rows = tasks.pack_flat(ds, split.base_rows)
  n_rows = len(split.base_rows)
  users, items, labels = (jnp.asarray(rows[k]) for k in ("users", "items", "labels"))
  emb = jnp.take(backbones.item_embedding_table(params),
                 backbones.item_ids(tables, items), axis=0)
  full = backbones.bce_loss(backbones.score(model, params, tables, users, items), labels)
  mean = jnp.broadcast_to(emb.mean(0), emb.shape)
  dropped = backbones.bce_loss(backbones.score(model, params, tables, users, items, mean),
                               labels)
  assert abs(float(full) - float(dropped)) > 1e-2
  # One batch = all rows per epoch, a zero learning rate: each epoch's loss is
  # the full-embedding loss or the mean-embedding loss, whatever the shuffle.
  tx = optax.sgd(0.0)
  epoch_fn = pretrain.make_epoch_fn(model, tx, tables, n_rows, rate)
  state = pretrain.init_state(params, tx, jax.random.key(1))
  n, n_drop = 200, 0
  for e in range(n):
    state, losses = epoch_fn(state, users, items, labels, e)
    loss = float(losses[0])
    is_drop = np.isclose(loss, float(dropped), atol=1e-4)
    assert is_drop or np.isclose(loss, float(full), atol=1e-4), loss
    n_drop += int(is_drop)
  sigma = np.sqrt(n * 0.3 * 0.7)
  assert abs(n_drop - 0.3 * n) < 4 * sigma, n_drop


def test_end_to_end_cold_is_the_row_weighted_mean(tiny_ds, tiny_split, tmp_path):
  ds, split = tiny_ds, tiny_split
  config = common.base_config("synthetic", n_max=40, k=5)
  config.warmup.steps = 3
  method = dropoutnet.DropoutNet()
  model = backbones.make_backbone("deepfm", ds, 4, (8,))
  tables = backbones.make_tables(ds)
  params = pretrain.pretrain_backbone(
      model, tables, tasks.pack_flat(ds, split.base_rows), jax.random.key(0),
      epochs=1, batch_size=64, lr=1e-2, ckpt_dir=tmp_path / "backbone",
      item_dropout=method.plan(config).backbones[0].item_dropout, log=lambda _: None)
  ctx = methods.context_for(config, ds, split, model, tables, params,
                            jax.random.key(1), tmp_path / "method")
  state = method.fit(ctx)
  table = backbones.item_embedding_table(params)
  base_items = ds.items[split.base_rows]
  want = jnp.take(table, backbones.item_ids(tables, base_items), axis=0).mean(0)
  cold = method.cold(ctx, state, split.emerging_items)
  np.testing.assert_allclose(cold, np.broadcast_to(want, cold.shape), rtol=1e-5, atol=1e-7)
  out, _ = train.evaluate_items(method, ctx, state, split.emerging_items,
                                split.warm_rows, split.test_rows, split.test_owner)
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in out["auc"].values())
