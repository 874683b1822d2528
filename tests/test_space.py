"""Search-space types and their sampling through a real Optuna study."""

import math

import optuna
import pytest

from emerflow_jax import space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "warmup.lr": space.Float(1e-3, 1e-1, log=True),
    "meta.alpha": space.Float(0.0, 0.5),
    "warmup.steps": space.Int(2, 10, step=2),
    "meta.inner_steps": space.Int(1, 64, log=True),
    "align.loss": space.Categorical(["mse", "cosine"]),
}


def test_suggest_uses_config_keys_and_stays_in_bounds():
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  for _ in range(20):
    trial = study.ask()
    values = space.suggest(trial, SPACE)
    assert list(values) == list(SPACE)
    assert trial.params == values  # the Optuna name is the dotted key
    assert 1e-3 <= values["warmup.lr"] <= 1e-1
    assert 0.0 <= values["meta.alpha"] <= 0.5
    assert values["warmup.steps"] in (2, 4, 6, 8, 10)
    assert isinstance(values["meta.inner_steps"], int) and 1 <= values["meta.inner_steps"] <= 64
    assert values["align.loss"] in ("mse", "cosine")
    study.tell(trial, values["meta.alpha"])
  dists = study.trials[0].distributions
  assert dists["warmup.lr"].log and not dists["meta.alpha"].log
  assert dists["warmup.steps"].step == 2 and dists["meta.inner_steps"].log


def test_log_float_samples_cover_decades():
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
  lrs = [space.suggest(study.ask(), {"lr": space.Float(1e-4, 1.0, log=True)})["lr"]
         for _ in range(200)]
  # Uniform in log10 over 4 decades: about a quarter below 1e-3.
  assert 0.1 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.4


def test_fixed_trial_replays_chosen_values():
  trial = optuna.trial.FixedTrial({"warmup.lr": 0.01, "align.loss": "mse"})
  got = space.suggest(trial, {"warmup.lr": space.Float(1e-3, 1e-1, log=True),
                              "align.loss": space.Categorical(("mse", "cosine"))})
  assert got == {"warmup.lr": 0.01, "align.loss": "mse"}


def test_params_are_frozen_and_validated():
  p = space.Float(0.1, 1.0)
  with pytest.raises(Exception):
    p.low = 0.5
  assert space.Categorical([1, 2]) == space.Categorical((1, 2))
  assert hash(space.Categorical([1, 2])) == hash(space.Categorical((1, 2)))
  for bad in (lambda: space.Float(1.0, 0.1), lambda: space.Float(0.0, 1.0, log=True),
              lambda: space.Int(5, 1), lambda: space.Int(0, 4, log=True),
              lambda: space.Int(1, 4, step=0), lambda: space.Categorical([]),
              lambda: space.Categorical([[1, 2]])):
    with pytest.raises(ValueError):
      bad()
  with pytest.raises(TypeError, match="warmup.lr"):
    space.suggest(optuna.trial.FixedTrial({}), {"warmup.lr": (0.1, 1.0)})


def test_grid_size():
  assert space.grid_size({"a": space.Int(2, 10, step=2), "b": space.Categorical("xyz")}) == 15
  assert space.grid_size({"a": space.Int(1, 4), "c": space.Float(0.0, 1.0)}) == math.inf
  assert space.grid_size({"a": space.Float(0.5, 0.5), "b": space.Int(1, 3)}) == 3
  assert space.grid_size({}) == 1
