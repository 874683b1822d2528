"""EmerFlow end to end on a tiny synthetic world: fit, cold, refine, resume."""

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import (emerflow, emerflow_meta, methods, pretrain, protocol, rule, tasks,
                          train)
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones
from experiments.configs import synthetic as synthetic_config


def _context(workdir, method_name, **overrides):
  cfg = synthetic_config.get_config("smoke")
  cfg.meta.epochs = 2
  cfg.meta.batch_tasks = 16
  cfg.meta.rule_holdout = 0.0  # one backbone unless a test asks for the rule backbone
  for k, v in overrides.items():
    section, field = k.split(".")
    cfg[section][field] = v
  ds = synthetic.make_synthetic(n_users=80, n_items=80, mean_count=40, seed=2)
  split = protocol.split_emerging_items(ds, n_max=30, k=4)
  model = backbones.make_backbone("deepfm", ds, dim=16, mlp=(16, 16))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(0))
  method = methods.get_method(method_name)
  ctx = methods.context_for(cfg, ds, split, model, tables, params, jax.random.key(1),
                            pathlib.Path(workdir), vectors=ds.item_vectors)
  return method, ctx


@pytest.mark.parametrize("name", ["emerflow", "emerflow_no_align", "emerflow_no_meta"])
def test_methods_produce_finite_phase_metrics(tmp_path, name):
  method, ctx = _context(tmp_path, name)
  state = method.fit(ctx)
  s = ctx.split
  out, _ = train.evaluate_items(method, ctx, state, s.emerging_items, s.warm_rows,
                                s.test_rows, s.test_owner)
  assert set(out["auc"]) == set(protocol.PHASES)
  assert all(np.isfinite(v) for v in out["auc"].values())


class _Killed(Exception):
  pass


def _saved_steps(stage):
  """The committed checkpoint steps of a stage folder (Orbax: one folder each)."""
  return sorted(int(p.name) for p in stage.iterdir() if p.name.isdigit())


def test_meta_training_resumes_to_the_same_parameters(tmp_path, monkeypatch, caplog):
  every = {"meta.ckpt_every_s": 0.0}  # a checkpoint after every epoch
  method, ctx = _context(tmp_path / "full", "emerflow", **every)
  full = method.fit(ctx)["params"]
  # Killed right after the first epoch's checkpoint, same config.
  real_log = emerflow_meta._log_epochs

  def log_then_die(*args):
    real_log(*args)
    raise _Killed

  monkeypatch.setattr(emerflow_meta, "_log_epochs", log_then_die)
  method, ctx = _context(tmp_path / "killed", "emerflow", **every)
  with pytest.raises(_Killed):
    method.fit(ctx)
  (stage,) = (tmp_path / "killed").glob("meta-*")
  assert _saved_steps(stage) == [1]
  monkeypatch.setattr(emerflow_meta, "_log_epochs", real_log)
  method, ctx = _context(tmp_path / "killed", "emerflow", **every)
  with caplog.at_level(logging.INFO):
    resumed = method.fit(ctx)["params"]
  assert "meta: resumed at epoch 1" in caplog.text
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_meta_training_saves_only_on_its_time_budget(tmp_path):
  """A stage shorter than ``meta.ckpt_every_s`` writes no checkpoint (a
  killed run recomputes it); a zero budget saves every epoch."""
  for every, steps in ((3600.0, []), (0.0, [1, 2])):
    method, ctx = _context(tmp_path / str(every), "emerflow", **{"meta.ckpt_every_s": every})
    method.fit(ctx)
    (stage,) = (tmp_path / str(every)).glob("meta-*")
    assert _saved_steps(stage) == steps


def test_warm_phases_only_move_item_embeddings(tmp_path):
  method, ctx = _context(tmp_path, "emerflow")
  state = method.fit(ctx)
  before = jax.tree.map(np.asarray, ctx.params)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  new, _ = method.refine(ctx, state, emb, tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"]),
                         s.emerging_items, 0)
  assert new.shape == emb.shape and not np.allclose(new, emb)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(ctx.params)):
    np.testing.assert_array_equal(a, b)


