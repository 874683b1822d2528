"""Equal-budget tuning: every method gets the same number of Optuna trials.

DESIGN §10: each method is tuned over its own declared space
(``methods.get_method(name).plan(config).search_space``), with the same
number of trials, on the validation holdout of old items only.  A trial is
one run with ``eval.test=False``: the harness then removes the emerging items
from the split before anything is built, so a trial cannot read a test row
(``train.run_seed``); ``tune_method`` also refuses a trial result that holds
a test AUC.  Trial 0 is each method's own config (its defaults, chosen on
validation when they were set), the sampler draws the rest of the budget.

The objective is the mean validation AUC over all four phases (cold, warm_a,
warm_b, warm_c), averaged over the trial seeds: a method is chosen for the
whole cold-to-warm curve, as it is reported.

Layout under ``workdir``::

  tune.db                          the studies (SQLite), unless ``storage``
  tuning/<method>_<backbone>/t000/ one run per trial (results.json, seed_<s>/)
  <method>_<backbone>/chosen.json  the chosen overrides and their score
  <method>_<backbone>/results.json the test run with them (``tune_and_run``)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from emerflow_jax import methods, protocol, results, space, study, sweep, train

OBJECTIVE = ("mean over trial seeds of the mean validation AUC over cold, warm_a, "
             "warm_b and warm_c (held-out old items; no test row is read)")


def run_name(method: str, backbone: str) -> str:
  """The folder name of a method on a backbone: ``<method>_<backbone>``.

  Args:
    method: the method's name (":" becomes "-", to keep it a safe path).
    backbone: the backbone's name.

  Returns:
    The name.
  """
  return f"{method.replace(':', '-')}_{backbone}"


def apply(config: ml_collections.ConfigDict, params: Mapping[str, Any]
          ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted-key overrides set.

  Args:
    config: the config (not modified).
    params: dotted key -> value; a value for a float field is cast to float.

  Returns:
    The overridden deep copy.

  Raises:
    KeyError: naming a key the config lacks.
  """
  c = copy.deepcopy(config)
  for key, value in params.items():
    node, *path, last = [c] + key.split(".")
    for part in path:
      node = node[part]
    if last not in node:
      raise KeyError(f"search-space key {key!r} is not a config field")
    node[last] = type(node[last])(value) if isinstance(node[last], float) else value
  return c


def config_values(config: ml_collections.ConfigDict, keys: Sequence[str]) -> dict[str, Any]:
  """The config's own values of dotted ``keys`` (KeyError naming a missing one).

  Args:
    config: the run config.
    keys: dotted keys.

  Returns:
    key -> value.
  """
  return {key: sweep.lookup(config, key) for key in keys}


def trial_config(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                 seeds: int) -> ml_collections.ConfigDict:
  """The config of one tuning trial: ``params`` on ``config``, validation only.

  Args:
    config: the run config.
    params: the trial's overrides, dotted key -> value.
    seeds: seeds per trial.

  Returns:
    A copy with the overrides, ``seeds`` set and ``eval.test`` False.
  """
  c = apply(config, params)
  c.seeds = int(seeds)
  c.eval.test = False
  return c


def objective(res: dict) -> float:
  """The tuning objective of one trial's results.json (``OBJECTIVE``).

  Raises:
    ValueError: the run scored test rows, or has no validation AUC.
  """
  if res.get("auc") is not None or res.get("f1") is not None:
    raise ValueError("a tuning trial scored the test rows; it must run with "
                     "eval.test=False")
  score = sweep.validation_score(res, protocol.PHASES)
  if score is None:
    raise ValueError("a tuning trial has no validation AUC (data.val_fraction = 0?)")
  return score


