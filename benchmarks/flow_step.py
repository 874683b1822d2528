"""EmerFlow's default meta-step (flow tasks) vmapped + jitted vs a per-task loop.

A flow task replays three warm phases (3 x T inner steps, second order) and
the pooled pairwise loss couples every task of a batch, so this is the step a
run actually takes (``benchmarks/`` bench.md times the single-phase step that
the PyTorch references share).  Both sides run on whatever device JAX sees,
in one process, side by side:

* ``vmap_jit``: ``meta.make_train_step`` (one compiled program per batch);
* ``task_loop``: the same per-task outer gradient, jitted once, called task by
  task from Python and averaged (BCE outer loss: the pooled loss has no
  per-task form, so the loop is timed with the per-task loss it reduces to).

Before timing, the vmapped gradient is checked against the loop's (BCE).

  python benchmarks/flow_step.py OUT_DIR [TASKS ...]

writes OUT_DIR/flow_step.json and flow_step.md.
"""

import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from emerflow_jax import align, meta, protocol, rule, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones


def world(n_tasks: int, seed: int = 0):
  """A synthetic world with ML-1M-like old items (> N=100 rows), K=10."""
  ds = synthetic.make_synthetic(n_users=2000, n_items=1200, mean_count=180.0, seed=seed)
  split = protocol.split_emerging_items(ds, n_max=100, k=10)
  model = backbones.make_backbone("deepfm", ds, dim=16, mlp=(16, 16))
  tables = backbones.make_tables(ds)
  params = backbones.init_params(model, tables, jax.random.key(seed))
  params = jax.tree.map(lambda p: p * 10.0, params)  # non-trivial gradients
  r = align.standardize(ds.item_vectors, split.old_items)
  frozen = {"params": params, "tables": tables, "r": jnp.asarray(r)}
  mapper = align.Mapper(out_dim=16, hidden=(64,))
  phi = mapper.init(jax.random.key(1), frozen["r"][:2])
  meta_params = {"phi": phi, "log_alpha": rule.init_alpha(1e-2, "scalar", 16, 3)}
  all_tasks = tasks.build_flow_tasks(ds, split, 10, 40, np.random.default_rng(seed))
  pick = np.resize(np.arange(len(all_tasks["item"])), n_tasks)
  batch = tasks.pad_tasks({k: v[pick] for k, v in all_tasks.items()}, n_tasks)
  return model, mapper, frozen, meta_params, {k: jnp.asarray(v) for k, v in batch.items()}


def median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(n_tasks: int, inner_steps: int = 10) -> dict:
  model, mapper, frozen, meta_params, batch = world(n_tasks)
  cfg = meta.MetaConfig(inner_steps=inner_steps, phase_alpha=True, rule="adam",
                        train_init=True, outer_loss="auc")
  bce = dataclasses.replace(cfg, outer_loss="bce")
  tx = optax.adam(1e-3)

  # Agreement (BCE): vmapped batch gradient == mean of per-task gradients.
  g_vmap = jax.jit(jax.grad(lambda p: meta.batch_loss(p, model, mapper, bce, frozen,
                                                      batch)[0]))(meta_params)
  task_grad = jax.jit(jax.grad(lambda p, t: meta.task_loss(p, model, mapper, bce, frozen,
                                                           t)[0]))
  one = lambda i: {k: v[i] for k, v in batch.items() if k != "task_mask"}
  n_check = min(n_tasks, 64)
  loop = [task_grad(meta_params, one(i)) for i in range(n_check)]
  g_loop = jax.tree.map(lambda *g: sum(g) / n_check, *loop)
  if n_check == n_tasks:
    diff = max(float(jnp.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(g_vmap), jax.tree.leaves(g_loop)))
  else:
    diff = None

  step = meta.make_train_step(model, mapper, cfg, tx)

  def fresh():
    p = jax.tree.map(jnp.copy, meta_params)
    return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0))}

  t0 = time.perf_counter()
  state, _ = step(fresh(), frozen, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  holder = {"s": state}

  def vmapped():
    holder["s"], m = step(holder["s"], frozen, batch)
    jax.block_until_ready(m["loss"])

  t_vmap = median_time(vmapped, 5)

  def looped():
    gs = [task_grad(meta_params, one(i)) for i in range(n_tasks)]
    jax.block_until_ready(jax.tree.map(lambda *g: sum(g) / n_tasks, *gs))

  looped()  # warm (compiled above; first calls allocate)
  t_loop = median_time(looped, 2)
  return {"tasks": n_tasks, "inner_steps": inner_steps, "phases": 3,
          "compile_s": compile_s, "vmap_jit_tasks_per_s": n_tasks / t_vmap,
          "task_loop_tasks_per_s": n_tasks / t_loop, "ratio": t_loop / t_vmap,
          "grad_max_abs_diff": diff, "n_checked": n_check}


def main():
  out = pathlib.Path(sys.argv[1])
  sizes = [int(x) for x in sys.argv[2:]] or [64, 256]
  out.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  rows = [run(n) for n in sizes]
  result = {"device": f"{dev.platform}: {dev.device_kind}", "jax": jax.__version__,
            "cases": rows}
  (out / "flow_step.json").write_text(json.dumps(result, indent=1))
  lines = [f"# Flow meta-step: vmap + jit vs per-task loop ({result['device']})", "",
           "Generated by `python benchmarks/flow_step.py`. One flow task = 3 phases x "
           "T=10 second-order Adam-direction inner steps on K=10 rows, query 40 rows; "
           "DeepFM d=16. Median of repeated steps; compile time excluded.", "",
           "| tasks | vmap_jit tasks/s | task_loop tasks/s | ratio | compile s | "
           "grad diff (BCE) |", "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    d = "-" if r["grad_max_abs_diff"] is None else f"{r['grad_max_abs_diff']:.1e}"
    lines.append(f"| {r['tasks']} | {r['vmap_jit_tasks_per_s']:,.0f} | "
                 f"{r['task_loop_tasks_per_s']:,.0f} | {r['ratio']:.1f}x | "
                 f"{r['compile_s']:.1f} | {d} |")
  (out / "flow_step.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
