"""Equal-budget tuning: the trial config, the objective, and no test row read."""

import json

import numpy as np
import pytest

from emerflow_jax import data, protocol, space, tasks, tune
from experiments.configs import synthetic


def _tiny_config(method="base"):
  c = synthetic.get_config("smoke")
  c.data.options.n_users = 100
  c.data.options.n_items = 150
  c.data.options.mean_count = 40.0
  c.data.n_max, c.data.k = 40, 5
  c.data.val_fraction = 0.2
  c.method, c.backbone = method, "fm"
  return c


def test_trial_config_sets_the_space_and_turns_test_off():
  c = _tiny_config()
  t = tune.trial_config(c, {"warmup.lr": 0.02, "warmup.steps": 4}, seeds=2)
  assert (t.warmup.lr, t.warmup.steps, t.seeds, t.eval.test) == (0.02, 4, 2, False)
  assert c.eval.test and c.warmup.steps == _tiny_config().warmup.steps  # a copy
  assert tune.apply(c, {"warmup.lr": 1})["warmup"]["lr"] == 1.0
  assert isinstance(tune.apply(c, {"warmup.lr": 1}).warmup.lr, float)
  with pytest.raises(KeyError, match="warmup.nope"):
    tune.apply(c, {"warmup.nope": 1})


def test_objective_is_the_four_phase_validation_mean_and_refuses_test():
  val = {"cold": [0.5, 0.7], "warm_a": [0.6, 0.6], "warm_b": [0.7, 0.5],
         "warm_c": [0.8, 0.6]}
  res = {"auc": None, "f1": None, "val_auc": val}
  assert tune.objective(res) == pytest.approx(np.mean([0.5, 0.7, 0.6, 0.6, 0.7, 0.5,
                                                       0.8, 0.6]))
  with pytest.raises(ValueError, match="test rows"):
    tune.objective(dict(res, auc=val))
  with pytest.raises(ValueError, match="validation"):
    tune.objective({"auc": None, "f1": None})


def test_tuning_never_reads_test_rows(tmp_path, monkeypatch):
  config = _tiny_config("base")
  ds = data.load_dataset(config.data)
  split = protocol.split_emerging_items(ds, config.data.n_max, config.data.k)
  emerging_row = np.isin(ds.items, split.emerging_items)
  assert emerging_row.sum() > 0
  packed = []  # every row index any stage packed into a batch
  for name in ("pack_flat", "pack_phase"):
    real = getattr(tasks, name)

    def spy(ds_, rows, *a, _real=real, **k):
      packed.append(np.asarray(rows).ravel())
      return _real(ds_, rows, *a, **k)
    monkeypatch.setattr(tasks, name, spy)

  chosen = tune.tune_method(config, tmp_path, n_trials=2, sampler="random",
                            log=lambda _: None)
  touched = np.concatenate(packed)
  assert touched.size > 0 and not emerging_row[touched].any()
  trial_runs = sorted((tmp_path / "tuning" / "base_fm").glob("t*/results.json"))
  assert len(trial_runs) == 2 == chosen["n_trials"]
  for path in trial_runs:
    res = json.loads(path.read_text())
    assert res["auc"] is None and res["f1"] is None and not res["config"]["eval"]["test"]
    assert all(np.isfinite(res["val_auc"][p]).all() for p in protocol.PHASES)
  space_keys = tune.methods.get_method("base").plan(config).search_space
  assert set(chosen["params"]) == set(space_keys)
  saved = json.loads((tmp_path / "base_fm" / "chosen.json").read_text())
  assert saved["params"] == chosen["params"]
  best = max(tune.objective(json.loads(p.read_text())) for p in trial_runs)
  assert saved["val_objective"] == pytest.approx(best)

  # The spy can fail: the test run that follows does read the emerging rows.
  packed.clear()
  res = tune.tune_and_run(config, tmp_path, n_trials=2, sampler="random",
                          log=lambda _: None)
  assert emerging_row[np.concatenate(packed)].any()
  assert res["auc"] is not None and res["chosen"]["params"] == chosen["params"]
  run = json.loads((tmp_path / "base_fm" / "results.json").read_text())
  for key, value in chosen["params"].items():
    section, field = key.split(".")
    assert run["config"][section][field] == pytest.approx(value)


def test_a_method_without_a_space_gets_one_trial(tmp_path, monkeypatch):
  config = _tiny_config("base")
  calls = []
  plan = tune.methods.get_method("base").plan(config)
  monkeypatch.setattr(type(tune.methods.get_method("base")), "plan",
                      lambda self, c: type(plan)(search_space={}))

  def fake_run(c, workdir):
    calls.append((c.eval.test, workdir))
    return {"auc": None, "f1": None, "val_auc": {p: [0.6] for p in protocol.PHASES}}
  chosen = tune.tune_method(config, tmp_path, n_trials=5, run_fn=fake_run,
                            log=lambda _: None)
  assert chosen["params"] == {} and chosen["n_trials"] == 1 and len(calls) == 1
  assert calls[0][0] is False


