"""End to end: the real run binary on the synthetic smoke config.

  python -m experiments.run --config=experiments/configs/synthetic.py:smoke \
      --config.method=base --workdir=<tmp>
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from emerflow_jax import (align_diagnostics, cache, curves, data, emerflow_meta, methods,
                          metrics, posterior, pretrain, programs, protocol, train)
from emerflow_jax.data import dataset, synthetic
from emerflow_jax.models import backbones
from experiments.configs import synthetic as synthetic_config

FLAGS = ("--config=experiments/configs/synthetic.py:smoke", "--config.method=base")
PHASES = ["cold", "warm_a", "warm_b", "warm_c"]


def _run(argv, cwd):
  proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, experiment_argv, repo_root):
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  proc = _run(experiment_argv(workdir, *FLAGS), repo_root)
  return workdir, proc


def test_binary_writes_results_json_md_and_png(smoke_run):
  workdir, proc = smoke_run
  res = json.loads((workdir / "results.json").read_text())
  assert (res["dataset"], res["method"], res["backbone"]) == ("synthetic", "base",
                                                              "deepfm")
  assert res["phases"] == PHASES
  for metric in ("auc", "f1"):
    assert list(res[metric]) == PHASES
    for p in PHASES:
      assert len(res[metric][p]) == 1 and 0.0 < res[metric][p][0] < 1.0
  assert res["auc"]["warm_c"][0] > 0.5  # it learned something
  assert res["config"]["optim"]["epochs"] == 1  # the :smoke variant
  assert set(res["seconds"]) == {"pretrain", "method", "fit", "evaluate", "total",
                                 "backbones"}
  assert all(v > 0 for v in res["seconds"].values())
  assert "mean ± std" in (workdir / "results.md").read_text()
  assert (workdir / "auc.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  assert (workdir / "seed_0" / "result.json").exists()  # one flat level per run
  assert "test AUC" in proc.stderr


def test_second_invocation_reuses_finished_seeds(smoke_run, experiment_argv, repo_root):
  workdir, _ = smoke_run
  seed_file = workdir / "seed_0" / "result.json"
  before = seed_file.read_bytes()
  first = json.loads((workdir / "results.json").read_text())
  proc = _run(experiment_argv(workdir, *FLAGS), repo_root)
  assert "seed 0: reusing" in proc.stderr
  assert "pretrain: epoch" not in proc.stderr and "test AUC" not in proc.stderr
  assert seed_file.read_bytes() == before
  again = json.loads((workdir / "results.json").read_text())
  assert again["auc"] == first["auc"] and again["f1"] == first["f1"]


def test_nan_in_the_data_is_a_clear_error(tiny_ds, tmp_path, monkeypatch):
  times = tiny_ds.times.copy()
  times[7] = np.nan
  bad = dataclasses.replace(tiny_ds, times=times)
  monkeypatch.setattr(data, "load_dataset", lambda _: bad)
  config = synthetic_config.get_config("smoke")
  with pytest.raises(dataset.DataError, match="non-finite time.*row 7"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()


def test_a_changed_config_never_reuses_a_finished_seed(smoke_run, experiment_argv,
                                                       repo_root, tmp_path):
  """The warm-up lr case: the seed is recomputed, the backbone is not."""
  first_dir, _ = smoke_run
  workdir = tmp_path / "run"
  shutil.copytree(first_dir, workdir)
  first = json.loads((workdir / "results.json").read_text())
  proc = _run(experiment_argv(workdir, *FLAGS, "--config.warmup.lr=0.5"), repo_root)
  assert "computed with another config; recomputing" in proc.stderr
  assert "seed 0: reusing" not in proc.stderr
  assert "pretrain: epoch" not in proc.stderr  # the backbone does not read warmup
  res = json.loads((workdir / "results.json").read_text())
  assert res["config"]["warmup"]["lr"] == 0.5
  assert res["auc"] != first["auc"]  # computed with lr 0.5, not read back
  # The reused backbone still reports what it cost to build.
  assert res["seconds"]["backbones"] == first["seconds"]["backbones"] > 0
  seed = json.loads((workdir / "seed_0" / "result.json").read_text())
  assert res["keys"] == [seed["key"]] != first["keys"]


def test_predictions_are_kept_per_seed(smoke_run):
  workdir, _ = smoke_run
  res = json.loads((workdir / "results.json").read_text())
  with np.load(workdir / "seed_0" / "predictions.npz") as f:
    for prefix, metric in (("", "auc"), ("val_", "val_auc")):
      labels = f[f"{prefix}labels"]
      assert f[f"{prefix}owner"].shape == labels.shape
      for p in PHASES:  # the stored scores reproduce the stored AUC
        assert np.isclose(metrics.auc(labels, f[f"{prefix}prob_{p}"]), res[metric][p][0])


def test_curves_are_written_for_tensorboard(smoke_run):
  workdir, _ = smoke_run
  scalars = curves.read_scalars(workdir / "seed_0" / "tb")
  assert [s for s, _ in scalars["pretrain/main/loss"]] == [1]  # smoke: one epoch
  for i, p in enumerate(PHASES):
    assert scalars[f"val_auc/{p}"][0][0] == i and 0 < scalars[f"val_auc/{p}"][0][1] < 1


def test_validation_only_runs_never_read_test_rows(tmp_path, monkeypatch):
  """eval.test=False: the split handed to the method has no emerging items."""
  seen = []
  real = train.evaluate_items

  def spy(method, ctx, state, items, *rest):
    seen.append((np.asarray(items).copy(), ctx.split))
    return real(method, ctx, state, items, *rest)

  monkeypatch.setattr(train, "evaluate_items", spy)
  config = synthetic_config.get_config("smoke")
  config.method = "base"
  config.eval.test = False
  config.eval.curves = False
  res = train.train_and_evaluate(config, str(tmp_path))
  assert res["auc"] is None and res["f1"] is None
  assert all(0 < v[0] < 1 for v in res["val_auc"].values())
  assert len(seen) == 1  # the validation holdout only
  items, split = seen[0]
  assert not np.isin(items, split.old_items).any()  # held-out old items
  assert split.emerging_items.size == 0 and split.test_rows.size == 0
  assert all(w.size == 0 for w in split.warm_rows.values())
  with np.load(tmp_path / "seed_0" / "predictions.npz") as f:
    assert not any(k in f.files for k in ("labels", "owner")) and "val_labels" in f.files


def test_val_pick_holds_out_the_old_items_with_fewest_rows(tmp_path, monkeypatch):
  """data.val_pick=fewest_rows: validation items have no more rows than any kept one."""
  seen = []
  real = train.evaluate_items

  def spy(method, ctx, state, items, *rest):
    seen.append((np.asarray(items).copy(), ctx.split, ctx.ds))
    return real(method, ctx, state, items, *rest)

  monkeypatch.setattr(train, "evaluate_items", spy)
  config = synthetic_config.get_config("smoke")
  config.method, config.eval.test, config.eval.curves = "base", False, False
  config.data.val_pick = "fewest_rows"
  train.train_and_evaluate(config, str(tmp_path / "fewest"))
  items, split, ds = seen[0]
  counts = np.bincount(ds.items, minlength=ds.n_items)
  assert counts[items].max() <= counts[split.old_items].min()
  config.data.val_pick = "nope"
  with pytest.raises(ValueError, match="fewest_rows"):
    train.train_and_evaluate(config, str(tmp_path / "nope"))


def test_pretrain_cost_adds_resumed_parts_and_keeps_it_on_read_back(tmp_path):
  ckpt = tmp_path / "backbone"
  assert train.pretrain_cost(ckpt, 3.0, trained=True) == 3.0
  assert train.pretrain_cost(ckpt, 0.2, trained=False) == 3.0  # read back: unchanged
  assert train.pretrain_cost(ckpt, 2.0, trained=True) == 5.0   # a resumed part adds
  assert train.pretrain_cost(tmp_path / "other", 0.5, trained=False) == 0.5


def test_an_auxiliary_backbone_trains_its_own_epochs_and_main_keeps_its_key(tmp_path,
                                                                             monkeypatch):
  """BackboneSpec.epochs (meta.rule_epochs): the aux backbone trains that many epochs;
  at its default the field stays out of the key, so cached backbones stay valid."""
  config = synthetic_config.get_config("smoke")
  config.optim.epochs = 2
  ds = synthetic.make_synthetic(n_users=60, n_items=60, mean_count=30, seed=3)
  split = protocol.split_emerging_items(ds, n_max=25, k=3)
  model = backbones.make_backbone("deepfm", ds, dim=8, mlp=(8,))
  tables = backbones.make_tables(ds)
  epochs = {}
  real = pretrain.pretrain_backbone

  def spy(*args, ckpt_dir, **kwargs):
    epochs[pathlib.Path(ckpt_dir).name] = kwargs["epochs"]
    return real(*args, ckpt_dir=ckpt_dir, **kwargs)

  monkeypatch.setattr(pretrain, "pretrain_backbone", spy)
  aux = methods.BackboneSpec(role="rule", leave_out=0.3, carve_salt=5, epochs=1)
  plan = methods.Plan(backbones=(methods.BackboneSpec(), aux))
  out = train.execute_plan(config, ds, split, plan, 0, tmp_path, model, tables)
  assert sorted(epochs.values()) == [1, 2]
  assert epochs[train.backbone_dir(config, tmp_path, out["rule"].key, 0).name] == 1
  old_fields = {k: v for k, v in dataclasses.asdict(methods.BackboneSpec()).items()
                if k != "epochs"}
  assert out["main"].key == cache.key(config, train.BACKBONE_SECTIONS, seed=0,
                                      spec=old_fields, parent=None)
  assert train.result_key(config, methods.Plan(backbones=(methods.BackboneSpec(),)), 0) == (
      cache.key(config, methods.SHARED_SECTIONS, seed=0, vectors=None,
                backbones=[old_fields]))
  longer = dataclasses.replace(aux, epochs=2)
  assert train.backbone_key(config, 0, longer, "p") != train.backbone_key(config, 0, aux, "p")
  with pytest.raises(ValueError, match="auxiliary"):
    train.execute_plan(config, ds, split, methods.Plan(
        backbones=(methods.BackboneSpec(epochs=1),)), 0, tmp_path, model, tables)


def test_a_run_releases_its_compiled_programs(tmp_path, monkeypatch):
  """The seeds of a run share programs; a process running many runs keeps none."""
  c = synthetic_config.get_config("smoke")
  c.method = "emerflow"
  seen = {}
  real = programs.release

  def spy():
    seen["train_step"] = emerflow_meta._train_step.cache_info().currsize
    seen["pooled"] = posterior.pooled_correction._cache_size()
    real()

  monkeypatch.setattr(programs, "release", spy)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  assert seen["train_step"] >= 1 and seen["pooled"] >= 1  # held during the run
  assert emerflow_meta._train_step.cache_info().currsize == 0
  assert align_diagnostics._score_fn.cache_info().currsize == 0
  assert posterior.pooled_correction._cache_size() == 0
