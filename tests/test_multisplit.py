"""The comparison over a grid of splits: intervals per split, the tally, end to end."""

import json
import os
import pathlib

import numpy as np

from emerflow_jax import checkpoint, multisplit, protocol, tune
from experiments.configs import common, synthetic

PHASES = protocol.PHASES


def _tiny_config():
  c = synthetic.get_config("smoke")
  c.data.options.n_users = 100
  c.data.options.n_items = 150
  c.data.options.mean_count = 40.0
  c.data.n_max, c.data.k = 40, 5
  c.data.val_fraction = 0.2
  return c


def _fake_runner(strength):
  """A run_fn writing predictions whose quality is strength[(method, n_max)].

  Scores are labels plus noise; the noise scale falls with the strength, so
  a stronger method ranks better on every resample when the gap is large.
  """
  def run(c, workdir):
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(60), 8)
    labels = rng.integers(0, 2, owner.size)
    per = {p: [] for p in PHASES}
    for s in range(c.seeds):
      noise = np.random.default_rng(100 + s).normal(size=owner.size)
      preds = {"labels": labels, "owner": owner}
      for i, p in enumerate(PHASES):
        gap = strength[(c.method, c.data.n_max)][i]
        preds[f"prob_{p}"] = labels * gap + noise
        per[p].append(0.5 + gap / 10)
      os.makedirs(f"{workdir}/seed_{s}", exist_ok=True)
      checkpoint.save_arrays(f"{workdir}/seed_{s}/predictions.npz", **preds)
    res = {"dataset": "toy", "method": c.method, "backbone": c.backbone,
           "config": c.to_dict(), "seeds": list(range(c.seeds)), "auc": per, "f1": per,
           "val_auc": per, "seconds": {"pretrain": 1.0, "method": 1.0, "total": 2.0}}
    pathlib.Path(workdir, "results.json").write_text(json.dumps(res))
    return res
  return run


def test_intervals_and_wins_ties_losses_over_splits(tmp_path):
  # Split 40: EmerFlow far ahead at cold, equal at warm_a, far behind at warm_c.
  # Split 36: equal everywhere.  (strength per phase: cold, warm_a, warm_b, warm_c)
  strength = {("emerflow", 40): (3.0, 1.0, 1.0, 0.0), ("base", 40): (0.0, 1.0, 1.0, 3.0),
              ("emerflow", 36): (1.0,) * 4, ("base", 36): (1.0,) * 4}
  splits = [{"data.n_max": 40, "data.k": 5}, {"data.n_max": 36, "data.k": 5}]
  summary = multisplit.run_splits(_tiny_config(), tmp_path, splits, ["base", "emerflow"],
                                  ["fm"], seeds=2, n_boot=200,
                                  run_fn=_fake_runner(strength))
  (t,) = summary["tally"]
  assert (t["backbone"], t["method"]) == ("fm", "base")
  assert t["phases"]["cold"] == {"win": 1, "tie": 1, "loss": 0}
  assert t["phases"]["warm_a"] == {"win": 0, "tie": 2, "loss": 0}
  assert t["phases"]["warm_c"] == {"win": 0, "tie": 1, "loss": 1}
  first = tmp_path / "data.k=5,data.n_max=40"
  assert (first / "base_fm" / "results.json").exists()  # one flat level per run
  md = (first / "comparison.md").read_text()
  row = [l for l in md.splitlines() if l.startswith("| fm | base | ")][-1]
  cells = row.split(" | ")[2:]
  assert cells[0].startswith("**+") and cells[3].startswith("**-")
  assert "**" not in cells[1]  # warm_a: the interval holds zero, not bold
  assert "| fm | base | 1/1/0 | 0/2/0 | 0/2/0 | 0/1/1 |" in (
      tmp_path / "summary.md").read_text()
  again = json.loads((tmp_path / "summary.json").read_text())
  assert again["tally"] == summary["tally"]


def test_summary_states_the_tuning_budget_and_its_validation_seeds():
  base = {"dataset": "d", "splits": [], "tally": [], "level": 0.95, "seconds": 1.0}
  one = multisplit.summary_markdown(dict(base, tune_trials=4))  # older summaries
  two = multisplit.summary_markdown(dict(base, tune_trials=4, trial_seeds=2))
  assert "tuned with 4 Optuna trials on the validation holdout;" in one
  assert "tuned with 4 Optuna trials on the validation holdout, each scored on 2 seeds;" in two
  assert "no tuning" in multisplit.summary_markdown(dict(base, tune_trials=0, trial_seeds=2))