def _with_rule_backbone(ctx, leave_out=0.4):
  """``ctx`` plus the auxiliary "rule" backbone its plan asks for."""
  spec = [b for b in methods.get_method("emerflow").plan(ctx.config).backbones
          if b.role == "rule"][0]
  assert spec.leave_out == leave_out and spec.pick == "fewest_rows"
  aux_split, held = protocol.carve_validation(ctx.split, ctx.ds, leave_out, 0, spec.pick)
  aux_params = pretrain.pretrain_backbone(
      ctx.model, ctx.tables, tasks.pack_flat(ctx.ds, aux_split.base_rows),
      jax.random.key(5), epochs=1, batch_size=64, lr=1e-2, ckpt_dir=ctx.workdir / "aux")
  aux_bb = methods.Pretrained(params=aux_params, split=aux_split, held=held.items,
                              key="aux")
  return dataclasses.replace(ctx, backbones=dict(ctx.backbones, rule=aux_bb))


def test_rule_learned_on_an_auxiliary_backbone_carries_only_the_step_sizes(tmp_path):
  """rule_holdout: alpha comes from items the auxiliary backbone never saw."""
  shrink = {"meta.learn_shrink": True, "meta.cold_in_outer": True}
  method, ctx = _context(tmp_path, "emerflow", **{"meta.rule_holdout": 0.4}, **shrink)
  ctx = _with_rule_backbone(ctx)
  state = method.fit(ctx)
  alpha = np.asarray(state["params"]["log_alpha"])
  assert alpha.shape == (3,)  # one scalar step size per warm phase
  assert not np.allclose(alpha, np.log(ctx.config.meta.alpha))  # it was learned
  assert float(state["params"]["shrink"]) != 1.0  # so was the trust in the prior
  made = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1]
                if p.name.startswith("rule-") else p.name.split("-")[0]
                for p in tmp_path.iterdir() if "-" in p.name and p.is_dir())
  assert made == ["align", "rule-align", "rule-meta"]  # nothing meta-trained on main
  # The cold map is the main backbone's own mapper (not the auxiliary one),
  # shrunk toward the main backbone's mean old-item embedding by the learned s.
  _, plain_ctx = _context(tmp_path / "plain", "emerflow", **{"meta.epochs": 0,
                                                             "meta.rule_holdout": 0.0},
                          **shrink)
  plain = method.fit(plain_ctx)
  assert float(plain["params"]["shrink"]) == 1.0
  g = method.cold(plain_ctx, plain, ctx.split.emerging_items)
  center = np.asarray(ctx.old_item_embeddings()).mean(0)
  want = center + float(state["params"]["shrink"]) * (np.asarray(g) - center)
  np.testing.assert_allclose(method.cold(ctx, state, ctx.split.emerging_items), want,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"meta.rule_holdout": 0.3, "meta.train_init": True}, "train_init=False"),
    ({"meta.rule_holdout": 0.3, "meta.crossfit_folds": 2}, "crossfit_folds=1"),
    ({"meta.rule_holdout": 0.0, "meta.holdout_fraction": 0.2,
      "meta.crossfit_folds": 2}, "crossfit_folds=1"),
    ({"meta.cold_in_outer": True}, "learn_shrink"),
    ({"meta.rule_holdout": 0.0, "meta.rule_epochs": 3}, "rule_holdout > 0"),
    ({"meta.tasks": "chunks"}, "phase_alpha"),
    ({"regen.step_scales": (0.5, 2.0)}, "hold 1.0"),
    ({"regen.step_scales": (1.0,)}, "hold 1.0"),
    ({"regen.step_scales": (0.0, 1.0)}, "positive"),
    ({"regen.scale_folds": 1}, "scale_folds"),
    ({"regen.scale_phases": "ad"}, "scale_phases"),
    ({"regen.forward_phases": "ab"}, "no previous"),
    ({"regen.forward_phases": "b", "regen.step_scales": ()}, "empty"),
    ({"regen.keep_cv": (0.5, 1.0)}, r"\[0, 1\)"),
    ({"regen.keep_cv": (0.5,), "regen.keep_b": 0.7}, "must then be 1"),
    ({"regen.keep_folds": 1}, "keep_folds"),
])
def test_options_that_would_have_no_effect_are_errors(tmp_path, overrides, match):
  method, ctx = _context(tmp_path, "emerflow", **overrides)
  with pytest.raises(ValueError, match=match):
    method.plan(ctx.config)


