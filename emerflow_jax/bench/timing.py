"""Timing, memory and profiling of the benchmark's cases.

``time_impl`` times one implementation on one batch size (compile separate,
the median of several synchronised runs); ``time_adapt`` times a warm-up
phase; ``profile_step`` breaks the vmapped step down (loss, gradient, XLA
cost analysis, op time by kind from a profiler trace); ``device_info``
states what the numbers were measured on.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from emerflow_jax import emerflow_meta, meta, rule
from emerflow_jax.bench import jax_impl
from emerflow_jax.bench import world as world_lib

LOOP_IMPLS = ("jax_task_loop", "torch_task_loop")


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def device_info() -> dict[str, Any]:
  """What the numbers were measured on, in words and fields."""
  dev = jax.devices()[0]
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
  cpu = cpu_model()
  if dev.platform == "cpu":
    desc = f"CPU: {cpu}, {cores} cores"
  else:
    desc = (f"{dev.platform.upper()}: {dev.device_kind} x{jax.device_count()} "
            f"(host {cpu}, {cores} cores)")
  return {"device": desc, "platform": dev.platform, "device_kind": dev.device_kind,
          "cpu": cpu, "cores": cores, "jax_devices": jax.device_count(),
          "jax": jax.__version__, "torch": jax_impl.torch_version(),
          "python": platform.python_version()}


def memory() -> dict[str, float]:
  """Peak memory so far: process RSS (Linux KiB -> MiB) and device stats."""
  out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if "peak_bytes_in_use" in stats:
    out["jax_device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    out["torch_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def time_runs(run: Callable[[], None], repeats: int) -> list[float]:
  """One warm-up call, then ``repeats`` timed calls (each synchronises).

  Args:
    run: the call timed (it blocks until done).
    repeats: timed calls.

  Returns:
    [repeats] seconds per call.
  """
  run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def time_impl(impl, world: world_lib.World, n_tasks: int, repeats: int,
              loop_cap: int) -> dict[str, Any]:
  """One case: build (compile), warm up, median of ``repeats`` steps.

  Python-loop implementations time at most ``loop_cap`` tasks per step and
  report that per-task throughput (their cost is linear in the tasks).

  Args:
    impl: the implementation.
    world: the benchmark world.
    n_tasks: tasks per step.
    repeats: timed steps.
    loop_cap: most tasks a Python loop times.

  Returns:
    The case's timings (compile s, tasks/s, ...).
  """
  measured = min(n_tasks, loop_cap) if impl.name in LOOP_IMPLS else n_tasks
  load = os.getloadavg()[0]
  compile_s = impl.build(world_lib.task_batch(world, measured))
  times = time_runs(impl.run, repeats)
  med = statistics.median(times)
  eager = impl.name.startswith("torch")
  return {"impl": impl.name, "tasks": n_tasks, "measured_tasks": measured,
          "tasks_per_s": measured / med, "step_s": med * n_tasks / measured,
          "compile_s": None if eager else compile_s,
          "first_call_s": compile_s if eager else None,
          "times_s": times, "load1": load, **memory()}


def time_adapt(world: world_lib.World, mcfg: meta.MetaConfig, n_items: int,
               repeats: int) -> dict[str, Any]:
  """A warm-up phase over ``n_items`` items (K support rows each).

  Times ``rule.adapt_items`` (the jitted rule) and ``emerflow_meta.refine_items``
  (what a run calls: the rule sharded over all devices, with the transfers).

  Args:
    world: the benchmark world.
    mcfg: the meta config.
    n_items: items adapted.
    repeats: timed calls.

  Returns:
    The timings of both calls.
  """
  b = world_lib.task_batch(world, n_items)
  rows = {k: jnp.asarray(b[f"support/{k}"][:, 0]) for k in ("users", "items", "labels",
                                                             "mask")}
  emb = meta.cold_embedding(world.meta_params, world.mapper, world.frozen,
                            jnp.asarray(b["item"]))
  args = (world.meta_params, world.model, mcfg, world.frozen, emb, rows)
  t0 = time.perf_counter()
  compiled = rule.adapt_items.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  plain = time_runs(lambda: jax.block_until_ready(
      compiled(world.meta_params, world.frozen, emb, rows)), repeats)
  np_rows = {k: np.asarray(v) for k, v in rows.items()}
  refine = time_runs(lambda: jax.block_until_ready(emerflow_meta.refine_items(
      world.meta_params, world.model, mcfg, world.frozen, emb, np_rows)), repeats)
  return {"items": n_items, "inner_steps": mcfg.inner_steps, "compile_s": compile_s,
          "adapt_items_per_s": n_items / statistics.median(plain),
          "refine_items_per_s": n_items / statistics.median(refine),
          "times_s": plain, "refine_times_s": refine, "load1": os.getloadavg()[0]}


_HEAVY = ("scatter", "gather", "dot", "convolution", "reduce", "sort", "all-reduce")


def op_kinds(hlo_text: str) -> dict[str, str]:
  """Maps each HLO instruction name to the heaviest op kind it executes.

  A fusion counts as "scatter" if its fused computation scatters, else
  "gather", "dot", ... in the order of ``_HEAVY``; anything else is
  "elementwise" (or the instruction's own opcode outside fusions).
  """
  comps, current = {}, None
  for line in hlo_text.splitlines():
    s = line.strip()
    if s.endswith("{") and "(" in s and "=" not in s.split("(")[0]:
      current = s.split()[0].lstrip("%") if not s.startswith("ENTRY") else "ENTRY"
      comps[current] = []
    elif current is not None and s.startswith(("%", "ROOT")):
      comps[current].append(s)
  kinds = {}

  def opcode(instr):
    rhs = instr.split(" = ", 1)[1] if " = " in instr else instr
    # "f32[8]{0} fusion(%a), kind=..." -> "fusion"
    for tok in rhs.split():
      if "(" in tok:
        return tok.split("(")[0]
    return ""

  def heaviest(comp_name, depth=0):
    ops = {opcode(i) for i in comps.get(comp_name, [])}
    for heavy in _HEAVY:
      if heavy in ops:
        return heavy
    if depth < 3:
      for i in comps.get(comp_name, []):
        if "calls=" in i:
          callee = i.split("calls=")[1].split(",")[0].split()[0].lstrip("%")
          k = heaviest(callee, depth + 1)
          if k != "elementwise":
            return k
    return "elementwise"

  for comp in comps.values():
    for instr in comp:
      name = instr.replace("ROOT ", "").split(" = ")[0].lstrip("%")
      op = opcode(instr)
      if "calls=" in instr:
        callee = instr.split("calls=")[1].split(",")[0].split()[0].lstrip("%")
        kinds[name] = heaviest(callee)
      else:
        kinds[name] = op if op in _HEAVY else "elementwise"
  return kinds


def trace_ops(run: Callable[[], None], steps: int, kinds: dict[str, str]
              ) -> dict[str, Any]:
  """Runs ``steps`` steps under ``jax.profiler`` and sums op time by kind.

  Args:
    run: one step (it blocks until done).
    steps: steps traced.
    kinds: op-name substring -> kind.

  Returns:
    {"op_ms_per_step", "by_kind": {kind: ms per step}, "top_ops": [(name,
    kind, ms per step)]}: device ops on GPU, XLA thunks on CPU.
  """
  from jax import profiler  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    with profiler.trace(d):
      for _ in range(steps):
        run()
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
             if f.endswith(".xplane.pb")]
    data = profiler.ProfileData.from_file(files[0])
  per_op: dict[str, float] = {}
  gpu = any(p.name.startswith("/device:GPU") for p in data.planes)
  for plane in data.planes:
    if gpu and not plane.name.startswith("/device:GPU"):
      continue
    if not gpu and plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python" or (gpu and "Stream" not in line.name
                                   and "stream" not in line.name.lower()):
        continue
      for ev in line.events:
        name = ev.name
        if name.startswith(("end:", "Thunk", "Threadpool")) or " " in name:
          continue
        per_op[name] = per_op.get(name, 0.0) + ev.duration_ns / 1e6 / steps

  def kind(name):
    base = name.split(":")[0].split("/")[-1]
    # GPU kernels are named after their fusion with "_12" for ".12".
    return kinds.get(base) or kinds.get(re.sub(r"_(\d+)$", r".\1", base))

  # Only events named like an instruction of this program count as its ops
  # (other threads of the process, e.g. torch's, may leave events too).
  by_kind: dict[str, float] = {}
  other = 0.0
  for name, ms in per_op.items():
    if kind(name) is None:
      other += ms
    else:
      by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
  top = sorted(((n, ms) for n, ms in per_op.items() if kind(n)), key=lambda kv: -kv[1])
  return {"op_ms_per_step": sum(by_kind.values()), "by_kind": by_kind,
          "unattributed_ms_per_step": other,
          "top_ops": [(n, kind(n), ms) for n, ms in top[:8]]}


def profile_step(world: world_lib.World, mcfg: meta.MetaConfig, n_tasks: int,
                 repeats: int) -> dict[str, Any]:
  """Where the time of one jax_vmap_jit step goes.

  Times the outer loss without adaptation (T = 0), the outer loss, its
  gradient, the full step and the first-order step; reads XLA's cost analysis
  (FLOPs, bytes) of the step; and traces it to sum op time by kind.

  Args:
    world: the benchmark world.
    mcfg: the meta config.
    n_tasks: tasks per step.
    repeats: timed calls of each piece.

  Returns:
    The breakdown dict.
  """
  batch = jax.device_put(world_lib.task_batch(world, n_tasks))
  key = world_lib.step_key()
  w = world
  out: dict[str, Any] = {"tasks": n_tasks, "inner_steps": mcfg.inner_steps}

  def timed(fn, *args):
    compiled = jax.jit(fn, static_argnums=(1, 2, 3)).lower(*args).compile()
    dyn = (args[0],) + args[4:]
    med = statistics.median(time_runs(
        lambda: jax.block_until_ready(compiled(*dyn)), repeats))
    return med

  loss_only = lambda *a: meta.batch_loss(*a)[0]
  vg = jax.value_and_grad(meta.batch_loss, has_aux=True)
  base = (w.meta_params, w.model, w.mapper)
  out["loss_T0_s"] = timed(loss_only, *base, dataclasses.replace(mcfg, inner_steps=0),
                           w.frozen, batch, key)
  out["loss_s"] = timed(loss_only, *base, mcfg, w.frozen, batch, key)
  out["grad_s"] = timed(vg, *base, mcfg, w.frozen, batch, key)
  step = jax_impl.JaxVmapJit(world, mcfg)
  step.build(world_lib.task_batch(world, n_tasks))
  out["step_s"] = statistics.median(time_runs(step.run, repeats))
  first = jax_impl.JaxVmapJit(world, dataclasses.replace(mcfg, first_order=True))
  first.build(world_lib.task_batch(world, n_tasks))
  out["first_order_step_s"] = statistics.median(time_runs(first.run, repeats))
  cost = step.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out["flops"] = float(cost.get("flops", 0.0))
  out["bytes"] = float(cost.get("bytes accessed", 0.0))
  out["gflop_per_s"] = out["flops"] / out["step_s"] / 1e9
  out["gbyte_per_s"] = out["bytes"] / out["step_s"] / 1e9
  try:
    out["trace"] = trace_ops(step.run, 3, op_kinds(step.compiled.as_text()))
  except Exception as e:  # pylint: disable=broad-except
    out["trace_error"] = f"{type(e).__name__}: {e}"
  return out