def tune_method(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                n_trials: int, sampler: str = "tpe", seed: int = 0,
                trial_seeds: int = 1, storage: str | None = None,
                run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
                name: str | None = None, from_config: bool = True,
                log: Callable[[str], None] = logging.info) -> dict:
  """Tunes ``config.method`` with ``config.backbone`` (or reads its choice back).

  With ``from_config`` the study's first trial is the config's own values of
  the space (each method's defaults, themselves chosen on validation), and
  the sampler draws the rest of the budget: a few random draws in a space of
  many settings can all land worse than the defaults, and then the method
  would be reported below its own untuned self.  Every method is treated
  alike, so budgets stay equal.

  Args:
    config: the run config (method and backbone set); its values are the
      starting point and every key outside the space stays as it is.
    workdir: the tuning folder (layout in the module docstring).
    n_trials: trials for this method (every method gets the same).
    sampler: "tpe" or "random".
    seed: the sampler's seed.
    trial_seeds: seeds per trial, starting at ``config.seed``.
    storage: an Optuna RDB URL (default: SQLite ``workdir/tune.db``); workers
      sharing it share the trials.
    run_fn: ``train.train_and_evaluate`` unless given.
    name: the run's folder name (default ``<method>_<backbone>``).
    from_config: queue the config's own point of the space as trial 0 (a
      study that has trials already is left as it is; a config outside the
      space is logged and every trial sampled).
    log: progress messages.

  Returns:
    The chosen.json dict: {"method", "backbone", "params", "val_objective",
    "objective", "n_trials", "space", "study"}.
  """
  if sampler not in ("tpe", "random"):
    raise ValueError(f"tuning samples a space: want tpe or random, got {sampler!r}")
  run_fn = run_fn or train.train_and_evaluate
  workdir = pathlib.Path(workdir).absolute()
  name = name or run_name(config.method, config.backbone)
  plan = methods.get_method(config.method).plan(config)
  params = dict(plan.search_space)
  # A method with nothing to tune needs one trial: more would repeat it.
  budget = int(n_trials) if params else 1
  trials_dir = workdir / "tuning" / name
  trials_dir.mkdir(parents=True, exist_ok=True)
  url = storage or study.sqlite_url(workdir / "tune.db")
  # Keyed by every section a trial reads: a changed config opens a new study
  # instead of ranking trials that were scored under the old one.
  key = train.result_key(config, plan, int(config.seed), trial_seeds=trial_seeds)
  st_name = f"tune-{name}-{key}"
  st = study.open_study(url, st_name, study.make_sampler(sampler, seed=seed))

  start = config_values(config, list(params)) if from_config and params else None
  first = "config" if start is not None else "sampled"
  outside = [k for k, v in (start or {}).items() if not space.contains(params[k], v)]
  if outside:  # e.g. a smoke config's 1 epoch below a space's least 2
    log(f"tune {name}: the config's {outside} lie outside the search space; "
        "every trial is sampled")
    start, first = None, f"sampled (config outside the space in {outside})"
  if start is not None:
    with study.lock_for(url)():  # workers sharing the study queue it once
      if not st.get_trials(deepcopy=False):
        st.enqueue_trial(start, user_attrs={"queued": "config"})

  def execute(number: int, values: dict, beat: Callable[[], None]) -> dict:
    del beat  # in-process: the trial's own thread keeps the worker alive
    run_dir = trials_dir / f"t{number:03d}"
    attrs = {"workdir": str(run_dir.relative_to(workdir)), "overrides": values}
    try:
      res = run_fn(trial_config(config, values, trial_seeds), str(run_dir))
      value = objective(res)
    except Exception as e:  # pylint: disable=broad-except
      raise study.TrialError(f"{type(e).__name__}: {e}", attrs) from e
    return dict(attrs, value=value, val_auc=res.get("val_auc"))

  study.work(st, lambda t: space.suggest(t, params), execute, n_trials=budget,
             lock=study.lock_for(url), log=log)
  complete = [t for t in st.get_trials(deepcopy=False)
              if t.state == study.State.COMPLETE]
  if not complete:
    raise RuntimeError(f"tuning {name}: no trial finished; see the FAIL trials' "
                       f"errors in {url} (study {st_name})")
  best = max(complete, key=lambda t: (t.value, -t.number))
  chosen = {"method": config.method, "backbone": config.backbone,
            "params": dict(best.params), "val_objective": best.value,
            "objective": OBJECTIVE, "n_trials": len(complete), "budget": budget,
            "trial_seeds": trial_seeds, "best_trial": best.number,
            "first_trial": first,
            "space": {k: repr(v) for k, v in params.items()},
            "study": st_name}
  out = workdir / name
  out.mkdir(parents=True, exist_ok=True)
  results.write_json_atomic(out / "chosen.json", chosen)
  return chosen


def tune_and_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 n_trials: int, test_seeds: int | None = None,
                 run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
                 **kwargs) -> dict:
  """Tunes ``config.method``, then runs its test seeds with the chosen config.

  Args:
    config: the run config (method and backbone set).
    workdir: the tuning folder; the test run goes to ``<method>_<backbone>/``
      next to its chosen.json.
    n_trials: tuning trials.
    test_seeds: seeds of the test run (default ``config.seeds``).
    run_fn: ``train.train_and_evaluate`` unless given.
    **kwargs: passed to ``tune_method``.

  Returns:
    The test run's results.json dict, with "chosen" (the chosen.json dict).
  """
  run_fn = run_fn or train.train_and_evaluate
  chosen = tune_method(config, workdir, n_trials, run_fn=run_fn, **kwargs)
  c = apply(config, chosen["params"])
  c.seeds = int(test_seeds or config.seeds)
  c.eval.test = True
  res = run_fn(c, str(pathlib.Path(workdir).absolute() / run_name(c.method, c.backbone)))
  return dict(res, chosen=chosen)


def read_chosen(workdir: str | os.PathLike, method: str, backbone: str) -> dict | None:
  """The chosen.json of a tuned method, or None.

  Args:
    workdir: the tuning folder.
    method: the method's name.
    backbone: the backbone's name.

  Returns:
    The chosen.json dict (``tune_method``), or None if it is not there.
  """
  path = pathlib.Path(workdir) / run_name(method, backbone) / "chosen.json"
  return json.loads(path.read_text()) if path.exists() else None