def test_an_own_backbone_baseline_is_paired_with_emerflow_on_every_backbone(tmp_path):
  # emerg runs only on emerg_gnn; the grid has fm and deepfm.  EmerFlow is far
  # ahead at cold and far behind at warm_c, on both.
  strength = {("emerflow", 40): (3.0, 1.0, 1.0, 0.0), ("emerg", 40): (0.0, 1.0, 1.0, 3.0),
              ("base", 40): (1.0,) * 4}
  summary = multisplit.run_splits(_tiny_config(), tmp_path, [{"data.n_max": 40}],
                                  ["base", "emerg", "emerflow"], ["fm", "deepfm"],
                                  seeds=2, n_boot=200, run_fn=_fake_runner(strength))
  (split,) = summary["splits"]
  assert not split["failed"] and split["runs"] == 5
  assert [(u["method"], u["backbone"]) for u in split["unsupported"]] == [
      ("emerg", "fm"), ("emerg", "deepfm")]
  rows = summary["intervals"][split["name"]]
  assert [(r["backbone"], r["method"]) for r in rows] == [
      ("fm", "base"), ("fm", "emerg (emerg_gnn)"),
      ("deepfm", "base"), ("deepfm", "emerg (emerg_gnn)")]
  for r in rows[1::2]:  # read from emerg_emerg_gnn/, over the same seeds and rows
    assert r["seeds"] == [0, 1]
    assert r["phases"]["cold"]["outcome"] == "win"
    assert r["phases"]["warm_c"]["outcome"] == "loss"
  md = (tmp_path / split["name"] / "comparison.md").read_text()
  assert "| deepfm | emerg (emerg_gnn) | **+" in md
  text = (tmp_path / "summary.md").read_text()
  assert "| fm | emerg (emerg_gnn) | 1/0/0 |" in text
  assert "Not run (unsupported backbone): emerg with deepfm (runs only on emerg_gnn)" in text


def test_splits_come_from_configs_or_a_grid_string():
  parsed = multisplit.parse_splits("data.n_max=80,100;data.k=5")
  assert parsed == [{"data.n_max": 80, "data.k": 5}, {"data.n_max": 100, "data.k": 5}]
  # They apply to a config as get_splits() points do (int fields stay ints).
  config = common.base_config("movielens100k", n_max=100, k=10)
  applied = tune.apply(config, parsed[0])
  assert (applied.data.n_max, applied.data.k) == (80, 5)
  assert multisplit.parse_splits("data.source=a,b") == [{"data.source": "a"},
                                                         {"data.source": "b"}]
  ml = multisplit.load_splits("experiments/configs/movielens100k.py")
  assert ml == [{"data.n_max": 100, "data.k": 10}, {"data.n_max": 80, "data.k": 5}]
  wide = multisplit.load_splits("experiments/configs/movielens100k.py:wide")
  assert len(wide) == 6 and {"data.n_max": 120, "data.k": 5} in wide
  assert len(multisplit.load_splits("experiments/configs/movielens100k.py:smoke")) == 2


def test_tune_and_compare_end_to_end(tmp_path):
  """Real runs: one split (the grid is tested above), each method tuned, then tested."""
  splits = [{"data.n_max": 36, "data.k": 4}]
  summary = multisplit.run_splits(
      _tiny_config(), tmp_path, splits, ["base", "emerflow"], ["fm"], seeds=1,
      tune_trials=1, tune_kwargs={"sampler": "random"}, n_boot=50)
  assert all(not s["failed"] and s["runs"] == 2 for s in summary["splits"]), summary
  for s in summary["splits"]:
    sdir = tmp_path / s["name"]
    for m in ("base", "emerflow"):
      chosen = json.loads((sdir / f"{m}_fm" / "chosen.json").read_text())
      run = json.loads((sdir / f"{m}_fm" / "results.json").read_text())
      trial = json.loads((sdir / "tuning" / f"{m}_fm" / "t000" / "results.json")
                         .read_text())
      assert trial["auc"] is None and run["auc"] is not None
      for key, value in chosen["params"].items():
        section, field = key.split(".")
        got = run["config"][section][field]
        assert got == value if isinstance(value, str) else np.isclose(got, value)
      assert run["config"]["data"]["n_max"] == s["overrides"]["data.n_max"]
    (row,) = summary["intervals"][s["name"]]
    assert all(row["phases"][p]["lo"] <= row["phases"][p]["diff"] <= row["phases"][p]["hi"]
               for p in PHASES)
  (t,) = summary["tally"]
  assert all(sum(t["phases"][p].values()) == 1 for p in PHASES)
  assert (tmp_path / "summary.md").exists()
  # The cost of the comparison: two test runs and two trials, as each recorded it;
  # a read-back invocation keeps it.
  sdir = tmp_path / summary["splits"][0]["name"]
  runs = [sdir / f"{m}_fm" / "results.json" for m in ("base", "emerflow")]
  runs += [sdir / "tuning" / f"{m}_fm" / "t000" / "results.json" for m in ("base", "emerflow")]
  spent = sum(json.loads(p.read_text())["seconds"]["total"] for p in runs)
  assert np.isclose(summary["recorded_seconds"], spent) and spent > 0
  again = multisplit.run_splits(
      _tiny_config(), tmp_path, splits, ["base", "emerflow"], ["fm"], seeds=1,
      tune_trials=1, tune_kwargs={"sampler": "random"}, n_boot=50)
  assert np.isclose(again["recorded_seconds"], spent)
  assert f"the runs and trials took {spent:.0f} s" in (tmp_path / "summary.md").read_text()
