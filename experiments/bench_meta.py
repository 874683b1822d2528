r"""Times EmerFlow's meta-training step against per-task loops and PyTorch.

  python -m experiments.bench_meta --workdir=/tmp/bench \
      [--tasks=32,256,1024,4096] [--inner_steps=1,3,5] [--repeats=5] \
      [--impls=jax_vmap_jit,jax_task_loop,torch_task_loop,torch_func_vmap] \
      [--devices=1,2,4] [--scaling_tasks=1024] [--torch_threads=0] \
      [--e2e_results=/tmp/ml100k/results.json] [--tiny] \
      [--config=experiments/configs/movielens100k.py]

Writes <workdir>/bench.json (DESIGN §8), bench.md and bench.png.  The align
and meta sections of ``--config`` (default: the shared defaults) set the
mapper and the meta-learning rule; the data are synthetic with ML-1M shapes.
``--tiny`` shrinks everything to a seconds-long run (tests, CI).  Exits with
an error, before timing anything, if the implementations disagree.
"""

import dataclasses

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import bench, logs
from experiments.configs import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config whose model/align/meta sections are used "
    "(default: the shared defaults).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_TASKS = flags.DEFINE_list("tasks", None, "Tasks per meta step.")
_INNER = flags.DEFINE_list("inner_steps", None, "Inner steps T.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed runs per case (median).")
_IMPLS = flags.DEFINE_list("impls", None, f"Subset of {','.join(bench.IMPLS)}.")
_LOOP_CAP = flags.DEFINE_integer("loop_cap", None, "Max tasks a loop impl times per step.")
_DEVICES = flags.DEFINE_list("devices", None,
                             "Forced CPU device counts for scaling ('' to skip).")
_SCALING_TASKS = flags.DEFINE_integer("scaling_tasks", None,
                                      "Tasks per step in the scaling runs.")
_ADAPT = flags.DEFINE_list("adapt_items", None, "Item counts for adaptation-only timing.")
_PROFILE = flags.DEFINE_bool("profile", True, "Profile the jax_vmap_jit step.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None,
                                      "torch threads (0: the faster of 1 and default).")
_E2E = flags.DEFINE_string("e2e_results", "", "results.json of an emerflow run.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes: a seconds-long run.")
flags.mark_flags_as_required(["workdir"])


def _ints(values):
  return tuple(int(v) for v in values if v != "")


def main(argv):
  del argv
  logs.quiet_third_party()
  options = bench.TINY if _TINY.value else bench.Options()
  overrides = {"tasks": _TASKS.value, "inner_steps": _INNER.value,
               "devices": _DEVICES.value, "adapt_items": _ADAPT.value}
  changes = {k: _ints(v) for k, v in overrides.items() if v is not None}
  for name, flag in (("repeats", _REPEATS), ("loop_cap", _LOOP_CAP),
                     ("torch_threads", _TORCH_THREADS), ("scaling_tasks", _SCALING_TASKS)):
    if flag.value is not None:
      changes[name] = flag.value
  if _IMPLS.value is not None:
    changes["impls"] = tuple(_IMPLS.value)
  options = dataclasses.replace(options, profile=_PROFILE.value,
                                e2e_results=_E2E.value, **changes)
  config = _CONFIG.value or common.base_config("ml1m_like", n_max=200, k=20)
  result = bench.run_benchmark(options, config, log=logging.info)
  bench.write_reports(result, _WORKDIR.value)
  logging.info("wrote %s/bench.json, bench.md, bench.png", _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
