"""The sharded step on 1, 2, ... forced CPU devices, one subprocess each.

``run_scaling`` starts one child per device count (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``); ``scaling_main`` is the child:
it times ``meta.make_train_step`` with the batch split over all its devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import optax

from emerflow_jax import meta, sharding
from emerflow_jax.bench import jax_impl, timing
from emerflow_jax.bench import world as world_lib


def _scaling_spec(options: Any, config: ml_collections.ConfigDict,
                  n_devices: int) -> dict[str, Any]:
  return {"devices": n_devices, "tasks": options.scaling_tasks,
          "inner_steps": options.scaling_inner_steps, "repeats": options.repeats,
          "shapes": dataclasses.asdict(options.shapes), "seed": options.seed,
          "config": config.to_dict()}


def scaling_main() -> None:
  """Child process of ``run_scaling``: times the sharded step on all devices."""
  spec = json.loads(sys.argv[1])
  shapes = world_lib.Shapes(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in spec["shapes"].items()})
  config = ml_collections.ConfigDict(spec["config"])
  if jax.device_count() != spec["devices"]:
    raise RuntimeError(f"wanted {spec['devices']} devices, got {jax.devices()}")
  world = world_lib.make_world(shapes, config, spec["tasks"], spec["seed"])
  mcfg = dataclasses.replace(world_lib.bench_meta_config(config),
                             inner_steps=spec["inner_steps"])
  mesh = sharding.task_mesh()
  tx = optax.adam(world.lr)
  step = meta.make_train_step(world.model, world.mapper, mcfg, tx, mesh)
  state, frozen = sharding.replicate((jax_impl.fresh_state(world, tx), world.frozen), mesh)
  batch = sharding.shard_tasks(world_lib.task_batch(world, spec["tasks"]), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], m = compiled(box[0], frozen, batch)
    jax.block_until_ready((box[0], m))

  times = timing.time_runs(run, spec["repeats"])
  print("RESULT " + json.dumps({
      "devices": spec["devices"], "tasks": spec["tasks"],
      "inner_steps": spec["inner_steps"], "compile_s": compile_s,
      "tasks_per_s": spec["tasks"] / statistics.median(times), "times_s": times,
      "load1": os.getloadavg()[0]}))


def run_scaling(options: Any, config: ml_collections.ConfigDict,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """The sharded step on 1, 2, ... forced CPU devices, one subprocess each.

  Args:
    options: the benchmark's options (device counts, tasks).
    config: the bench config.
    log: where progress lines go.

  Returns:
    One result dict per device count.
  """
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = []
  for n in options.devices:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    proc = subprocess.run(
        [sys.executable, "-c", "from emerflow_jax.bench import scaling; scaling.scaling_main()",
         json.dumps(_scaling_spec(options, config, n))],
        cwd=root, env=env, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"scaling run on {n} devices failed:\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    log(f"scaling: {n} CPU device(s): {res['tasks_per_s']:.1f} tasks/s")
    out.append(res)
  return out