@pytest.mark.parametrize("from_config", [True, False])
def test_trial_zero_is_the_configs_own_point(tmp_path, from_config):
  config = _tiny_config("base")
  config.warmup.lr, config.warmup.steps = 0.0123, 7
  seen = []

  def fake_run(c, workdir):
    seen.append((float(c.warmup.lr), int(c.warmup.steps)))
    # The config's own point scores best; a sampled one cannot match it.
    good = seen[-1] == (0.0123, 7)
    return {"auc": None, "f1": None,
            "val_auc": {p: [0.7 if good else 0.6] for p in protocol.PHASES}}
  chosen = tune.tune_method(config, tmp_path, n_trials=3, run_fn=fake_run,
                            from_config=from_config, log=lambda _: None)
  assert len(seen) == 3 and chosen["n_trials"] == 3  # the budget includes trial 0
  if from_config:
    assert seen[0] == (0.0123, 7) and chosen["best_trial"] == 0
    assert chosen["params"] == {"warmup.lr": 0.0123, "warmup.steps": 7}
    assert chosen["first_trial"] == "config"
  else:
    assert (0.0123, 7) not in seen and chosen["first_trial"] == "sampled"
  # Tuning again reads the study back: no trial is queued or run twice.
  again = tune.tune_method(config, tmp_path, n_trials=3, run_fn=fake_run,
                           from_config=from_config, log=lambda _: None)
  assert len(seen) == 3 and again["params"] == chosen["params"]


def test_a_config_outside_its_space_samples_every_trial(tmp_path):
  config = _tiny_config("base")
  config.warmup.steps = 500  # the space is Int(2, 20)
  seen, logged = [], []

  def fake_run(c, workdir):
    seen.append(int(c.warmup.steps))
    return {"auc": None, "f1": None, "val_auc": {p: [0.6] for p in protocol.PHASES}}
  chosen = tune.tune_method(config, tmp_path, n_trials=2, run_fn=fake_run,
                            log=logged.append)
  assert len(seen) == 2 and 500 not in seen
  assert chosen["first_trial"].startswith("sampled (config outside the space")
  assert any("warmup.steps" in line and "outside" in line for line in logged)


def test_space_contains():
  assert space.contains(space.Int(2, 20, step=2), 8)
  assert not space.contains(space.Int(2, 20, step=2), 7)
  assert not space.contains(space.Int(2, 20), 2.5)
  assert space.contains(space.Float(0.5, 1.0), 1.0)
  assert not space.contains(space.Float(1e-3, 1e-1, log=True), 0.5)
  assert space.contains(space.Categorical(("a", "b")), "b")
  assert not space.contains(space.Categorical(("a", "b")), "c")
  assert not space.contains(space.Float(0.0, 1.0), True)


def test_a_one_trial_budget_runs_the_configs_point(tmp_path):
  config = _tiny_config("base")
  seen = []

  def fake_run(c, workdir):
    seen.append(float(c.warmup.lr))
    return {"auc": None, "f1": None, "val_auc": {p: [0.6] for p in protocol.PHASES}}
  chosen = tune.tune_method(config, tmp_path, n_trials=1, run_fn=fake_run,
                            log=lambda _: None)
  assert seen == [config.warmup.lr] and chosen["best_trial"] == 0


def test_a_changed_config_never_ranks_trials_scored_under_the_old_one(tmp_path):
  """A setting outside the space changes every trial: the study starts afresh."""
  config = _tiny_config("base")
  seen = []

  def fake_run(c, workdir):
    seen.append(int(c.optim.epochs))
    score = 0.7 if c.optim.epochs == 1 else 0.6
    return {"auc": None, "f1": None, "val_auc": {p: [score] for p in protocol.PHASES}}
  first = tune.tune_method(config, tmp_path, n_trials=2, run_fn=fake_run,
                           log=lambda _: None)
  config.optim.epochs = 2  # not in base's space
  second = tune.tune_method(config, tmp_path, n_trials=2, run_fn=fake_run,
                            log=lambda _: None)
  assert seen == [1, 1, 2, 2]  # both trials rerun under the new config
  assert first["study"] != second["study"]
  assert first["val_objective"] == pytest.approx(0.7)
  assert second["val_objective"] == pytest.approx(0.6)
  # The unchanged config reads its own study back.
  config.optim.epochs = 1
  again = tune.tune_method(config, tmp_path, n_trials=2, run_fn=fake_run,
                           log=lambda _: None)
  assert len(seen) == 4 and again["study"] == first["study"]


@pytest.mark.parametrize("dataset", ["movielens100k", "disgenet", "repodb",
                                     "clinical_trials", "movielens1m"])
def test_every_method_s_config_is_a_point_of_its_search_space(dataset):
  """Trial 0 of ``compare --tune`` is each method's own config: it must lie in the space."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.configs.{dataset}")
  for name in tune.methods.REGISTRY:
    c = module.get_config()
    c.method = name
    if name == "emerg":
      c.backbone = "emerg_gnn"
    params = dict(tune.methods.get_method(name).plan(c).search_space)
    values = tune.config_values(c, list(params))
    outside = {k: v for k, v in values.items() if not space.contains(params[k], v)}
    assert not outside, f"{dataset}/{name}: config outside its search space: {outside}"
