"""compare: the grid skips finished runs, records failures and unsupported pairs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from emerflow_jax import compare, report
from experiments.configs import synthetic

PHASES = report.PHASES


def _tiny_config():
  c = synthetic.get_config("smoke")
  c.data.options.n_users = 100
  c.data.options.n_items = 150
  c.data.options.mean_count = 40.0
  c.data.n_max, c.data.k = 40, 5
  c.data.val_fraction = 0.2
  return c


def _recorder(seen):
  """A run_fn that records (method, backbone, source) and returns a stub result."""
  def run(c, workdir):
    seen.append((c.method, c.backbone, c.enrich.source))
    os.makedirs(workdir)
    return {"method": c.method, "backbone": c.backbone, "seeds": [0]}
  return run


def test_grid_runs_skips_finished_and_records_failures(tmp_path, repo_root):
  config = _tiny_config()
  grid = compare.run_grid(config, tmp_path, ["base", "no_such_method"], ["fm"], seeds=1,
                          commit="abc1234")
  assert [r["method"] for r in grid["runs"]] == ["base"]
  assert grid["failed"][0]["method"] == "no_such_method"
  assert (tmp_path / "backbones").is_dir()  # one backbone cache for the grid
  for p in PHASES:
    assert np.isfinite(grid["runs"][0]["auc"][p][0])

  calls = []

  def must_not_rerun(c, workdir):
    calls.append(c.method)
    raise RuntimeError("boom")

  again = compare.run_grid(config, tmp_path, ["base", "no_such_method"], ["fm"],
                           seeds=1, run_fn=must_not_rerun)
  assert calls == ["no_such_method"]  # the finished run was read back
  assert again["read_back"] == ["base_fm"]
  assert again["runs"][0]["auc"] == grid["runs"][0]["auc"]
  # The run keeps the code version that produced it.
  assert again["runs"][0]["commit"] == grid["runs"][0]["commit"] == "abc1234"

  # EmerFlow's own sections (and another baseline's) cannot change base's run.
  config.meta.inner_steps = 7
  config.align.lam = 0.5
  config.cvar.keep = 0.3
  config.regen.pool_steps = 3   # sections no hand-kept table listed: the plan says
  config.gme.epochs = 2
  again = compare.run_grid(config, tmp_path, ["base"], ["fm"], seeds=1,
                           run_fn=must_not_rerun)
  assert again["read_back"] == ["base_fm"]

  # A changed config must not silently reuse the old run.
  config.warmup.steps = 3
  with pytest.raises(ValueError, match="warmup.steps"):
    compare.run_grid(config, tmp_path, ["base"], ["fm"], seeds=1, run_fn=must_not_rerun)

  # The binary reads the finished run back and writes the three files and RESULTS.md.
  results_md = tmp_path / "RESULTS.md"
  cmd = [sys.executable, "-m", "experiments.compare",
         "--config=experiments/configs/synthetic.py:smoke",
         "--config.data.options.n_users=100", "--config.data.options.n_items=150",
         "--config.data.options.mean_count=40", "--config.data.n_max=40",
         "--config.data.k=5", "--config.data.val_fraction=0.2",
         f"--workdir={tmp_path}", "--methods=base", "--backbones=fm", "--seeds=1",
         f"--results_md={results_md}"]
  proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "reading it back" in proc.stderr
  for name in ("comparison.md", "comparison.json", "comparison.png"):
    assert (tmp_path / name).stat().st_size > 0
  summary = json.loads((tmp_path / "comparison.json").read_text())
  assert summary["runs"][0]["auc"]["cold"]["values"] == grid["runs"][0]["auc"]["cold"]
  text = results_md.read_text()
  # Keyed and titled by what the command line changed in the smoke config.
  label = ("synthetic:smoke (data.k=5, data.n_max=40, data.options.mean_count=40.0, "
           "data.options.n_items=150, data.options.n_users=100, data.val_fraction=0.2)")
  assert f"<!-- results:{label}:begin -->" in text and "--workdir=DIR" in text
  assert f"## {label}: emerging-item comparison" in text
  assert str(tmp_path) not in text  # no machine-specific path in RESULTS.md


def test_method_source_variants_set_the_enrichment_source(tmp_path):
  config = _tiny_config()
  assert compare.parse_method("emerflow:agent4rec") == ("emerflow", "agent4rec")
  assert compare.parse_method("base") == ("base", None)
  c = compare.grid_config(config, "emerflow:galkars", "fm", 1, str(tmp_path))
  assert (c.method, c.enrich.source, c.backbone) == ("emerflow", "galkars", "fm")
  assert compare.grid_config(config, "emerflow", "fm", 1, "").enrich.source == \
      config.enrich.source
  assert compare.run_dir(tmp_path, "emerflow:galkars", "fm").name == "emerflow-galkars_fm"
  seen = []
  grid = compare.run_grid(config, tmp_path, ["emerflow", "emerflow:raw"], ["fm"], 1,
                          run_fn=_recorder(seen))
  assert seen == [("emerflow", "fm", config.enrich.source), ("emerflow", "fm", "raw")]
  assert [r["label"] for r in grid["runs"]] == ["emerflow", "emerflow:raw"]


def test_a_method_runs_only_on_the_backbones_it_supports(tmp_path):
  config = _tiny_config()
  assert compare.backbone_kinds("emerg") == ("emerg_gnn",)
  assert compare.backbone_kinds("base") is None
  assert compare.backbone_kinds("no_such_method") is None  # its run will fail
  seen = []
  grid = compare.run_grid(config, tmp_path / "a", ["base", "emerg", "emerflow"],
                          ["deepfm", "widedeep"], 1, run_fn=_recorder(seen))
  # emerg is skipped on both grid backbones, then runs once on its own.
  assert [(m, b) for m, b, _ in seen] == [
      ("base", "deepfm"), ("emerflow", "deepfm"), ("base", "widedeep"),
      ("emerflow", "widedeep"), ("emerg", "emerg_gnn")]
  assert not grid["failed"]
  assert [(u["method"], u["backbone"]) for u in grid["unsupported"]] == [
      ("emerg", "deepfm"), ("emerg", "widedeep")]
  assert "emerg_gnn" in grid["unsupported"][0]["reason"]
  assert [r["own_backbone"] for r in grid["runs"]] == [False] * 4 + [True]
  assert (tmp_path / "a" / "emerg_emerg_gnn").is_dir()

  # With its backbone in the grid it runs there only, as an ordinary member.
  seen.clear()
  grid = compare.run_grid(config, tmp_path / "b", ["base", "emerg"],
                          ["deepfm", "emerg_gnn"], 1, run_fn=_recorder(seen))
  assert [(m, b) for m, b, _ in seen] == [("base", "deepfm"), ("base", "emerg_gnn"),
                                          ("emerg", "emerg_gnn")]
  assert [(u["method"], u["backbone"]) for u in grid["unsupported"]] == [
      ("emerg", "deepfm")]
  assert not any(r["own_backbone"] for r in grid["runs"])

  # Nor is it tuned on an unsupported pair: its only trial runs on emerg_gnn.
  tuned = []

  def failing_trial(c, workdir):
    tuned.append(c.backbone)
    raise RuntimeError("trial failed")

  grid = compare.run_grid(config, tmp_path / "c", ["emerg"], ["deepfm"], 1,
                          run_fn=failing_trial, tune_trials=1)
  assert set(tuned) == {"emerg_gnn"}
  assert [(f["backbone"], f["error"][:7]) for f in grid["failed"]] == [
      ("emerg_gnn", "tuning:")]
