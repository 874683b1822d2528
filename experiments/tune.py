r"""Tunes every method with the same number of Optuna trials, then tests it.

  python -m experiments.tune --config=experiments/configs/movielens100k.py \
      --workdir=/tmp/tune_ml100k --methods=base,cvar,emerflow --backbone=deepfm \
      --trials=20 [--sampler=tpe|random --seed=0] [--trial_seeds=1] \
      [--storage=postgresql://user@host/db] [--config.seeds=5]

Each trial runs with ``eval.test=False`` on the validation holdout of old
items; the objective is the mean validation AUC over all four phases,
averaged over ``--trial_seeds`` seeds.  Writes, per method,
<workdir>/<method>_<backbone>/chosen.json (the chosen overrides) and, with
them, the test run's results.json there (``config.seeds`` seeds).  Re-running
resumes the studies in <workdir>/tune.db (or ``--storage``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import logs, sharding, tune

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Tuning folder.")
_METHODS = flags.DEFINE_list("methods", "base,dropoutnet,metaemb,mwuf,cvar,emerflow",
                             "Methods to tune.")
_BACKBONE = flags.DEFINE_string("backbone", None, "Backbone (default: config.backbone).")
_TRIALS = flags.DEFINE_integer("trials", 20, "Optuna trials per method.")
_SAMPLER = flags.DEFINE_enum("sampler", "tpe", ["tpe", "random"], "Optuna sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampler seed.")
_TRIAL_SEEDS = flags.DEFINE_integer("trial_seeds", 1, "Seeds per tuning trial.")
_FROM_CONFIG = flags.DEFINE_bool("from_config", True, "Trial 0 is the config's own "
                                 "point of the space.")
_STORAGE = flags.DEFINE_string("storage", None,
                               "Optuna RDB URL (default: sqlite in the workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.maybe_initialize_distributed(refuse="tuning shares machines through --storage")
  sharding.setup_compilation_cache()  # runs of one grid share compiled programs
  logs.quiet_third_party()
  for method in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.method = method
    config.backbone = _BACKBONE.value or config.backbone
    res = tune.tune_and_run(config, _WORKDIR.value, _TRIALS.value, sampler=_SAMPLER.value,
                            seed=_SEED.value, trial_seeds=_TRIAL_SEEDS.value,
                            storage=_STORAGE.value, from_config=_FROM_CONFIG.value)
    logging.info("tune: %s chose %s (validation %.4f); test AUC %s", method,
                 res["chosen"]["params"], res["chosen"]["val_objective"], res["auc"])


if __name__ == "__main__":
  app.run(main)
