"""compare: the grid skips finished runs, records failures, writes its three files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from emerflow_jax import compare
from experiments.configs import synthetic

PHASES = compare.PHASES


def _tiny_config():
  c = synthetic.get_config("smoke")
  c.data.options.n_users = 100
  c.data.options.n_items = 150
  c.data.options.mean_count = 40.0
  c.data.n_max, c.data.k = 40, 5
  c.data.val_fraction = 0.2
  return c


def _fake_run(method, backbone, aucs, seeds=(0,)):
  """A results.json-like dict with the given per-phase mean AUCs."""
  per = {p: [a + 0.001 * s for s in range(len(seeds))] for p, a in zip(PHASES, aucs)}
  return {"dataset": "toy", "method": method, "backbone": backbone,
          "seeds": list(seeds), "auc": per, "f1": per, "val_auc": per,
          "seconds": {"pretrain": 1.0, "method": 2.0, "total": 3.0},
          "counts": {"old_items": 1, "base_rows": 2, "emerging_items": 3,
                     "test_rows": 4}}


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
  assert again["skipped"] == ["base_fm"]
  assert again["runs"][0]["auc"] == grid["runs"][0]["auc"]
  # The run keeps the code version that produced it.
  assert again["runs"][0]["commit"] == grid["runs"][0]["commit"] == "abc1234"

  # EmerFlow's own sections (and another baseline's) cannot change base's run.
  config.meta.inner_steps = 7
  config.align.lam = 0.5
  config.cvar.keep = 0.3
  again = compare.run_grid(config, tmp_path, ["base"], ["fm"], seeds=1,
                           run_fn=must_not_rerun)
  assert again["skipped"] == ["base_fm"]

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
  assert "<!-- results:synthetic:begin -->" in text and "--workdir=DIR" in text
  assert str(tmp_path) not in text  # no machine-specific path in RESULTS.md


def test_tables_bold_the_best_and_list_where_a_baseline_beats_emerflow(tmp_path):
  runs = [_fake_run("base", "deepfm", [0.70, 0.80, 0.70, 0.70], seeds=(0, 1)),
          _fake_run("emerflow", "deepfm", [0.75, 0.75, 0.75, 0.75], seeds=(0, 1)),
          _fake_run("base", "widedeep", [0.60, 0.60, 0.60, 0.60], seeds=(0, 1))]
  grid = {"runs": runs, "failed": [{"method": "cvar", "backbone": "fm",
                                    "error": "ValueError: x"}],
          "skipped": [], "seconds": 5.0}
  summary = compare.write_comparison(tmp_path, grid)
  beats = [(b["backbone"], b["metric"], b["phase"], b["method"])
           for b in summary["beats_reference"]]
  assert beats == [("deepfm", "auc", "warm_a", "base"), ("deepfm", "f1", "warm_a", "base")]
  md = (tmp_path / "comparison.md").read_text()
  assert "| deepfm | emerflow | **0.7505 ± 0.0005** | 0.7505 ± 0.0005 |" in md
  assert "| deepfm | base | 0.7005 ± 0.0005 | **0.8005 ± 0.0005** |" in md
  # A backbone with a single method has nothing to be best against.
  assert "| widedeep | base | 0.6005 ± 0.0005 |" in md
  assert "| deepfm | AUC | - | base | - | - |" in md
  assert "FAILED cvar with fm" in md
  assert (tmp_path / "comparison.png").stat().st_size > 0


def test_results_md_keeps_other_datasets_sections(tmp_path):
  path = tmp_path / "RESULTS.md"
  compare.update_results_md(path, "movielens100k", "## movielens100k\n\nold table\n")
  compare.update_results_md(path, "disgenet", "## disgenet\n\nits table\n")
  compare.update_results_md(path, "movielens100k", "## movielens100k\n\nnew table\n")
  text = path.read_text()
  assert text.startswith("# Results")
  assert "new table" in text and "old table" not in text and "its table" in text
  assert text.index("movielens100k") < text.index("disgenet")  # order kept
  assert text.count("<!-- results:movielens100k:begin -->") == 1


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

  def fake(c, workdir):
    seen.append((c.method, c.enrich.source))
    os.makedirs(workdir)
    return _fake_run(c.method, c.backbone, [0.5, 0.6, 0.7, 0.8])

  grid = compare.run_grid(config, tmp_path, ["emerflow", "emerflow:raw"], ["fm"], 1,
                          run_fn=fake)
  assert seen == [("emerflow", config.enrich.source), ("emerflow", "raw")]
  assert [r["method"] for r in compare.aggregate(grid)["runs"]] == ["emerflow",
                                                                    "emerflow:raw"]
