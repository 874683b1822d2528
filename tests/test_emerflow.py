"""EmerFlow end to end on a tiny synthetic world: fit, cold, refine, resume."""

import pathlib

import jax
import numpy as np
import pytest

from emerflow_jax import methods, protocol, train
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones
from experiments.configs import synthetic as synthetic_config


def _context(workdir, method_name, **overrides):
  cfg = synthetic_config.get_config("smoke")
  cfg.meta.epochs = 2
  cfg.meta.batch_tasks = 16
  cfg.align.steps = 10
  for k, v in overrides.items():
    section, field = k.split(".")
    cfg[section][field] = v
  ds = synthetic.make_synthetic(n_users=80, n_items=80, mean_count=40, seed=2)
  split = protocol.split_emerging_items(ds, n_max=30, k=4)
  model = backbones.make_backbone("deepfm", ds, dim=16, mlp=(16, 16))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(0))
  method = methods.get_method(method_name)
  ctx = methods.Context(config=cfg, ds=ds, split=split, model=model, params=params,
                        tables=tables, key=jax.random.key(1),
                        workdir=pathlib.Path(workdir), item_vectors=ds.item_vectors)
  return method, ctx


@pytest.mark.parametrize("name", ["emerflow", "emerflow_no_align", "emerflow_no_meta"])
def test_methods_produce_finite_phase_metrics(tmp_path, name):
  method, ctx = _context(tmp_path, name)
  state = method.fit(ctx)
  s = ctx.split
  out = train.evaluate_items(method, ctx, state, s.emerging_items, s.warm_rows,
                             s.test_rows, s.test_owner)
  assert set(out["auc"]) == set(protocol.PHASES)
  assert all(np.isfinite(v) for v in out["auc"].values())


def test_meta_training_resumes_to_the_same_parameters(tmp_path):
  method, ctx = _context(tmp_path / "full", "emerflow")
  full = method.fit(ctx)["params"]
  method, ctx = _context(tmp_path / "killed", "emerflow", **{"meta.epochs": 1})
  method.fit(ctx)  # "killed" after one epoch: its checkpoint stays on disk
  method, ctx = _context(tmp_path / "killed", "emerflow")
  resumed = method.fit(ctx)["params"]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_warm_phases_only_move_item_embeddings(tmp_path):
  method, ctx = _context(tmp_path, "emerflow")
  state = method.fit(ctx)
  before = jax.tree.map(np.asarray, ctx.params)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  from emerflow_jax import tasks  # pylint: disable=g-import-not-at-top
  new, _ = method.refine(ctx, state, emb, tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"]),
                         s.emerging_items)
  assert new.shape == emb.shape and not np.allclose(new, emb)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(ctx.params)):
    np.testing.assert_array_equal(a, b)


def test_rule_learned_on_an_auxiliary_backbone_carries_only_the_step_sizes(tmp_path):
  """rule_holdout: alpha comes from items the auxiliary backbone never saw."""
  from emerflow_jax import pretrain, tasks  # pylint: disable=g-import-not-at-top
  shrink = {"meta.learn_shrink": True, "meta.cold_in_outer": True}
  method, ctx = _context(tmp_path, "emerflow", **{"meta.rule_holdout": 0.4}, **shrink)
  method.configure(ctx.config)
  assert method.rule_holdout == 0.4
  aux_split, held = protocol.carve_validation(ctx.split, ctx.ds, 0.4, 0,
                                              pick=method.rule_pick)
  aux_params = pretrain.pretrain_backbone(
      ctx.model, ctx.tables, tasks.pack_flat(ctx.ds, aux_split.base_rows),
      jax.random.key(5), epochs=1, batch_size=64, lr=1e-2, ckpt_dir=tmp_path / "aux")
  ctx.rule_backbone = methods.RuleBackbone(params=aux_params, split=aux_split,
                                           items=held.items)
  state = method.fit(ctx)
  alpha = np.asarray(state["params"]["log_alpha"])
  assert alpha.shape == (3,)  # one scalar step size per warm phase
  assert not np.allclose(alpha, np.log(ctx.config.meta.alpha))  # it was learned
  assert float(state["params"]["shrink"]) != 1.0  # so was the trust in the prior
  assert (tmp_path / "rule" / "meta").exists() and (tmp_path / "rule" / "align").exists()
  assert not (tmp_path / "meta").exists()  # nothing meta-trained on the main backbone
  # The cold map is the main backbone's own mapper (not the auxiliary one),
  # shrunk toward the main backbone's mean old-item embedding by the learned s.
  _, plain_ctx = _context(tmp_path / "plain", "emerflow", **{"meta.epochs": 0}, **shrink)
  plain = method.fit(plain_ctx)
  assert float(plain["params"]["shrink"]) == 1.0
  g = method.cold(plain_ctx, plain, ctx.split.emerging_items)
  center = np.asarray(ctx.old_item_embeddings()).mean(0)
  want = center + float(state["params"]["shrink"]) * (np.asarray(g) - center)
  np.testing.assert_allclose(method.cold(ctx, state, ctx.split.emerging_items), want,
                             rtol=1e-5, atol=1e-6)


def test_rule_holdout_refuses_to_transfer_a_trained_cold_map(tmp_path):
  method, ctx = _context(tmp_path, "emerflow", **{"meta.rule_holdout": 0.3,
                                                  "meta.train_init": True})
  with pytest.raises(ValueError, match="train_init=False"):
    method.configure(ctx.config)


def test_refine_steps_through_the_phases(tmp_path):
  method, ctx = _context(tmp_path, "emerflow")
  state = method.fit(ctx)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  from emerflow_jax import tasks  # pylint: disable=g-import-not-at-top
  for p, phase in enumerate(protocol.WARM_PHASES):
    assert state["phase"] == p
    emb, state = method.refine(ctx, state, emb, tasks.pack_phase(ctx.ds, s.warm_rows[phase]),
                               s.emerging_items)
