"""A real EmerFlow run (synthetic smoke config): the alignments' FVU curves, and
the main alignment's held-out quality on old items in results.json."""

import json
import math

import numpy as np
import pytest

from emerflow_jax import curves, train
from experiments.configs import synthetic as synthetic_config

REPORT_KEYS = ("heldout_fvu", "heldout_auc", "heldout_auc_mean", "n_items", "n_rows")


def _run(workdir, **overrides):
  config = synthetic_config.get_config("smoke")
  config.method = "emerflow"
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  return train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def closed_run(tmp_path_factory):
  """The default (closed-form, lowrank) alignment, with a rule backbone."""
  workdir = tmp_path_factory.mktemp("closed")
  return workdir, _run(workdir)


def _finite(values):
  return all(math.isfinite(v) for v in values)


def _check_report(rep):
  assert all(k in rep for k in REPORT_KEYS), rep
  assert _finite(rep[k] for k in REPORT_KEYS)
  assert 0 < rep["heldout_auc"] < 1 and 0 < rep["heldout_auc_mean"] < 1
  assert rep["n_items"] > 0 and rep["n_rows"] > rep["n_items"]


def test_closed_form_alignments_write_cv_and_chosen_fvu(closed_run):
  workdir, _ = closed_run
  seed_dir = workdir / "seed_0"
  scalars = curves.read_scalars(seed_dir / "tb")
  for stage in ("align", "rule-align"):
    assert list(seed_dir.glob(f"{stage}-*")), stage  # the stage the curves describe
    cv = scalars[f"{stage}/cv_fvu"]
    assert [s for s, _ in cv] == list(range(len(cv))) and len(cv) > 1  # one per candidate
    assert _finite(v for _, v in cv)
    assert {f"{stage}/cv_ridge_lambda", f"{stage}/cv_rank"} <= set(scalars)
    (best, held), = scalars[f"{stage}/fvu_heldout"]
    (step, fit), = scalars[f"{stage}/fvu_train"]
    assert best == step == int(np.argmin([v for _, v in cv]))
    assert held == pytest.approx(min(v for _, v in cv))
    assert math.isfinite(fit) and fit <= held + 1e-6  # in-sample fits no worse


def test_results_json_reports_the_alignment_per_seed(closed_run):
  workdir, res = closed_run
  on_disk = json.loads((workdir / "results.json").read_text())
  (rep,) = on_disk["report"]["align"]
  assert rep == res["report"]["align"][0]
  _check_report(rep)
  assert rep["estimate"] == "cv_folds" and rep["kind"] == "lowrank"


def test_the_report_reads_no_emerging_row(closed_run, tmp_path):
  """eval.test=False hands the method no emerging item: the report is the same."""
  _, res = closed_run
  val_only = _run(tmp_path, **{"eval.test": False, "eval.curves": False})
  assert val_only["auc"] is None
  assert val_only["report"]["align"] == res["report"]["align"]


def test_the_mlp_writes_train_and_heldout_fvu_over_steps(tmp_path):
  res = _run(tmp_path, **{"align.kind": "mlp", "align.steps": 20, "eval.test": False})
  steps = int(res["config"]["align"]["steps"])
  scalars = curves.read_scalars(tmp_path / "seed_0" / "tb")
  for stage in ("align", "rule-align"):
    for tag in ("fvu_train", "fvu_heldout"):
      points = scalars[f"{stage}/{tag}"]
      assert [s for s, _ in points] == list(range(1, steps + 1)), (stage, tag)
      assert _finite(v for _, v in points)
  (rep,) = res["report"]["align"]
  _check_report(rep)
  assert rep["estimate"] == "early_stopping_holdout"


def test_each_seed_splits_its_seconds_by_backbone_stage_and_fit_stage(closed_run):
  """A seed's time adds up: method = fit + evaluate, every backbone timed, and
  EmerFlow's fit stages (both alignments, the rule's meta-training, the
  regeneration state) add up to no more than its fit."""
  workdir, res = closed_run
  sec = json.loads((workdir / "seed_0" / "result.json").read_text())["seconds"]
  assert sec["fit"] > 0 and sec["evaluate"] > 0
  assert sec["fit"] + sec["evaluate"] == pytest.approx(sec["method"], abs=1e-6)
  assert sec["pretrain"] + sec["method"] == pytest.approx(sec["total"], abs=1e-6)
  assert set(sec["per_backbone"]) == {"main", "rule"}
  assert sum(sec["per_backbone"].values()) == pytest.approx(sec["backbones"])
  (stages,) = res["report"]["seconds"]
  assert set(stages) == {"align", "rule_align", "meta", "regen"}
  assert all(v >= 0 for v in stages.values())
  assert sum(stages.values()) <= sec["fit"]
  assert res["seconds"]["fit"] + res["seconds"]["evaluate"] == pytest.approx(
      res["seconds"]["method"], abs=1e-6)
