"""Sweeps: grid parsing, resume, failure isolation, ranking by validation only."""

import json
import subprocess
import sys

import pytest

from emerflow_jax import sweep

SMOKE = "experiments/configs/synthetic.py:smoke"


def test_parse_grid_and_product():
  axes = sweep.parse_grid("meta.inner_steps=1,3,5; meta.alpha=0.05,0.1")
  assert axes == {"meta.inner_steps": ["1", "3", "5"], "meta.alpha": ["0.05", "0.1"]}
  points = sweep.grid_points(axes)
  assert len(points) == 6 and points[0] == {"meta.inner_steps": "1", "meta.alpha": "0.05"}
  assert len({sweep.trial_name(p) for p in points}) == 6
  picked = sweep.random_points(axes, 4, seed=0)
  assert len(picked) == 4 and all(p in points for p in picked)
  assert picked == sweep.random_points(axes, 4, seed=0)
  for bad in ("meta.alpha", "meta.alpha=", "a=1;a=2"):
    with pytest.raises(ValueError):
      sweep.parse_grid(bad)


def test_trial_names_are_safe_and_bounded():
  name = sweep.trial_name({"align.hidden": (64, 32), "method": "emerflow"})
  assert "/" not in name and " " not in name and "(" not in name
  long = sweep.trial_name({f"k{i}.field": "x" * 20 for i in range(10)})
  assert len(long) <= 111


def test_trial_argv_is_the_run_binary_contract(tmp_path):
  argv = sweep.trial_argv(SMOKE, {"meta.alpha": 0.05}, tmp_path, base={"seeds": 1})
  assert argv[1:4] == ["-m", "experiments.run", f"--config={SMOKE}"]
  assert "--config.seeds=1" in argv and "--config.meta.alpha=0.05" in argv
  assert argv[-1] == f"--workdir={tmp_path}"


def _fake_results(val, test):
  phases = ["cold", "warm_a", "warm_b", "warm_c"]
  return {"dataset": "synthetic", "method": "emerflow", "backbone": "deepfm",
          "phases": phases, "auc": {p: [test, test] for p in phases},
          "val_auc": {p: [val, val - 0.01] for p in phases},
          "seconds": {"total": 1.0}}


def test_ranks_by_validation_never_by_test(tmp_path):
  # Validation and test rankings disagree: b is best on validation, c on test.
  scores = {"a": (0.60, 0.70), "b": (0.70, 0.60), "c": (0.65, 0.80)}
  points = [{"meta.alpha": k} for k in scores]
  for p in points:
    d = tmp_path / sweep.trial_name(p)
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_fake_results(*scores[p["meta.alpha"]])))
  summary = sweep.run_sweep(SMOKE, points, tmp_path, workers=2, log=lambda _: None)
  assert summary["counts"] == {"done": 0, "skipped": 3, "failed": 0}
  order = [t["overrides"]["meta.alpha"] for t in summary["trials"]]
  assert order == ["b", "c", "a"]
  assert summary["best"]["overrides"] == {"meta.alpha": "b"}
  assert summary["best"]["val_score"] == pytest.approx(0.695)
  assert summary["best"]["test_score"] == pytest.approx(0.60)
  md = (tmp_path / "sweep.md").read_text()
  assert md.index("meta.alpha=b") < md.index("meta.alpha=c") < md.index("meta.alpha=a")
  assert json.loads((tmp_path / "sweep.json").read_text())["best"]["name"] == "meta.alpha=b"


def test_sweep_isolates_a_failing_trial_and_resumes(tmp_path, repo_root):
  good, bad = {"warmup.steps": 1}, {"warmup.steps": "abc"}
  base = {"method": "base"}
  summary = sweep.run_sweep(SMOKE, [good, bad], tmp_path, workers=2, base=base,
                            cwd=str(repo_root), log=lambda _: None)
  by_name = {t["name"]: t for t in summary["trials"]}
  g, b = by_name[sweep.trial_name(good)], by_name[sweep.trial_name(bad)]
  assert g["status"] == "done" and g["rank"] == 1 and 0 < g["val_score"] < 1
  assert b["status"] == "failed" and "abc" in b["error"]
  assert (tmp_path / g["workdir"] / "results.json").exists()
  assert "abc" in (tmp_path / "sweep.md").read_text()
  # Second call: the finished trial is reused, the failed one is tried again.
  again = sweep.run_sweep(SMOKE, [good, bad], tmp_path, workers=2, base=base,
                          cwd=str(repo_root), log=lambda _: None)
  assert again["counts"] == {"done": 0, "skipped": 1, "failed": 1}


def test_sweep_binary_reads_get_sweep_from_the_config(tmp_path, repo_root):
  config = tmp_path / "swept.py"
  config.write_text(
      "from experiments.configs import synthetic\n"
      "def get_config(arg=None):\n"
      "  return synthetic.get_config(arg)\n"
      "def get_sweep(arg=None):\n"
      "  return [{'meta.alpha': 0.05}, {'meta.inner_steps': 'oops'}]\n")
  work = tmp_path / "sweep"
  done = work / sweep.trial_name({"meta.alpha": 0.05})
  done.mkdir(parents=True)
  (done / "results.json").write_text(json.dumps(_fake_results(0.6, 0.6)))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={config}:smoke",
       f"--workdir={work}", "--config.seeds=1"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((work / "sweep.json").read_text())
  assert summary["counts"] == {"done": 0, "skipped": 1, "failed": 1}
  assert summary["base_overrides"] == {"seeds": 1}
  assert "oops" in [t for t in summary["trials"] if t["status"] == "failed"][0]["error"]


def test_sweep_binary_rejects_unknown_keys(tmp_path, repo_root):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={SMOKE}",
       f"--workdir={tmp_path}", "--grid=meta.no_such_field=1,2"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no_such_field" in proc.stderr
