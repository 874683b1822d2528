"""Throughput of our EmerG meta-training step on the MovieLens-100K shapes.

The reference EmerG meta-trains with a per-item PyTorch loop at 38-50
item-tasks/s on a 2-core CPU (DESIGN §9).  This times ours: the jitted
``lax.scan`` epoch of ``baselines.emerg.make_epoch_fn`` (one Adam step per
batch of tasks, each task one second-order inner step on the ID embedding and
the generated graphs, vmapped), on the real ML-100K split (N=100, K=10:
support 10 rows, query 20 rows, EmerG's GNN backbone, d=16).  The first call
(compile + run) is reported apart from the timed calls; the backbone is freshly
initialised (its values do not change the cost).

  EMERFLOW_DATA_DIR=<data> python benchmarks/emerg_speed.py OUT_DIR [BATCH ...]

writes OUT_DIR/emerg_speed.json and emerg_speed.md.
"""

import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from emerflow_jax import data, pretrain, protocol, tasks
from emerflow_jax.baselines import emerg, metaemb
from emerflow_jax.models import backbones

TASKS_PER_CALL = 256  # tasks in one timed call (one epoch-fn dispatch)
INNER_STEPS = 1       # EmerG's one inner step per task
REPS = 5


def setup():
  """The ML-100K split, EmerG's GNN, its generator and all (chunk j -> j+1) tasks."""
  ds = data.load_dataset({"name": "movielens100k", "download": False})
  split = protocol.split_emerging_items(ds, n_max=100, k=10)
  model = backbones.make_backbone("emerg_gnn", ds, dim=16)
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(0))
  all_tasks = tasks.build_meta_tasks(ds, split, 10, 20, np.random.default_rng(0))
  gen = emerg.GraphGenerator(n_fields=model.n_fields, n_layers=model.gnn_layers)
  side = metaemb.side_embeddings(metaemb.backbone_embed(params), tables,
                                 jnp.asarray(split.old_items[:1]))[0]
  return model, params, tables, gen, gen.init(jax.random.key(1), side), all_tasks


def time_batch(batch_tasks: int, parts) -> dict:
  """Compile and time ``TASKS_PER_CALL`` tasks in batches of ``batch_tasks``."""
  model, params, tables, gen, gen_params, all_tasks = parts
  n_batches = max(1, TASKS_PER_CALL // batch_tasks)
  rng = np.random.default_rng(0)
  batch_list = tasks.batches(all_tasks, batch_tasks, rng)
  batch_list = [batch_list[i % len(batch_list)] for i in range(n_batches)]
  stacked = {k: jnp.asarray(np.stack([b[k] for b in batch_list])) for k in batch_list[0]}
  tx = optax.adam(1e-3)
  fn = emerg.make_epoch_fn(gen, model, tx, 1e-3, 0.1, False)
  # The epoch function donates its state: start each case from a copy.
  state = pretrain.init_state(jax.tree.map(jnp.copy, gen_params), tx, jax.random.key(2))
  key = jax.random.key(3)
  t0 = time.perf_counter()
  state, losses = fn(state, params, tables, stacked, key)
  jax.block_until_ready(losses)
  first = time.perf_counter() - t0
  times = []
  for _ in range(REPS):
    t0 = time.perf_counter()
    state, losses = fn(state, params, tables, stacked, key)
    jax.block_until_ready(losses)
    times.append(time.perf_counter() - t0)
  run_s = statistics.median(times)
  n = n_batches * batch_tasks
  return {"impl": "jax_vmap_scan_jit", "batch_tasks": batch_tasks, "tasks": n,
          "inner_steps": INNER_STEPS, "run_s": run_s, "tasks_per_s": n / run_s,
          "task_inner_steps_per_s": n * INNER_STEPS / run_s,
          "compile_s": max(first - run_s, 0.0), "first_call_s": first}


def write(out: pathlib.Path, result: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "emerg_speed.json").write_text(json.dumps(result, indent=1) + "\n")
  lines = ["# EmerG meta-training step, MovieLens-100K shapes", "",
           f"Device: {result['device']}; {result['cores']} CPU cores; load average "
           f"{result['loadavg']} (1/5/15 min) at the start; JAX {result['jax']}.", "",
           "Each timed call is one jitted `lax.scan` over batches of tasks "
           f"({TASKS_PER_CALL} tasks in all); one task = support 10 rows, query 20 "
           "rows, one second-order inner step on the ID embedding and the "
           f"generated graphs; median of {REPS} calls.  Compile = first call minus "
           "a timed one.  Reference EmerG: 38-50 tasks/s (per-item PyTorch loop, "
           "2-core CPU, DESIGN §9).", "",
           "| tasks per meta step | tasks/s | tasks x inner steps/s | x reference (50/s) "
           "| compile s |", "|---|---|---|---|---|"]
  for c in result["cases"]:
    lines.append(f"| {c['batch_tasks']} | {c['tasks_per_s']:.0f} | "
                 f"{c['task_inner_steps_per_s']:.0f} | {c['tasks_per_s'] / 50:.1f} | "
                 f"{c['compile_s']:.1f} |")
  (out / "emerg_speed.md").write_text("\n".join(lines) + "\n")


def main(argv):
  out = pathlib.Path(argv[1] if len(argv) > 1 else "benchmarks/cpu")
  sizes = [int(a) for a in argv[2:]] or [1, 32, 256]
  load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
  parts = setup()
  cases = [time_batch(b, parts) for b in sizes]
  result = {"device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
            "cores": os.cpu_count(), "loadavg": load, "jax": jax.__version__,
            "cases": cases}
  write(out, result)
  print((out / "emerg_speed.md").read_text())


if __name__ == "__main__":
  main(sys.argv)
