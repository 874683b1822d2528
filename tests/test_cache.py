"""One key for everything cached: no stale reuse at any stage, safe sharing."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from emerflow_jax import cache, methods, train
from experiments.configs import synthetic as synthetic_config


def test_key_covers_exactly_the_named_sections():
  c = synthetic_config.get_config("smoke")
  k = cache.key(c, ("data", "optim"), seed=0)
  c.warmup.lr = 0.5  # not named: same key
  c.data.dir = "/elsewhere"  # a path field: same key
  c.optim.cache_dir = "/cache"
  assert cache.key(c, ("data", "optim"), seed=0) == k
  assert cache.key(c, ("data", "optim"), seed=1) != k
  c.optim.lr = 0.5
  assert cache.key(c, ("data", "optim"), seed=0) != k


def test_a_method_sees_only_the_sections_its_keys_cover():
  c = synthetic_config.get_config("smoke")
  view = cache.restrict(c, methods.SHARED_SECTIONS + ("cvar",))
  assert view.cvar.keep == c.cvar.keep and view.warmup.lr == c.warmup.lr
  with pytest.raises(AttributeError):
    _ = view.metaemb  # undeclared: reading it would escape the result's key
  view.cvar.keep = 0.0  # a copy: the run's own config (and its key) stay as they were
  assert c.cvar.keep != 0.0


def test_every_registered_method_states_a_valid_plan():
  c = synthetic_config.get_config("smoke")
  flat = _flat(c.to_dict())
  for name in methods.REGISTRY:
    c.backbone = "emerg_gnn" if name == "emerg" else "deepfm"  # EmerG's own GNN
    try:
      plan = methods.get_method(name).plan(c)
    except ValueError as e:
      pytest.fail(f"{name}: {e}")
    assert [b.role for b in plan.backbones].count("main") == 1
    assert set(plan.sections) <= set(c.keys()), name
    for key in plan.search_space:  # every tuned key is a real, readable field
      assert key in flat, (name, key)
      assert key.split(".")[0] in methods.SHARED_SECTIONS + plan.sections, (name, key)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config(method, **overrides):
  """The smoke config on a smaller world (as test_multisplit's): the keys and
  the stages built do not depend on its size."""
  c = synthetic_config.get_config("smoke")
  c.data.options.n_users, c.data.options.n_items = 100, 150
  c.data.options.mean_count = 40.0
  c.data.n_max, c.data.k = 40, 5
  c.data.val_fraction = 0.2
  c.method = method
  c.eval.curves = False
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def _stages(workdir: pathlib.Path) -> dict[str, set[str]]:
  """Stage name -> the keyed folders of it under seed_0 and the backbone cache."""
  out: dict[str, set[str]] = {}
  dirs = list((workdir / "seed_0").iterdir()) + list((workdir / "backbones").iterdir())
  for p in dirs:
    if p.is_dir() and "-" in p.name and not p.name.endswith(".lock"):
      stage = "backbone" if p.parent.name == "backbones" else p.name.rsplit("-", 1)[0]
      out.setdefault(stage, set()).add(p.name)
  return out


def test_emerflow_stages_are_recomputed_exactly_when_their_sections_change(tmp_path):
  runs = {}

  def run(**overrides):
    res = train.train_and_evaluate(_config("emerflow", **overrides), str(tmp_path))
    runs[json.dumps(overrides)] = res
    return res, _stages(tmp_path)

  first, s0 = run()
  assert {k: len(v) for k, v in s0.items()} == {"backbone": 2, "align": 1,
                                                 "rule-align": 1, "rule-meta": 1}
  # meta changes: both alignments reused, the rule re-learned, the seed recomputed.
  res, s1 = run(**{"meta.alpha": 0.02})
  assert s1["align"] == s0["align"] and s1["rule-align"] == s0["rule-align"]
  assert s1["backbone"] == s0["backbone"] and len(s1["rule-meta"]) == 2
  assert res["config"]["meta"]["alpha"] == 0.02 and res["keys"] != first["keys"]
  # align changes: every alignment and the rule on top of it are new.
  _, s2 = run(**{"align.ridge_lambda": 10.0})
  assert len(s2["align"]) == 2 and len(s2["rule-align"]) == 2
  assert len(s2["rule-meta"]) == 3 and s2["backbone"] == s0["backbone"]
  # pretraining changes: new backbones (and everything built on them).
  _, s3 = run(**{"optim.lr": 5e-3})
  assert len(s3["backbone"]) == 4 and len(s3["align"]) == 3
  # Back to the first config: everything is found, and the result is the first one.
  again, s4 = run()
  assert s4 == s3 and again["auc"] == first["auc"] and again["keys"] == first["keys"]


def test_metaemb_stage_is_keyed_by_its_section(tmp_path):
  train.train_and_evaluate(_config("metaemb"), str(tmp_path))
  train.train_and_evaluate(_config("metaemb", **{"warmup.lr": 0.02}), str(tmp_path))
  assert len(_stages(tmp_path)["metaemb"]) == 1  # warmup is not metaemb's input
  res = train.train_and_evaluate(_config("metaemb", **{"metaemb.lr": 5e-3}),
                                 str(tmp_path))
  assert len(_stages(tmp_path)["metaemb"]) == 2
  assert res["config"]["metaemb"]["lr"] == 5e-3


def test_two_processes_needing_one_backbone_build_it_once(tmp_path, repo_root):
  """Started together on one cache: one pretrains, the other waits and reads it."""
  argv = [sys.executable, "-m", "experiments.run",
          "--config=experiments/configs/synthetic.py:smoke", "--config.method=base",
          "--config.optim.epochs=3", "--config.eval.curves=False",
          f"--config.optim.cache_dir={tmp_path / 'cache'}"]
  procs = [subprocess.Popen(argv + [f"--workdir={tmp_path / name}"], cwd=repo_root,
                            stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  trained = [log.count("pretrain: epoch") for log in logs]
  assert sorted(trained) == [0, 3], trained  # exactly one process pretrained
  assert any("resumed from epoch 3" in log for log in logs)
  a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in "ab")
  assert a["auc"] == b["auc"]
  assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_restrict_keeps_values():
  c = ml_collections.ConfigDict({"a": {"x": 1}, "b": 2, "c": {"y": 3}})
  view = cache.restrict(c, ("a", "b"))
  assert view.to_dict() == {"a": {"x": 1}, "b": 2}
