"""The comparison a reviewer asks for: every method x backbone x seed on one protocol.

``run_grid`` runs each (method, backbone) through ``train.train_and_evaluate``
in its own sub-workdir ``<workdir>/<method>_<backbone>``, with one backbone
cache for the whole grid (``config.optim.cache_dir``) so that a backbone is
pretrained once per (backbone, seed, dropout rate) and shared by every method.
A finished run (its ``results.json`` holds the requested seeds) is read back,
not re-run; a run whose stored config differs from the requested one is an
error rather than a silent mix.  A failing run is recorded and the grid goes on.

A method tied to some backbones (``Method.backbone_kinds``, e.g. EmerG on its
own GNN) runs only on those of the grid, and the other pairs are recorded as
unsupported; when the grid has none of them it runs once on its own backbone
(an "own-backbone" run), which the report sets beside every grid backbone:
the test rows are the same whatever the backbone.

``report`` turns the grid into tables, a plot and a RESULTS.md section.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections

from emerflow_jax import methods as methods_lib
from emerflow_jax import cache, results, train, tune


def parse_method(spec: str) -> tuple[str, str | None]:
  """"emerflow:agent4rec" -> ("emerflow", "agent4rec"); "base" -> ("base", None).

  A ``:source`` suffix runs the method with ``enrich.source=source``, so one
  grid can compare LLM sources side by side.
  """
  method, _, source = spec.partition(":")
  return method, (source or None)


def run_dir(workdir: pathlib.Path, method: str, backbone: str) -> pathlib.Path:
  """The folder of one grid cell: ``<workdir>/<method>_<backbone>``.

  Args:
    workdir: the grid's folder.
    method: the method spec (a ``:source`` suffix becomes ``-source``).
    backbone: the backbone's name.

  Returns:
    The run's folder (not created).
  """
  return pathlib.Path(workdir) / f"{method.replace(':', '-')}_{backbone}"


def grid_config(config: ml_collections.ConfigDict, method: str, backbone: str,
                seeds: int, cache_dir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` for one grid cell (only existing fields are set).

  ``method`` may carry a ``:source`` suffix (``parse_method``).

  Args:
    config: the dataset's config (not modified).
    method: the method spec, e.g. "emerflow" or "emerflow:agent4rec".
    backbone: the backbone's name.
    seeds: seeds per run.
    cache_dir: the backbone cache shared by the grid (``optim.cache_dir``).

  Returns:
    The cell's config.
  """
  c = copy.deepcopy(config)
  name, source = parse_method(method)
  c.method, c.backbone, c.seeds = name, backbone, int(seeds)
  if source is not None:
    c.enrich.source = source
  c.optim.cache_dir = cache_dir
  return c


# Config sections read by one method family only (section -> method-name
# prefix): a change there cannot change another method's run, so it does not
# invalidate that run.  warmup is shared: every method ends in its fine-tuning.
def _comparable(config_dict: dict, sections: Sequence[str]) -> dict:
  """The ``sections`` of a config dict, without ``cache.UNKEYED_FIELDS``."""
  d = json.loads(json.dumps(config_dict, default=str))
  for section, key in cache.UNKEYED_FIELDS:
    d.get(section, {}).pop(key, None)
  return {k: v for k, v in d.items() if k in sections}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


def finished_run(path: pathlib.Path, config: ml_collections.ConfigDict
                 ) -> dict | None:
  """The stored results.json when it holds this config's seeds, else None.

  Only the sections the method's results are keyed by are compared (its plan's
  and the shared ones, as in ``train.result_key``), without path fields and
  ``seeds``: another method's or another stage's settings do not matter.

  Args:
    path: the run's folder (``run_dir``).
    config: the config the run is wanted with.

  Returns:
    The results.json dict if its seeds are ``config.seed`` ..
    ``config.seed + config.seeds - 1``; None if there is none, or other seeds.

  Raises:
    ValueError: the folder holds a run of a different config.
  """
  done = path / "results.json"
  if not done.exists():
    return None
  res = json.loads(done.read_text())
  plan = methods_lib.get_method(str(config.method)).plan(config)
  sections = methods_lib.SHARED_SECTIONS + tuple(plan.sections)
  diff = _diff(_comparable(res["config"], sections), _comparable(config.to_dict(), sections))
  diff = [k for k in diff if k != "seeds"]
  if diff:
    raise ValueError(f"{done} was produced with a different config "
                     f"(differs in {', '.join(diff[:8])}); use a fresh --workdir")
  want = [int(config.seed) + s for s in range(int(config.seeds))]
  return res if res.get("seeds") == want else None


def backbone_kinds(method: str) -> tuple[str, ...] | None:
  """The backbones a method spec can run on (``Method.backbone_kinds``); None: any.

  A method that cannot be loaded (unknown, or its module fails to import)
  also gets None: its run fails and is recorded as a failure.
  """
  try:
    return methods_lib.get_method(parse_method(method)[0]).backbone_kinds
  except Exception:  # pylint: disable=broad-except
    return None


