"""The benchmark run: options, agreement first, then every case side by side.

``run_benchmark(options, config)`` builds the world, checks that every
implementation computes the same step (``jax_impl.check_agreement``), then
times each of them at every batch size, the warm-up rule, the profile of the
vmapped step and the scaling over forced CPU devices.  ``options_from_config``
reads the ``bench`` section of ``experiments/configs/bench.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from emerflow_jax import meta
from emerflow_jax.bench import jax_impl, scaling, timing
from emerflow_jax.bench import world as world_lib

IMPLS = ("jax_vmap_jit", "jax_task_loop", "torch_task_loop", "torch_func_vmap")
LOOP_IMPLS = timing.LOOP_IMPLS
# DESIGN §9: EmerG's own PyTorch meta-training on ML-100K, same 2-core machine,
# item-tasks of ONE inner step each.
EMERG_TASKS_PER_S = (38.0, 50.0)


@dataclasses.dataclass(frozen=True)
class Options:
  """What to time (the ``bench`` config section; flags override it).

  Attributes:
    tasks: tasks per meta step.
    inner_steps: values of T (empty: the run's ``meta.inner_steps``).
    repeats: timed runs per case (the median is reported).
    impls: implementations to time.
    loop_cap: Python-loop implementations time at most this many tasks per
      step and report per-task throughput (they scale linearly in tasks).
    devices: forced CPU device counts for the scaling runs (subprocesses).
    scaling_tasks, scaling_inner_steps: the scaling case (0 steps: the run's).
    adapt_items: item counts for the adaptation-only (warm-up) timing.
    check_tasks: tasks in the agreement check; tol: its relative tolerance.
    profile: trace the jax_vmap_jit step and break its time down by XLA op.
    torch_threads: torch intra-op threads; 0 picks the faster of 1 and the
      default on a short probe (tiny ops often run slower with more threads).
    torch_max_tasks: the PyTorch cases are timed at batch sizes up to this
      (0: all); eager second-order PyTorch is slow enough on a CPU that
      bigger batches would take most of the run.
    e2e_results: results.json files of runs whose wall times to record.
    shapes: the world.
    seed: data and weights.
  """
  tasks: tuple[int, ...] = (16, 64, 256, 1024)
  inner_steps: tuple[int, ...] = ()
  repeats: int = 5
  impls: tuple[str, ...] = IMPLS
  loop_cap: int = 16
  devices: tuple[int, ...] = (1, 2)
  scaling_tasks: int = 256
  scaling_inner_steps: int = 0
  adapt_items: tuple[int, ...] = (472, 4096)
  check_tasks: int = 4
  tol: float = 1e-4
  profile: bool = True
  torch_threads: int = 0
  torch_max_tasks: int = 0
  e2e_results: tuple[str, ...] = ()
  shapes: world_lib.Shapes = world_lib.Shapes()
  seed: int = 0


def options_from_config(c: ml_collections.ConfigDict) -> Options:
  """``Options`` from a config's ``bench`` section (tuples for sequences)."""
  fields = {f.name for f in dataclasses.fields(Options)}
  kw = {}
  for k, v in c.bench.items():
    if k not in fields:
      raise ValueError(f"unknown bench option {k!r}")
    if k == "shapes":
      v = world_lib.Shapes(**{s: tuple(x) if isinstance(x, (list, tuple)) else x
                              for s, x in v.items()})
    elif isinstance(v, (list, tuple)):
      v = tuple(v)
    kw[k] = v
  return Options(**kw)


def read_e2e(path: str) -> dict[str, Any]:
  """The wall time of a finished run from its results.json."""
  with open(path) as f:
    res = json.load(f)
  return {"dataset": res.get("dataset"), "method": res.get("method"),
          "backbone": res.get("backbone"), "seeds": len(res.get("seeds", [])) or None,
          "seconds": res.get("seconds", {}), "path": os.path.basename(
              os.path.dirname(os.path.abspath(path)))}


def describe_variant(w: world_lib.World, mcfg: meta.MetaConfig) -> str:
  """Which meta-training step is timed, in words (it follows the config).

  Args:
    w: the benchmark world.
    mcfg: the timed meta config.

  Returns:
    A sentence.
  """
  trained = [n for n, on in (("the mapper phi", mcfg.train_init),
                             ("alpha", mcfg.learn_alpha)) if on]
  loss = ("pooled pairwise (AUC) loss over all query rows of the batch, "
          + (f"{mcfg.auc_pairs} sampled partners per row" if mcfg.auc_pairs > 0
             else "every pair") if mcfg.outer_loss == "auc" else "per-task BCE")
  return (f"flow tasks: {w.tasks['support/users'].shape[1]} phases x T inner steps of "
          f"the {mcfg.rule} rule on K = {w.k} rows, "
          f"{'one step size per phase' if mcfg.phase_alpha else 'one step size'}, "
          f"queried on Q = {w.query_rows} rows after every phase; outer loss: {loss}; "
          f"the outer gradient trains {' and '.join(trained) or 'nothing'}; "
          f"{'first' if mcfg.first_order else 'second'}-order; beta = {mcfg.beta}")


def run_benchmark(options: Options, config: ml_collections.ConfigDict,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Checks agreement, then times every case; returns the bench.json dict.

  Args:
    options: what to time.
    config: a run config (data.k, model, align and meta sections are used).
    log: progress messages.

  Returns:
    {"device", "info", "options", "meta", "agreement", "cases", "scaling",
    "adapt", "profile", "e2e", "torch", "load", ...}.

  Raises:
    AgreementError: before any timing, if implementations disagree.
  """
  # float32 everywhere: no TF32 matmuls on GPUs (torch's default is off too).
  with jax.default_matmul_precision("highest"):
    return _run_benchmark(options, config, log)


def _run_benchmark(options, config, log):
  unknown = set(options.impls) - set(IMPLS)
  if unknown:
    raise ValueError(f"unknown impls {sorted(unknown)}; known: {IMPLS}")
  info = timing.device_info()
  log(f"device: {info['device']}; torch: {info['torch'] or 'not installed'}")
  n_world = max(list(options.tasks) + list(options.adapt_items) + [options.check_tasks])
  w = world_lib.make_world(options.shapes, config, n_world, options.seed)
  base = world_lib.bench_meta_config(config)
  steps = options.inner_steps or (base.inner_steps,)
  impls_run = [n for n in options.impls if info["torch"] or not n.startswith("torch")]
  result: dict[str, Any] = {
      "device": info["device"], "info": info,
      "options": dataclasses.asdict(options),
      "meta": dataclasses.asdict(base), "cases": [], "agreement": {},
      "torch": info["torch"] or "skipped: torch is not installed",
      "emerg_tasks_per_s": list(EMERG_TASKS_PER_S), "load": [os.getloadavg()[0]],
      "variant": describe_variant(w, base), "n_fields": len(w.model.vocab_sizes),
      "phases": int(w.tasks["support/users"].shape[1]), "k": w.k,
      "query_rows": w.query_rows}
  if any(n.startswith("torch") for n in impls_run):
    if options.torch_threads:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(options.torch_threads)
      result["torch_threads"] = {"threads": options.torch_threads}
    else:
      from emerflow_jax.bench import torch_impl  # pylint: disable=g-import-not-at-top
      result["torch_threads"] = torch_impl.choose_torch_threads(
          w, dataclasses.replace(base, inner_steps=steps[0]),
          min(2, options.loop_cap, max(options.tasks)))
    log(f"torch threads: {result['torch_threads']}")
  for t in steps:
    mcfg = dataclasses.replace(base, inner_steps=t)
    impls = jax_impl.make_impls(w, mcfg, impls_run)
    worst = jax_impl.check_agreement(impls, world_lib.task_batch(w, options.check_tasks),
                                     options.tol)
    result["agreement"][str(t)] = worst
    log(f"T={t}: agreement OK, worst relative error " +
        ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for n in options.tasks:
      for impl in impls.values():
        if (impl.name.startswith("torch") and options.torch_max_tasks
            and n > options.torch_max_tasks):
          continue
        case = dict(timing.time_impl(impl, w, n, options.repeats, options.loop_cap),
                    inner_steps=t)
        result["cases"].append(case)
        log(f"T={t} tasks={n:5d} {impl.name:16s} {case['tasks_per_s']:10.1f} tasks/s"
            f" (measured {case['measured_tasks']}, compile/first "
            f"{case['compile_s'] or case['first_call_s']:.1f} s, load {case['load1']:.1f})")
    del impls
  result["adapt"] = [timing.time_adapt(w, dataclasses.replace(base, inner_steps=steps[-1]),
                                       n, options.repeats) for n in options.adapt_items]
  for a in result["adapt"]:
    log(f"adapt: {a['items']} items T={a['inner_steps']}: {a['adapt_items_per_s']:.0f} "
        f"items/s (refine_items {a['refine_items_per_s']:.0f})")
  t_scale = options.scaling_inner_steps or steps[-1]
  if options.profile:
    n_prof = 64 if 64 in options.tasks else max(options.tasks)
    result["profile"] = timing.profile_step(w, dataclasses.replace(base, inner_steps=t_scale),
                                            n_prof, options.repeats)
    log(f"profile: {result['profile']['step_s'] * 1e3:.1f} ms per step of {n_prof} tasks")
  scale_opts = dataclasses.replace(options, scaling_inner_steps=t_scale)
  result["scaling"] = (scaling.run_scaling(scale_opts, config, log) if options.devices
                       else [])
  result["e2e"] = [read_e2e(p) for p in options.e2e_results]
  result["load"].append(os.getloadavg()[0])
  return result
