"""The meta-step benchmark (``experiments.bench_meta``): the run's step, timed.

Usage::

  python -m experiments.bench_meta --config=experiments/configs/bench.py \
      --workdir=/tmp/bench [--config.bench.tasks=16,64] [--tasks=...]

The run sections (data.k, model, align, meta) are ML-100K's defaults, so the
timed step is the one ``make run`` takes; ``bench`` says what to time.
``:tiny`` shrinks everything to a seconds-long run (tests, CI).
"""

import ml_collections

from experiments.configs import common


def get_config(arg=None):
  c = common.base_config("movielens100k", n_max=100, k=10)
  b = c.bench = ml_collections.ConfigDict()
  b.tasks = (16, 64, 256, 1024)   # tasks per meta step
  b.inner_steps = ()              # values of T (empty: meta.inner_steps, the run's)
  b.repeats = 5                   # timed runs per case (median reported)
  b.impls = ("jax_vmap_jit", "jax_task_loop", "torch_task_loop", "torch_func_vmap")
  b.loop_cap = 4                  # loop implementations time at most this many tasks (per-task rate)
  b.devices = ()                  # forced CPU device counts of the scaling runs (() skips; docs/scaling.md)
  b.scaling_tasks = 256           # tasks per step in the scaling runs
  b.scaling_inner_steps = 0       # T of the scaling runs and the profile (0: the run's)
  b.adapt_items = (472,)          # items of the warm-up-rule timing (472: ML-100K's emerging items)
  b.check_tasks = 4               # tasks of the agreement check
  b.tol = 1e-3                    # its relative tolerance (float32 over 3 x 10 Adam-normalised second-order steps: ~1e-4 across frameworks)
  b.profile = True                # profile the vmapped step (cost analysis, op trace)
  b.torch_threads = 0             # torch threads (0: the faster of 1 and torch's default)
  b.torch_max_tasks = 64          # PyTorch cases only up to this batch size (0: all)
  b.e2e_results = ()              # results.json files whose wall times the report quotes
  b.seed = 0                      # data and weights
  b.shapes = ml_collections.ConfigDict()
  b.shapes.n_users = 6040         # ML-1M's users
  b.shapes.n_items = 3706         # ML-1M's movies
  b.shapes.text_dim = 384         # MiniLM text vectors
  b.shapes.rows_per_item = (110, 300)  # every item old (N = 109), flow windows full
  b.shapes.title_vocab = 4500     # title words
  b.shapes.title_len = 8          # padded title length
  b.shapes.genre_vocab = 18       # genres
  b.shapes.genre_len = 6          # padded genre list
  if arg == "tiny":
    b.tasks = (4, 8)
    b.repeats = 2
    b.loop_cap = 4
    b.devices = (1, 2)
    b.scaling_tasks = 8
    b.adapt_items = (8,)
    b.check_tasks = 4
    b.tol = 1e-4
    b.torch_max_tasks = 0
    c.meta.inner_steps = 2
    c.meta.query_rows = 6
    c.data.k = 3
    b.shapes.n_users = 120
    b.shapes.n_items = 40
    b.shapes.text_dim = 24
    b.shapes.rows_per_item = (30, 40)
    b.shapes.title_vocab = 50
  return c
