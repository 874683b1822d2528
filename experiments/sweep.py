r"""Runs a hyperparameter sweep on Optuna, one ``experiments.run`` per trial.

  python -m experiments.sweep --config=experiments/configs/movielens100k.py \
      --grid='meta.inner_steps=1,3,5;meta.alpha=0.05,0.1' --workdir=/tmp/sweep \
      [--sampler=grid|random|tpe --trials=N --seed=0] [--workers=2] \
      [--storage=postgresql://user@host/db --study=NAME] [--config.seeds=1]

Without ``--grid`` the points come from ``get_sweep()`` in the config file.
``--sampler=grid`` (default) runs every point once; ``random``/``tpe`` run
``--trials`` draws from the grid's axes.  ``--config.<k>=<v>`` flags apply to
every trial.  The study is SQLite ``<workdir>/study.db`` unless ``--storage``
names a server database; more invocations of this command on the same study
(other shells or machines) share its trials.  Re-running resumes: COMPLETE
trials are kept, failed grid points are retried.  Writes <workdir>/sweep.json
and sweep.md, ranked by validation AUC.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import sharding, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (trial folders).")
_GRID = flags.DEFINE_string("grid", None, "'key=v1,v2;key2=v3,...' (else get_sweep()).")
_SAMPLER = flags.DEFINE_enum("sampler", "grid", list(sweep.SAMPLERS), "Optuna sampler.")
_TRIALS = flags.DEFINE_integer("trials", None, "Trials in all for random/tpe.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampler seed.")
_STORAGE = flags.DEFINE_string("storage", None,
                               "Optuna RDB URL (default: sqlite in the workdir).")
_STUDY = flags.DEFINE_string("study", "sweep", "Study name in the storage.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trials this process runs in parallel.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Seconds per trial (default: none).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.maybe_initialize_distributed(refuse="a sweep shares machines through --storage")
  sharding.setup_compilation_cache()  # runs of one grid share compiled programs
  config_flag = flags.FLAGS["config"]
  path = config_flags.get_config_filename(config_flag)
  base = dict(config_flags.get_override_values(config_flag))
  axes = points = None
  if _GRID.value:
    axes = sweep.parse_grid(_GRID.value)
    sweep.check_keys(_CONFIG.value, [axes])
  else:
    points = sweep.load_config_sweep(path)
    if points is None:
      raise app.UsageError(f"no --grid and no get_sweep() in {path}")
    sweep.check_keys(_CONFIG.value, points)
  if _SAMPLER.value != "grid" and not _TRIALS.value:
    raise app.UsageError(f"--sampler={_SAMPLER.value} needs --trials")
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  summary = sweep.run_sweep(path, points, _WORKDIR.value, axes=axes,
                            sampler=_SAMPLER.value, n_trials=_TRIALS.value,
                            seed=_SEED.value, storage=_STORAGE.value,
                            study_name=_STUDY.value, workers=_WORKERS.value, base=base,
                            cwd=repo_root, timeout=_TIMEOUT.value, log=logging.info)
  best = summary["best"]
  logging.info("sweep: %s; best by validation: %s", summary["counts"],
               best["name"] if best else "none")


if __name__ == "__main__":
  app.run(main)
