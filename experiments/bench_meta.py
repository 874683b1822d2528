r"""Times EmerFlow's default meta-step against per-task loops and PyTorch.

  python -m experiments.bench_meta --config=experiments/configs/bench.py \
      --workdir=/tmp/bench [--config.bench.tasks=16,64,256,1024] \
      [--tasks=16,64] [--inner_steps=10] [--repeats=5] [--impls=...] \
      [--devices=1,2] [--e2e_results=/tmp/ml100k/results.json] [--tiny]

Writes <workdir>/bench.json (DESIGN §8), bench.md and bench.png.  Everything
is in the config (default ``experiments/configs/bench.py``: the run sections
set the timed step, ``bench`` what to time); the flags below only override
its ``bench`` fields.  ``--tiny`` is ``bench.py:tiny``, a seconds-long run.
Exits with an error, before timing anything, if the implementations disagree.
"""

import dataclasses
import os

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax import bench, logs

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "bench.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Benchmark config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_TASKS = flags.DEFINE_list("tasks", None, "Override bench.tasks.")
_INNER = flags.DEFINE_list("inner_steps", None, "Override bench.inner_steps.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Override bench.repeats.")
_IMPLS = flags.DEFINE_list("impls", None, f"Override bench.impls ({','.join(bench.IMPLS)}).")
_LOOP_CAP = flags.DEFINE_integer("loop_cap", None, "Override bench.loop_cap.")
_DEVICES = flags.DEFINE_list("devices", None, "Override bench.devices ('' to skip).")
_ADAPT = flags.DEFINE_list("adapt_items", None, "Override bench.adapt_items.")
_PROFILE = flags.DEFINE_bool("profile", None, "Override bench.profile.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "Override bench.torch_threads.")
_E2E = flags.DEFINE_list("e2e_results", None, "Override bench.e2e_results.")
_TINY = flags.DEFINE_bool("tiny", False, "Use bench.py:tiny (a seconds-long run).")
flags.mark_flags_as_required(["workdir"])


def _ints(values):
  return tuple(int(v) for v in values if v != "")


def main(argv):
  del argv
  logs.quiet_third_party()
  if _TINY.value:
    from experiments.configs import bench as bench_config  # pylint: disable=g-import-not-at-top
    config = bench_config.get_config("tiny")
  else:
    config = _CONFIG.value
  options = bench.options_from_config(config)
  changes = {k: _ints(f.value) for k, f in (("tasks", _TASKS), ("inner_steps", _INNER),
                                            ("devices", _DEVICES),
                                            ("adapt_items", _ADAPT)) if f.value is not None}
  for name, flag in (("repeats", _REPEATS), ("loop_cap", _LOOP_CAP),
                     ("torch_threads", _TORCH_THREADS), ("profile", _PROFILE)):
    if flag.value is not None:
      changes[name] = flag.value
  if _IMPLS.value is not None:
    changes["impls"] = tuple(_IMPLS.value)
  if _E2E.value is not None:
    changes["e2e_results"] = tuple(_E2E.value)
  options = dataclasses.replace(options, **changes)
  result = bench.run_benchmark(options, config, log=logging.info)
  bench.write_reports(result, _WORKDIR.value)
  logging.info("wrote %s/bench.json, bench.md, bench.png", _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
