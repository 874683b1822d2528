r"""Runs every method x backbone x seed on one dataset and writes the comparison.

  python -m experiments.compare --config=experiments/configs/movielens100k.py \
      --workdir=/tmp/cmp_ml100k \
      --methods=base,dropoutnet,metaemb,mwuf,cvar,emerflow \
      --backbones=deepfm,widedeep --seeds=3 --results_md=RESULTS.md

Writes <workdir>/comparison.md, comparison.json and comparison.png; with
--results_md, also (re)writes this comparison's section of that file, stamped
with the command and the git commit.  A section is keyed by the dataset and
what the config changes from the config file's default (e.g. ``disgenet
(data.options.neg_sampling=degree)``), or by ``--section=NAME``.  A method tied
to one backbone (emerg: emerg_gnn) runs only there, and beside every grid
backbone in the tables when the grid lacks it.  Re-running skips finished runs, and the
backbone cache in <workdir>/backbones is shared by all methods.

The reviewer-grade comparison (DESIGN §10) adds a grid of splits, equal-budget
tuning and paired intervals:

  python -m experiments.compare --config=experiments/configs/movielens100k.py \
      --workdir=/tmp/grid_ml100k --splits=config --tune=20 --seeds=5

``--splits=config`` takes the splits from ``get_splits()`` in the config file,
``--splits='data.n_max=80,100;data.k=5,10'`` from a grid string.  Each split
runs in <workdir>/<split>/ (one comparison.md there, with EmerFlow minus each
baseline and its interval), and <workdir>/summary.md counts EmerFlow's
wins/ties/losses per phase over splits.  ``--tune=N`` first tunes every method
with N Optuna trials on that split's validation holdout.
"""

import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import compare, logs, multisplit, report, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the grid.")
_METHODS = flags.DEFINE_list("methods", "base,dropoutnet,metaemb,mwuf,cvar,emerflow",
                             "Methods to compare; NAME:SOURCE runs NAME with enrich.source=SOURCE "
                             "(e.g. emerflow:agent4rec).")
_BACKBONES = flags.DEFINE_list("backbones", "deepfm,widedeep", "Backbones.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per run (default: config.seeds).")
_RESULTS_MD = flags.DEFINE_string("results_md", "",
                                  "Also write this comparison's section of this file.")
_SECTION = flags.DEFINE_string("section", "", "Name (key and title) of the RESULTS.md "
                               "section; default: the dataset and the config's changes "
                               "from the config file's default.")
_SPLITS = flags.DEFINE_string("splits", "", "'config' (get_splits() of the config file) "
                              "or 'data.n_max=80,100;data.k=5,10'; empty: the config's "
                              "one split.")
_TUNE = flags.DEFINE_integer("tune", 0, "Optuna trials per method and split (0: none).")
_TUNE_SAMPLER = flags.DEFINE_enum("tune_sampler", "tpe", ["tpe", "random"],
                                  "Sampler of the tuning trials.")
_TRIAL_SEEDS = flags.DEFINE_integer("trial_seeds", 1, "Seeds per tuning trial.")
_TUNE_FROM_CONFIG = flags.DEFINE_bool("tune_from_config", True, "Trial 0 of every "
                                      "method is its config's own point of the space.")
_STORAGE = flags.DEFINE_string("storage", None, "Optuna RDB URL of the tuning studies "
                               "(default: sqlite in each split's folder).")
_N_BOOT = flags.DEFINE_integer("n_boot", 1000, "Bootstrap replicates per interval.")
flags.mark_flags_as_required(["config", "workdir"])


def _command() -> str:
  """The command line without machine-specific paths (RESULTS.md is committed).

  The workdir becomes DIR; another absolute path becomes relative to the
  working directory when inside it, else its file name.
  """
  cwd = os.getcwd()
  args = []
  for a in sys.argv[1:]:
    name, eq, value = a.partition("=")
    if name == "--workdir":
      value = "DIR"
    elif eq and os.path.isabs(value):
      inside = os.path.commonpath([cwd, value]) == cwd
      value = os.path.relpath(value, cwd) if inside else os.path.basename(value)
    args.append(shlex.quote(name + eq + value))
  return "python -m experiments.compare " + " ".join(args)


def _section_label(config) -> str:
  """--section, or the dataset with what the command line changed in its config."""
  if _SECTION.value:
    return _SECTION.value
  default, arg = multisplit.load_default(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  return report.section_label(config, default, arg)


def main(argv):
  del argv
  sharding.maybe_initialize_distributed(
      refuse="--tune draws trials per process" if _TUNE.value else "")
  sharding.setup_compilation_cache()  # runs of one grid share compiled programs
  logs.quiet_third_party()
  config = _CONFIG.value
  seeds = _SEEDS.value or config.seeds
  # Stamped before running: the code that produced the numbers, not a later HEAD.
  command, commit = _command(), report.code_version()
  if _SPLITS.value or _TUNE.value:
    _main_splits(config, seeds, command, commit)
    return
  grid = compare.run_grid(config, _WORKDIR.value, _METHODS.value, _BACKBONES.value,
                          seeds, commit=commit)
  if not grid["runs"]:
    raise app.UsageError(f"no run finished: {grid['failed']}")
  summary = report.write_comparison(_WORKDIR.value, grid)
  logging.info("wrote %s", os.path.join(_WORKDIR.value, "comparison.md"))
  if _RESULTS_MD.value:
    label = _section_label(config)
    section = report.results_section(summary, command, commit, label)
    report.update_results_md(_RESULTS_MD.value, label, section)
    logging.info("updated the %r section of %s", label, _RESULTS_MD.value)
  if grid["failed"]:
    logging.warning("%d run(s) failed: %s", len(grid["failed"]),
                    [f"{f['method']}_{f['backbone']}" for f in grid["failed"]])


def _main_splits(config, seeds, command, commit):
  """The grid of splits (--splits), optionally tuned (--tune)."""
  if _SPLITS.value == "config":
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    splits = multisplit.load_splits(path)
    if splits is None:
      raise app.UsageError(f"--splits=config but {path} has no get_splits()")
  else:
    splits = multisplit.parse_splits(_SPLITS.value) if _SPLITS.value else [{}]
  tune_kwargs = {"sampler": _TUNE_SAMPLER.value, "trial_seeds": _TRIAL_SEEDS.value,
                 "storage": _STORAGE.value, "from_config": _TUNE_FROM_CONFIG.value}
  summary = multisplit.run_splits(config, _WORKDIR.value, splits, _METHODS.value,
                                  _BACKBONES.value, seeds, tune_trials=_TUNE.value,
                                  tune_kwargs=tune_kwargs, n_boot=_N_BOOT.value,
                                  commit=commit)
  logging.info("wrote %s", os.path.join(_WORKDIR.value, "summary.md"))
  if _RESULTS_MD.value:
    label = _section_label(config)
    section = multisplit.results_section(summary, _WORKDIR.value, command, commit, label)
    report.update_results_md(_RESULTS_MD.value, label, section)
    logging.info("updated the %r section of %s", label, _RESULTS_MD.value)
  failed = [f for s in summary["splits"] for f in s["failed"]]
  if failed:
    logging.warning("%d run(s) failed: %s", len(failed), failed)


if __name__ == "__main__":
  app.run(main)
