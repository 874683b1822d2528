r"""Runs one method on one dataset and writes the per-phase AUC/F1 results.

  python -m experiments.run --config=experiments/configs/movielens100k.py \
      --config.method=emerflow --config.backbone=deepfm --config.seeds=3 \
      --workdir=/tmp/ml100k

Writes <workdir>/results.json, results.md and auc.png.  Re-running with the
same workdir resumes from the Orbax checkpoints and finished seeds.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import logs, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.maybe_initialize_distributed()  # several hosts (docs/scaling.md)
  sharding.setup_compilation_cache()  # runs of one grid share compiled programs
  logs.quiet_third_party()
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("wrote %s/results.json (%.1f s)", _WORKDIR.value,
               summary["seconds"]["total"])


if __name__ == "__main__":
  app.run(main)