def test_plan_states_the_backbones_each_variant_needs(tmp_path):
  _, ctx = _context(tmp_path, "emerflow", **{"meta.rule_holdout": 0.3})
  cfg = ctx.config
  roles = {n: [(b.role, b.leave_out) for b in methods.get_method(n).plan(cfg).backbones]
           for n in ("emerflow", "emerflow_no_meta", "emerflow_no_align")}
  assert roles["emerflow"] == [("main", 0.0), ("rule", cfg.meta.rule_holdout)]
  assert roles["emerflow_no_meta"] == [("main", 0.0)]  # no rule to learn
  assert roles["emerflow_no_align"] == roles["emerflow"]
  assert methods.get_method("emerflow_no_align").plan(cfg).vectors is None
  assert methods.get_method("emerflow_no_llm").plan(cfg).vectors == "raw"


def test_refine_uses_the_phase_it_is_given(tmp_path):
  """Phase p applies the step size learned for phase p, whatever came before."""
  method, ctx = _context(tmp_path, "emerflow")
  state = method.fit(ctx)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  batch = tasks.pack_phase(ctx.ds, s.warm_rows["warm_b"])
  a, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 1)
  b, state2 = method.refine(ctx, state, emb, batch, s.emerging_items, 1)
  c, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 2)
  np.testing.assert_array_equal(a, b)
  # The rule keeps no per-phase counter: refine adds only what the next
  # phase's forward CV replays (regen.forward_phases), never changes the fit.
  assert set(state2) - set(state) <= {"history"}
  assert all(state2[k] is state[k] for k in state)
  alpha = np.asarray(state["params"]["log_alpha"])
  assert not np.allclose(alpha[1], alpha[2]) or np.allclose(a, c)


def test_regeneration_blends_the_adapted_embedding_with_content(tmp_path):
  """regen.keep_p < 1: after phase p, e <- keep e + (1 - keep) ridge_{-i}(r_i)."""
  from emerflow_jax import posterior  # pylint: disable=g-import-not-at-top
  method, ctx = _context(tmp_path, "emerflow", **{"regen.keep_b": 0.7, "regen.keep_cv": ()})
  state = method.fit(ctx)
  g = state["regen"]
  assert g["keep"] == (1.0, 0.7, 1.0) and g["lam"] in posterior.LAMBDAS
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  batch = tasks.pack_phase(ctx.ds, s.warm_rows["warm_b"])
  plain = dict(state, regen=None)
  adapted, _ = method.refine(ctx, plain, emb, batch, s.emerging_items, 1)
  got, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 1)
  want = posterior.regenerate(g["r_old"], g["e_old"], g["r"][s.emerging_items], adapted,
                              g["lam"], 0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, adapted)
  same, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 0)  # keep_a = 1
  np.testing.assert_allclose(same, method.refine(ctx, plain, emb, batch,
                                                 s.emerging_items, 0)[0], rtol=1e-6)


