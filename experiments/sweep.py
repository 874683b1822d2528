r"""Runs one ``experiments.run`` trial per point of a hyperparameter sweep.

  python -m experiments.sweep --config=experiments/configs/movielens100k.py \
      --grid='meta.inner_steps=1,3,5;meta.alpha=0.05,0.1' --workdir=/tmp/sweep \
      [--workers=2] [--random=4 --seed=0] [--config.seeds=1]

Without ``--grid`` the points come from ``get_sweep()`` in the config file.
``--random=N`` runs N points drawn from the grid.  ``--config.<k>=<v>`` flags
apply to every trial.  Each trial runs in ``<workdir>/<name from its
overrides>``; finished trials are skipped on a re-run, failed ones are
recorded and retried.  Writes <workdir>/sweep.json and sweep.md, ranked by
validation AUC.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
_GRID = flags.DEFINE_string("grid", None, "'key=v1,v2;key2=v3,...' (else get_sweep()).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trials run in parallel.")
_RANDOM = flags.DEFINE_integer("random", 0, "Run this many random grid points (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random points.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Seconds per trial (default: none).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config_flag = flags.FLAGS["config"]
  path = config_flags.get_config_filename(config_flag)
  base = dict(config_flags.get_override_values(config_flag))
  if _GRID.value:
    axes = sweep.parse_grid(_GRID.value)
    points = (sweep.random_points(axes, _RANDOM.value, _SEED.value) if _RANDOM.value
              else sweep.grid_points(axes))
  else:
    points = sweep.load_config_sweep(path)
    if points is None:
      raise app.UsageError(f"no --grid and no get_sweep() in {path}")
  sweep.check_keys(_CONFIG.value, points)
  logging.info("sweep: %d trials, %d at a time", len(points), _WORKERS.value)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  summary = sweep.run_sweep(path, points, _WORKDIR.value, workers=_WORKERS.value,
                            base=base, cwd=repo_root, timeout=_TIMEOUT.value,
                            log=logging.info)
  best = summary["best"]
  logging.info("sweep: %s; best by validation: %s", summary["counts"],
               best["name"] if best else "none")


if __name__ == "__main__":
  app.run(main)
