"""End to end: the real run binary on the synthetic smoke config.

  python -m experiments.run --config=experiments/configs/synthetic.py:smoke \
      --config.method=base --workdir=<tmp>
"""

import dataclasses
import json
import subprocess

import numpy as np
import pytest

from emerflow_jax import data, train
from emerflow_jax.data import dataset
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
  assert set(res["seconds"]) == {"pretrain", "method", "total"}
  assert all(v > 0 for v in res["seconds"].values())
  assert "mean ± std" in (workdir / "results.md").read_text()
  assert (workdir / "auc.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  assert (workdir / "base_deepfm" / "seed_0" / "result.json").exists()
  assert "test AUC" in proc.stderr


def test_second_invocation_reuses_finished_seeds(smoke_run, experiment_argv, repo_root):
  workdir, _ = smoke_run
  seed_file = workdir / "base_deepfm" / "seed_0" / "result.json"
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
