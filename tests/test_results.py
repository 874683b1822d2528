"""Tests for results.json / results.md / auc.png (DESIGN §8)."""

import json

import numpy as np
import pytest

from emerflow_jax import results
from experiments.configs import common

PHASES = ["cold", "warm_a", "warm_b", "warm_c"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(method="base", backbone="deepfm"):
  c = common.base_config("synthetic", n_max=100, k=10)
  c.method, c.backbone = method, backbone
  return c


def _seed(seed, base, val=True):
  auc = {p: base + 0.01 * i + 0.1 * seed for i, p in enumerate(PHASES)}
  return {"seed": seed, "auc": auc, "f1": {p: v / 2 for p, v in auc.items()},
          "val_auc": dict(auc) if val else None, "val_f1": None,
          "seconds": {"pretrain": 1.0 + seed, "method": 2.0, "total": 3.0 + seed}}


def _summary(method="base", base=0.6, val=True):
  per_seed = [_seed(s, base, val) for s in range(3)]
  return results.summarize(_config(method), "synthetic", per_seed,
                           {"old_items": 5}, total_s=42.0)


def test_summary_follows_the_design_schema():
  s = _summary()
  required = {"dataset", "backbone", "method", "config", "phases", "auc", "f1",
              "seconds"}
  assert required <= set(s)
  assert (s["dataset"], s["backbone"], s["method"]) == ("synthetic", "deepfm", "base")
  assert s["phases"] == PHASES
  assert isinstance(s["config"], dict) and s["config"]["data"]["n_max"] == 100
  for metric in ("auc", "f1"):
    assert list(s[metric]) == PHASES
    assert all(len(s[metric][p]) == 3 for p in PHASES)  # one value per seed
  assert s["auc"]["cold"] == pytest.approx([0.6, 0.7, 0.8])
  assert s["f1"]["warm_c"] == pytest.approx([0.315, 0.365, 0.415])
  assert set(s["seconds"]) == {"pretrain", "method", "total"}
  assert s["seconds"] == {"pretrain": 6.0, "method": 6.0, "total": 42.0}
  assert s["val_auc"]["cold"] == pytest.approx([0.6, 0.7, 0.8])
  assert "val_auc" not in _summary(val=False)


def test_backbone_cost_is_summed_only_when_every_seed_has_it():
  per_seed = [{"seed": i, "auc": None, "f1": None,
               "seconds": {"pretrain": 1.0, "method": 2.0, "total": 3.0,
                           "backbones": 4.0 + i}} for i in range(2)]
  s = results.summarize(_config("base"), "synthetic", per_seed, {}, total_s=9.0)
  assert s["seconds"]["backbones"] == 9.0
  del per_seed[1]["seconds"]["backbones"]  # a seed from before it was recorded
  s = results.summarize(_config("base"), "synthetic", per_seed, {}, total_s=9.0)
  assert "backbones" not in s["seconds"]
  json.dumps(s)  # plain JSON all the way down


def test_write_run_writes_json_markdown_and_png(tmp_path):
  s = _summary()
  results.write_run(tmp_path, s)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(s))
  assert json.loads((tmp_path / "runs" / "base_deepfm.json").read_text()) == on_disk
  md = (tmp_path / "results.md").read_text()
  assert "mean ± std over 3 seeds" in md
  # cold AUC over seeds: 0.6, 0.7, 0.8 -> mean 0.7, (population) std 0.0816.
  assert "0.7000 ± 0.0816" in md
  assert "| base | deepfm |" in md and "Validation AUC" in md
  png = (tmp_path / "auc.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 1000
  assert not list(tmp_path.glob("*.tmp*"))


def test_runs_of_several_methods_line_up_with_the_best_in_bold(tmp_path):
  results.write_run(tmp_path, _summary("base", base=0.6))
  results.write_run(tmp_path, _summary("emerflow", base=0.65))
  md = (tmp_path / "results.md").read_text()
  assert "| emerflow | deepfm |" in md and "| base | deepfm |" in md
  assert "**0.7500 ± 0.0816**" in md and "**0.7000 ± 0.0816**" not in md
  latest = json.loads((tmp_path / "results.json").read_text())
  assert latest["method"] == "emerflow"
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
      "base_deepfm.json", "emerflow_deepfm.json"]


def test_mean_std_format():
  assert results.mean_std([0.5, 0.5]) == "0.5000 ± 0.0000"
  assert results.mean_std(np.asarray([1.0, 2.0, 3.0])) == "2.0000 ± 0.8165"


def test_write_json_atomic_handles_numpy_values(tmp_path):
  path = tmp_path / "r.json"
  results.write_json_atomic(path, {"a": np.float32(0.5), "b": np.arange(3),
                                   "c": np.int64(4)})
  assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 4}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