def test_cv_chosen_regeneration_uses_the_share_choose_keep_returns(tmp_path, caplog):
  """regen.keep_cv: each phase blends with the share ``posterior.choose_keep``
  picks on that phase's rows (after the step-size CV), 1 meaning no blend."""
  from emerflow_jax import emerflow_meta, posterior  # pylint: disable=g-import-not-at-top
  keeps = (0.0, 0.5)
  method, ctx = _context(tmp_path, "emerflow", **{"regen.keep_cv": keeps,
                                                  "regen.pool_steps": 0,
                                                  "regen.step_scales": ()})
  state = method.fit(ctx)
  g = state["regen"]
  assert g is not None and g["keep"] == (1.0, 1.0, 1.0)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items)
  batch = tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"])
  rows = {k: jnp.asarray(v) for k, v in batch.items()}
  mcfg = emerflow_meta.meta_config(ctx.config)
  keep, gains = posterior.choose_keep(
      state["params"], ctx.model, mcfg, state["frozen"], emb, rows, jnp.asarray(0),
      jnp.asarray(keeps + (1.0,)), int(ctx.config.regen.keep_folds), g["r_old"], g["e_old"],
      g["r"][s.emerging_items], g["lam"])
  assert float(gains[-1]) == 0.0 and float(keep) in keeps + (1.0,)
  adapted = emerflow_meta.refine_items(state["params"], ctx.model, mcfg, state["frozen"],
                                       emb, rows, phase=0)
  want = posterior.regenerate(g["r_old"], g["e_old"], g["r"][s.emerging_items], adapted,
                              g["lam"], keep)
  got, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pooled_correction_comes_before_the_rule_with_the_cold_prior(tmp_path):
  """regen.pool_steps > 0: refine = rule(pooled_correction(e; prior = e0 - center))."""
  from emerflow_jax import posterior  # pylint: disable=g-import-not-at-top
  method, ctx = _context(tmp_path / "on", "emerflow", **{"regen.pool_steps": 15,
                                                         "regen.pool_lam": 1e-3,
                                                         "regen.keep_cv": ()})
  state = method.fit(ctx)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items) + 3.0  # a population off by a shift
  batch = tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"])
  got, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 0)
  prior = method.cold(ctx, state, s.emerging_items) - state["frozen"]["center"]
  corrected, _ = posterior.pooled_correction(
      ctx.model, ctx.params, ctx.tables, emb, prior,
      {k: jax.numpy.asarray(v) for k, v in batch.items()},
      jax.random.fold_in(ctx.key, emerflow.POOL_SALT), steps=15, lr=float(ctx.config.regen.pool_lr),
      lambdas=jax.numpy.asarray([1e-3]), folds=int(ctx.config.regen.pool_folds))
  assert not np.allclose(corrected, emb)  # the shift was worth correcting here
  ctx.config.regen.pool_steps = 0
  want, _ = method.refine(ctx, state, corrected, batch, s.emerging_items, 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_refine_rescales_the_rule_by_the_factor_the_row_cv_chooses(tmp_path):
  """regen.step_scales: refine = rule(emb; alpha x choose_step_scale(...))."""
  from emerflow_jax import emerflow_meta, meta  # pylint: disable=g-import-not-at-top
  method, ctx = _context(tmp_path, "emerflow", **{"regen.pool_steps": 0,
                                                  "regen.keep_cv": ()})
  state = method.fit(ctx)
  s = ctx.split
  # A population far from where the rule's small steps can reach.
  emb = method.cold(ctx, state, s.emerging_items) + 5.0
  batch = tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"])
  got, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 0)
  mcfg = emerflow_meta.meta_config(ctx.config)
  scale, _ = rule.choose_step_scale(
      state["params"], ctx.model, mcfg, state["frozen"], emb,
      {k: jax.numpy.asarray(v) for k, v in batch.items()}, 0,
      jax.numpy.asarray(ctx.config.regen.step_scales, jax.numpy.float32),
      folds=int(ctx.config.regen.scale_folds))
  want = emerflow_meta.refine_items(rule.scaled(state["params"], scale), ctx.model, mcfg,
                                    state["frozen"], emb, batch, phase=0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  ctx.config.regen.step_scales = ()
  plain, _ = method.refine(ctx, state, emb, batch, s.emerging_items, 0)
  np.testing.assert_allclose(plain, emerflow_meta.refine_items(
      state["params"], ctx.model, mcfg, state["frozen"], emb, batch, phase=0),
      rtol=1e-5, atol=1e-6)
  assert float(scale) != 1.0 and not np.allclose(got, plain)


def test_forward_phases_rescale_warm_b_by_replaying_warm_a(tmp_path):
  """regen.forward_phases="b": at warm_b the factor comes from
  choose_step_scale_forward on (emb before warm_a's rule, warm_a rows, warm_b rows)."""
  from emerflow_jax import emerflow_meta  # pylint: disable=g-import-not-at-top
  method, ctx = _context(tmp_path, "emerflow", **{"regen.pool_steps": 0,
                                                  "regen.keep_cv": (),
                                                  "regen.scale_phases": "",
                                                  "regen.forward_phases": "b"})
  state = method.fit(ctx)
  s = ctx.split
  emb = method.cold(ctx, state, s.emerging_items) + 5.0
  a = tasks.pack_phase(ctx.ds, s.warm_rows["warm_a"])
  b = tasks.pack_phase(ctx.ds, s.warm_rows["warm_b"])
  emb_a, state_a = method.refine(ctx, state, emb, a, s.emerging_items, 0)
  np.testing.assert_array_equal(state_a["history"]["emb"], emb)
  got, _ = method.refine(ctx, state_a, emb_a, b, s.emerging_items, 1)
  mcfg = emerflow_meta.meta_config(ctx.config)
  jb = {k: jnp.asarray(v) for k, v in b.items()}
  scale, _ = rule.choose_step_scale_forward(
      state["params"], ctx.model, mcfg, state["frozen"], emb,
      {k: jnp.asarray(v) for k, v in a.items()}, jb, jnp.asarray(0, jnp.int32),
      jnp.asarray(ctx.config.regen.step_scales, jnp.float32))
  want = emerflow_meta.refine_items(rule.scaled(state["params"], scale), ctx.model, mcfg,
                                    state["frozen"], emb_a, jb, phase=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(scale) != 1.0
