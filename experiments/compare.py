r"""Runs every method x backbone x seed on one dataset and writes the comparison.

  python -m experiments.compare --config=experiments/configs/movielens100k.py \
      --workdir=/tmp/cmp_ml100k \
      --methods=base,dropoutnet,metaemb,mwuf,cvar,emerflow \
      --backbones=deepfm,widedeep --seeds=3 --results_md=RESULTS.md

Writes <workdir>/comparison.md, comparison.json and comparison.png; with
--results_md, also (re)writes this dataset's section of that file, stamped with
the command and the git commit.  Re-running skips finished runs, and the
backbone cache in <workdir>/backbones is shared by all methods.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import compare, logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the grid.")
_METHODS = flags.DEFINE_list("methods", "base,dropoutnet,metaemb,mwuf,cvar,emerflow",
                             "Methods to compare; NAME:SOURCE runs NAME with enrich.source=SOURCE "
                             "(e.g. emerflow:agent4rec).")
_BACKBONES = flags.DEFINE_list("backbones", "deepfm,widedeep", "Backbones.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per run (default: config.seeds).")
_RESULTS_MD = flags.DEFINE_string("results_md", "",
                                  "Also write this dataset's section of this file.")
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


def _commit() -> str:
  """Short HEAD hash, plus the library/experiment files that differ from it."""
  def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True, check=False)
  head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
  changed = git("diff", "--name-only", "HEAD", "--", "emerflow_jax",
                "experiments").stdout.split()
  if not changed:
    return head
  more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
  return f"{head} + uncommitted {', '.join(changed[:3])}{more}"


def main(argv):
  del argv
  logs.quiet_third_party()
  config = _CONFIG.value
  seeds = _SEEDS.value or config.seeds
  # Stamped before running: the code that produced the numbers, not a later HEAD.
  command, commit = _command(), _commit()
  grid = compare.run_grid(config, _WORKDIR.value, _METHODS.value, _BACKBONES.value,
                          seeds, commit=commit)
  if not grid["runs"]:
    raise app.UsageError(f"no run finished: {grid['failed']}")
  summary = compare.write_comparison(_WORKDIR.value, grid)
  logging.info("wrote %s", os.path.join(_WORKDIR.value, "comparison.md"))
  if _RESULTS_MD.value:
    section = compare.results_section(summary, command, commit)
    compare.update_results_md(_RESULTS_MD.value, summary["dataset"], section)
    logging.info("updated the %s section of %s", summary["dataset"], _RESULTS_MD.value)
  if grid["failed"]:
    logging.warning("%d run(s) failed: %s", len(grid["failed"]),
                    [f"{f['method']}_{f['backbone']}" for f in grid["failed"]])


if __name__ == "__main__":
  app.run(main)