def grid_cells(methods: Sequence[str], backbones: Sequence[str]
               ) -> tuple[list[tuple[str, str, bool]], list[dict]]:
  """The (method, backbone, own-backbone) cells a grid runs, and the pairs it skips.

  Args:
    methods: method specs (``parse_method``).
    backbones: the grid's backbones.

  Returns:
    (cells, unsupported): cells are ``(method, backbone, own)`` in backbone-
    major order, then the own-backbone runs (``own`` True) of the methods
    that support none of ``backbones``; unsupported lists
    ``{"method", "backbone", "reason"}`` for every pair not run.
  """
  kinds = {m: backbone_kinds(m) for m in methods}
  cells, unsupported = [], []
  for backbone in backbones:
    for m in methods:
      if kinds[m] is None or backbone in kinds[m]:
        cells.append((m, backbone, False))
      else:
        unsupported.append({"method": m, "backbone": backbone,
                            "reason": f"runs only on {', '.join(kinds[m])}"})
  for m in methods:
    if kinds[m] and not set(kinds[m]) & set(backbones):
      cells.append((m, kinds[m][0], True))
  return cells, unsupported


def run_grid(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             methods: Sequence[str], backbones: Sequence[str], seeds: int,
             run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
             commit: str = "unknown", tune_trials: int = 0,
             tune_kwargs: dict | None = None) -> dict:
  """Runs (or reads back) every method x backbone with ``seeds`` seeds.

  Args:
    config: the dataset's config (method/backbone/seeds are overridden).
    workdir: the grid's folder; re-running resumes.
    methods: registry names, e.g. ("base", "dropoutnet", ...).
    backbones: e.g. ("deepfm", "widedeep"); a method tied to other backbones
      runs as ``grid_cells`` says.
    seeds: seeds per run.
    run_fn: ``train.train_and_evaluate`` unless given (tests).
    commit: the code version running now; stored next to each run it
      produces (``stamp.json``), so a run read back later keeps its own.
    tune_trials: when > 0, each method is first tuned with this many Optuna
      trials on the validation holdout (``tune.tune_method``, studies in
      ``<workdir>/tune.db``) and runs its seeds with the chosen overrides
      (``<workdir>/<method>_<backbone>/chosen.json``).
    tune_kwargs: more arguments of ``tune.tune_method`` (sampler, seed,
      trial_seeds, storage).

  Returns:
    {"runs": [results.json dicts, each with "label" (the method spec),
     "commit" and "own_backbone"], "failed": [{"method", "backbone", "error"}],
     "unsupported": ``grid_cells``'s pairs not run,
     "read_back": ["<method>_<backbone>", ...], "seconds": grid wall time}.
  """
  run_fn = run_fn or train.train_and_evaluate
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  cache = config.optim.cache_dir or str(workdir / "backbones")
  t0 = time.time()
  cells, unsupported = grid_cells(methods, backbones)
  out = {"runs": [], "failed": [], "unsupported": unsupported, "read_back": []}
  for method, backbone, own in cells:
    c = grid_config(config, method, backbone, seeds, cache)
    path = run_dir(workdir, method, backbone)
    tag = {"label": method, "own_backbone": own}
    if tune_trials:
      try:
        chosen = tune.tune_method(c, workdir, tune_trials, run_fn=run_fn,
                                  name=path.name, **(tune_kwargs or {}))
      except Exception as e:  # pylint: disable=broad-except
        logging.error("compare: tuning %s failed: %s", path.name, traceback.format_exc())
        out["failed"].append({"method": method, "backbone": backbone,
                              "error": f"tuning: {type(e).__name__}: {e}"})
        continue
      c = tune.apply(c, chosen["params"])
    done = finished_run(path, c)
    if done is not None:
      logging.info("compare: %s_%s finished, reading it back", method, backbone)
      out["read_back"].append(path.name)
      out["runs"].append(dict(done, commit=_stamp(path), **tag))
      continue
    logging.info("compare: running %s with %s (%d seeds)", method, backbone, seeds)
    try:
      res = run_fn(c, str(path))
      results.write_json_atomic(path / "stamp.json", {"commit": commit})
      out["runs"].append(dict(res, commit=commit, **tag))
    except Exception as e:  # pylint: disable=broad-except
      # One broken or missing method must not lose the rest of the grid.
      logging.error("compare: %s_%s failed: %s", method, backbone,
                    traceback.format_exc())
      out["failed"].append({"method": method, "backbone": backbone,
                            "error": f"{type(e).__name__}: {e}"})
  out["seconds"] = time.time() - t0
  return out


def _stamp(path: pathlib.Path) -> str:
  stamp = path / "stamp.json"
  return json.loads(stamp.read_text())["commit"] if stamp.exists() else "unknown"
