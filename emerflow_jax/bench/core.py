"""The speed benchmark: world, JAX implementations, agreement, timing, the run.

``make_world`` builds a synthetic world with MovieLens-1M shapes and packs its
item tasks; ``JaxVmapJit`` (ours) and ``JaxTaskLoop`` are the JAX cases (the
PyTorch ones are in ``torch_impl``); ``check_agreement`` compares them all
before ``run_benchmark`` times every case, the adaptation-only phase, the
profile and the scaling subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emerflow_jax import align, emerflow, meta, protocol, sharding, tasks
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones

IMPLS = ("jax_vmap_jit", "jax_task_loop", "torch_task_loop", "torch_func_vmap")
LOOP_IMPLS = ("jax_task_loop", "torch_task_loop")
# DESIGN §9: EmerG's own PyTorch meta-training on ML-100K, same 2-core machine.
EMERG_TASKS_PER_S = (38.0, 50.0)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The world the tasks come from (MovieLens-1M-like by default).

  Attributes:
    n_users, n_items: ML-1M has 6,040 users and 3,706 movies.
    text_dim: width of the item text vector r_i (MiniLM: 384).
    support_rows, query_rows: padded task widths (K = 20, query 2K).
    rows_per_item: (low, high) rows per item; above N = 200 every item is old.
    title_vocab, title_len, genre_vocab, genre_len: the two sequence fields.
  """
  n_users: int = 6040
  n_items: int = 3706
  text_dim: int = 384
  support_rows: int = 20
  query_rows: int = 40
  rows_per_item: tuple[int, int] = (210, 400)
  title_vocab: int = 4500
  title_len: int = 8
  genre_vocab: int = 18
  genre_len: int = 6


TINY_SHAPES = Shapes(n_users=120, n_items=40, text_dim=24, support_rows=5,
                     query_rows=10, rows_per_item=(210, 240), title_vocab=50)


@dataclasses.dataclass(frozen=True)
class Options:
  """What to time (the flags of experiments/bench_meta.py).

  Attributes:
    tasks: tasks per meta step.
    inner_steps: values of T.
    repeats: timed runs per case (the median is reported).
    impls: implementations to time.
    loop_cap: Python-loop implementations time at most this many tasks per
      step and report per-task throughput (they scale linearly in tasks).
    devices: forced CPU device counts for the scaling runs (subprocesses).
    scaling_tasks, scaling_inner_steps: the scaling case.
    adapt_items: item counts for the adaptation-only (warm-up) timing.
    check_tasks: tasks in the agreement check; tol: its relative tolerance.
    profile: trace the jax_vmap_jit step and break its time down by XLA op.
    torch_threads: torch intra-op threads; 0 picks the faster of 1 and the
      default on a short probe (tiny ops often run slower with more threads).
    e2e_results: an emerflow results.json whose wall time to record.
    shapes: the world.
    seed: data and weights.
  """
  tasks: tuple[int, ...] = (32, 256, 1024, 4096)
  inner_steps: tuple[int, ...] = (1, 3, 5)
  repeats: int = 5
  impls: tuple[str, ...] = IMPLS
  loop_cap: int = 128
  devices: tuple[int, ...] = (1, 2, 4)
  scaling_tasks: int = 1024
  scaling_inner_steps: int = 3
  adapt_items: tuple[int, ...] = (972, 4096)
  check_tasks: int = 8
  tol: float = 1e-4
  profile: bool = True
  torch_threads: int = 0
  e2e_results: str = ""
  shapes: Shapes = Shapes()
  seed: int = 0


TINY = Options(tasks=(4, 16), inner_steps=(1, 2), loop_cap=8, devices=(1, 2),
               scaling_tasks=16, scaling_inner_steps=2, adapt_items=(16,),
               check_tasks=4, shapes=TINY_SHAPES)


class AgreementError(AssertionError):
  """Two implementations disagree on the loss or the meta-gradients."""


# --------------------------------------------------------------------- world


@dataclasses.dataclass
class World:
  """Everything a step needs: backbone, mapper, frozen pieces, packed tasks."""
  model: backbones.Backbone
  mapper: align.Mapper
  frozen: dict[str, Any]
  meta_params: dict[str, Any]
  tasks: dict[str, np.ndarray]  # build_meta_tasks layout, [n_tasks, ...]
  lr: float


def _ml1m_like(shapes: Shapes, seed: int) -> dataset_lib.Dataset:
  """A synthetic world whose fields have ML-1M's vocabularies and widths."""
  rng = np.random.default_rng(seed + 1)
  counts = rng.integers(*shapes.rows_per_item, size=shapes.n_items)
  ds = synthetic.make_synthetic(n_users=shapes.n_users, item_counts=counts,
                                text_dim=shapes.text_dim, seed=seed)
  nu, ni = shapes.n_users, shapes.n_items

  def seq(vocab, width, max_len):
    out = np.zeros((ni, width), np.int32)
    lens = rng.integers(1, max_len + 1, size=ni)
    for i, n in enumerate(lens):
      out[i, :n] = rng.choice(np.arange(1, vocab + 1), n, replace=False)
    return out

  user = {"user_id": np.arange(1, nu + 1, dtype=np.int32)}
  vocab = {"user/user_id": nu + 1, "item/item_id": ni + 1}
  for name, size in (("gender", 2), ("age", 7), ("occupation", 21), ("zip", 10)):
    user[name] = rng.integers(1, size + 1, size=nu).astype(np.int32)
    vocab[f"user/{name}"] = size + 1
  item = {"item_id": np.arange(1, ni + 1, dtype=np.int32),
          "year": rng.integers(1, 82, size=ni).astype(np.int32),
          "title": seq(shapes.title_vocab, shapes.title_len, 6),
          "genres": seq(shapes.genre_vocab, shapes.genre_len, 3)}
  vocab.update({"item/year": 82, "item/title": shapes.title_vocab + 1,
                "item/genres": shapes.genre_vocab + 1})
  return dataclasses.replace(ds, name="ml1m_like", user_fields=user, item_fields=item,
                             vocab_sizes=vocab).validate()


def bench_meta_config(config: ml_collections.ConfigDict) -> meta.MetaConfig:
  """The run's inner/outer loop settings on the single-phase task layout.

  The benchmark times one meta-step on (support, query) task pairs, the layout
  every implementation here (and EmerG) shares; a flow task is P such inner
  loops in sequence, so its per-task cost scales by P on every implementation.
  Per-phase step sizes and the pooled pairwise loss need flow tasks, so the
  benchmark uses one shared step size and the per-task BCE.
  """
  return dataclasses.replace(emerflow.meta_config(config), phase_alpha=False,
                             outer_loss="bce")


def make_world(shapes: Shapes, config: ml_collections.ConfigDict, n_tasks: int,
               seed: int = 0) -> World:
  """Builds the world, a DeepFM with random non-trivial weights, and tasks.

  Args:
    shapes: sizes of the world.
    config: a run config; its model, align and meta sections are used.
    n_tasks: tasks to pack (cycled when the world has fewer).
    seed: data and weights.

  Returns:
    The World; tasks are in ``tasks.build_meta_tasks`` layout.
  """
  ds = _ml1m_like(shapes, seed)
  n_max = shapes.rows_per_item[0] - 1
  split = protocol.split_emerging_items(ds, n_max=n_max, k=n_max // 10)
  rng = np.random.default_rng(seed)
  all_tasks = tasks.build_meta_tasks(ds, split, shapes.support_rows,
                                     shapes.query_rows, rng)
  n_all = len(all_tasks["item"])
  pick = np.resize(rng.permutation(n_all), n_tasks)
  packed = {k: v[pick] for k, v in all_tasks.items()}
  dim = int(config.model.dim)
  model = backbones.make_backbone("deepfm", ds, dim, tuple(config.model.mlp))
  tables = backbones.make_tables(ds)
  key = jax.random.key(seed)
  # One jitted init instead of ~100 eagerly compiled little programs.
  params = jax.jit(backbones.init_params, static_argnums=0)(model, tables, key)
  # The default N(0, 0.01) tables give near-constant scores and tiny gradients;
  # pretrained-like magnitudes make the agreement check meaningful.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 10.0 if "embed" in jax.tree_util.keystr(p) else x, params)
  r = jnp.asarray(align.standardize(ds.item_vectors, split.old_items))
  frozen = {"params": params, "tables": tables, "r": r}
  side = None
  if config.align.use_fields:
    side = align.item_side_embeddings(params, tables, jnp.arange(ds.n_items))
    frozen["side"] = side
  mapper = align.Mapper(out_dim=dim, hidden=tuple(config.align.hidden))
  phi = jax.jit(mapper.init)(jax.random.fold_in(key, 1), r[:2],
                             None if side is None else side[:2])
  meta_params = {"phi": phi, "log_alpha": meta.init_alpha(
      float(config.meta.alpha), config.meta.alpha_mode, dim)}
  if int(config.meta.get("crossfit_folds", 1)) > 1:
    # Cross-fitted meta-training starts from a fixed table of out-of-fold
    # mapper outputs (emerflow.EmerFlow.fit); any mapper output has its shape.
    frozen["e0_table"] = jax.jit(mapper.apply)(phi, r, side)
  return World(model=model, mapper=mapper, frozen=frozen, meta_params=meta_params,
               tasks=packed, lr=float(config.meta.lr))


def task_batch(world: World, n: int) -> dict[str, np.ndarray]:
  """The first ``n`` tasks with ``task_mask`` (all real)."""
  return tasks.pad_tasks({k: v[:n] for k, v in world.tasks.items()}, n)


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """{"phi/params/Dense_0/kernel": array, ...}: names shared with torch."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x, np.float32)
          for p, x in leaves}


def _fresh_state(world: World, tx: optax.GradientTransformation) -> dict[str, Any]:
  params = jax.tree.map(jnp.array, world.meta_params)  # the step donates it
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}


# --------------------------------------------------------- implementations


class JaxVmapJit:
  """Ours: ``meta.make_train_step``, one program for all tasks."""
  name = "jax_vmap_jit"

  def __init__(self, world: World, mcfg: meta.MetaConfig):
    self.w, self.mcfg = world, mcfg
    self.tx = optax.adam(world.lr)
    self._value_and_grad = jax.jit(jax.value_and_grad(meta.batch_loss, has_aux=True),
                                   static_argnums=(1, 2, 3))

  def loss_and_grads(self, batch):
    (loss, _), g = self._value_and_grad(self.w.meta_params, self.w.model, self.w.mapper,
                                        self.mcfg, self.w.frozen, batch)
    return float(loss), flatten(g)

  def build(self, batch) -> float:
    """Compiles the step for this batch shape; returns the compile seconds."""
    step = meta.make_train_step(self.w.model, self.w.mapper, self.mcfg, self.tx)
    self.state = _fresh_state(self.w, self.tx)
    self.batch = jax.device_put(batch)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.w.frozen, self.batch).compile()
    return time.perf_counter() - t0

  def run(self) -> None:
    self.state, m = self.compiled(self.state, self.w.frozen, self.batch)
    jax.block_until_ready((self.state, m))


class JaxTaskLoop:
  """The same per-task function, jitted once, called in a Python loop."""
  name = "jax_task_loop"

  def __init__(self, world: World, mcfg: meta.MetaConfig):
    self.w, self.mcfg = world, mcfg
    self.tx = optax.adam(world.lr)
    w = world

    def accumulate(acc, params, frozen, task):
      (loss, _), g = jax.value_and_grad(meta.task_loss, has_aux=True)(
          params, w.model, w.mapper, mcfg, frozen, task)
      return jax.tree.map(jnp.add, acc, (loss, g))

    def update(state, acc, n):
      grads = jax.tree.map(lambda g: g / n, acc[1])
      upd, opt = self.tx.update(grads, state["opt_state"], state["params"])
      return dict(state, params=optax.apply_updates(state["params"], upd),
                  opt_state=opt, step=state["step"] + 1)

    self._acc = jax.jit(accumulate, donate_argnums=0)
    self._update = jax.jit(update, donate_argnums=0)

  def _tasks(self, batch):
    # Split on the host once, outside the timed loop (a kind choice for loops).
    return [{k: jnp.asarray(v[i]) for k, v in batch.items() if k != "task_mask"}
            for i in range(len(batch["item"]))]

  def _zeros(self, params):
    return (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))

  def _sweep(self, params, task_list):
    acc = self._zeros(params)
    for task in task_list:
      acc = self._acc(acc, params, self.w.frozen, task)
    return acc

  def loss_and_grads(self, batch):
    acc = self._sweep(self.w.meta_params, self._tasks(batch))
    n = len(batch["item"])
    return float(acc[0]) / n, {k: v / n for k, v in flatten(acc[1]).items()}

  def build(self, batch) -> float:
    self.state = _fresh_state(self.w, self.tx)
    self.task_list = self._tasks(batch)
    t0 = time.perf_counter()
    acc = self._sweep(self.state["params"], self.task_list[:1])
    jax.block_until_ready(self._update(_fresh_state(self.w, self.tx), acc, 1.0))
    return time.perf_counter() - t0

  def run(self) -> None:
    acc = self._sweep(self.state["params"], self.task_list)
    self.state = self._update(self.state, acc, float(len(self.task_list)))
    jax.block_until_ready(self.state)


def torch_version() -> str | None:
  """The torch version, or None when torch does not import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch.__version__


def make_impls(world: World, mcfg: meta.MetaConfig, names) -> dict[str, Any]:
  """Instantiates the named implementations (torch ones only if torch imports)."""
  from emerflow_jax.bench import torch_impl  # pylint: disable=g-import-not-at-top
  classes = {c.name: c for c in (JaxVmapJit, JaxTaskLoop, torch_impl.TorchTaskLoop,
                                 torch_impl.TorchFuncVmap)}
  have_torch = torch_version() is not None
  return {n: classes[n](world, mcfg) for n in names
          if have_torch or not n.startswith("torch")}


def check_agreement(impls: dict[str, Any], batch: dict[str, np.ndarray],
                    tol: float) -> dict[str, float]:
  """Compares every implementation's loss and gradients with jax_vmap_jit's.

  The error of a gradient leaf is max|a - b| / max|b| (relative to the
  leaf's scale, so that tiny entries cannot hide a wrong leaf).

  Returns:
    {impl: worst relative error}.

  Raises:
    AgreementError: an implementation is off by more than ``tol``.
  """
  names = list(impls)
  ref_name = "jax_vmap_jit" if "jax_vmap_jit" in impls else names[0]
  ref_loss, ref = impls[ref_name].loss_and_grads(batch)
  worst, problems = {}, []
  for name in names:
    if name == ref_name:
      continue
    loss, grads = impls[name].loss_and_grads(batch)
    errs = {"loss": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)}
    for k, g in ref.items():
      if k not in grads or grads[k].shape != g.shape:
        raise AgreementError(f"{name}: gradient {k} missing or mis-shaped")
      errs[k] = float(np.max(np.abs(grads[k] - g)) / max(float(np.max(np.abs(g))), 1e-12))
    worst[name] = max(errs.values())
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
      problems.append(f"{name} vs {ref_name}: " + ", ".join(
          f"{k} rel. err {v:.2e}" for k, v in sorted(bad.items())))
  if problems:
    raise AgreementError(f"implementations disagree (tol {tol:g}): " + "; ".join(problems))
  return worst


# ------------------------------------------------------------------- timing


def _cpu_model() -> str:
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
  cpu = _cpu_model()
  if dev.platform == "cpu":
    desc = f"CPU: {cpu}, {cores} cores"
  else:
    desc = (f"{dev.platform.upper()}: {dev.device_kind} x{jax.device_count()} "
            f"(host {cpu}, {cores} cores)")
  return {"device": desc, "platform": dev.platform, "device_kind": dev.device_kind,
          "cpu": cpu, "cores": cores, "jax_devices": jax.device_count(),
          "jax": jax.__version__, "torch": torch_version(),
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
  """One warm-up call, then ``repeats`` timed calls (each synchronises)."""
  run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def time_impl(impl, world: World, n_tasks: int, options: Options) -> dict[str, Any]:
  """One case: build (compile), warm up, median of ``options.repeats`` steps."""
  measured = min(n_tasks, options.loop_cap) if impl.name in LOOP_IMPLS else n_tasks
  load = os.getloadavg()[0]
  compile_s = impl.build(task_batch(world, measured))
  times = time_runs(impl.run, options.repeats)
  med = statistics.median(times)
  eager = impl.name.startswith("torch")
  return {"impl": impl.name, "tasks": n_tasks, "measured_tasks": measured,
          "tasks_per_s": measured / med, "step_s": med * n_tasks / measured,
          "compile_s": None if eager else compile_s,
          "first_call_s": compile_s if eager else None,
          "times_s": times, "load1": load, **memory()}


def time_adapt(world: World, mcfg: meta.MetaConfig, n_items: int,
               repeats: int) -> dict[str, Any]:
  """A warm-up phase over ``n_items`` items (K support rows each).

  Times ``meta.adapt_items`` (the jitted rule) and ``emerflow.refine_items``
  (what a run calls: the rule sharded over all devices, with the transfers).
  """
  b = task_batch(world, n_items)
  rows = {k: jnp.asarray(b[f"support/{k}"]) for k in ("users", "items", "labels", "mask")}
  emb = meta.cold_embedding(world.meta_params, world.mapper, world.frozen,
                            jnp.asarray(b["item"]))
  args = (world.meta_params, world.model, mcfg, world.frozen, emb, rows)
  t0 = time.perf_counter()
  compiled = meta.adapt_items.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  plain = time_runs(lambda: jax.block_until_ready(
      compiled(world.meta_params, world.frozen, emb, rows)), repeats)
  np_rows = {k: np.asarray(v) for k, v in rows.items()}
  refine = time_runs(lambda: jax.block_until_ready(emerflow.refine_items(
      world.meta_params, world.model, mcfg, world.frozen, emb, np_rows)), repeats)
  return {"items": n_items, "inner_steps": mcfg.inner_steps, "compile_s": compile_s,
          "adapt_items_per_s": n_items / statistics.median(plain),
          "refine_items_per_s": n_items / statistics.median(refine),
          "times_s": plain, "refine_times_s": refine, "load1": os.getloadavg()[0]}


# ------------------------------------------------------------------ profile

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


def profile_step(world: World, mcfg: meta.MetaConfig, n_tasks: int,
                 repeats: int) -> dict[str, Any]:
  """Where the time of one jax_vmap_jit step goes.

  Times the outer loss without adaptation (T = 0), the outer loss, its
  gradient, the full step and the first-order step; reads XLA's cost analysis
  (FLOPs, bytes) of the step; and traces it to sum op time by kind.
  """
  batch = jax.device_put(task_batch(world, n_tasks))
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
                           w.frozen, batch)
  out["loss_s"] = timed(loss_only, *base, mcfg, w.frozen, batch)
  out["grad_s"] = timed(vg, *base, mcfg, w.frozen, batch)
  step = JaxVmapJit(world, mcfg)
  step.build(task_batch(world, n_tasks))
  out["step_s"] = statistics.median(time_runs(step.run, repeats))
  first = JaxVmapJit(world, dataclasses.replace(mcfg, first_order=True))
  first.build(task_batch(world, n_tasks))
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


# ------------------------------------------------------------------ scaling


def _scaling_spec(options: Options, config: ml_collections.ConfigDict,
                  n_devices: int) -> dict[str, Any]:
  return {"devices": n_devices, "tasks": options.scaling_tasks,
          "inner_steps": options.scaling_inner_steps, "repeats": options.repeats,
          "shapes": dataclasses.asdict(options.shapes), "seed": options.seed,
          "config": config.to_dict()}


def scaling_main() -> None:
  """Child process of ``run_scaling``: times the sharded step on all devices."""
  spec = json.loads(sys.argv[1])
  shapes = Shapes(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in spec["shapes"].items()})
  config = ml_collections.ConfigDict(spec["config"])
  if jax.device_count() != spec["devices"]:
    raise RuntimeError(f"wanted {spec['devices']} devices, got {jax.devices()}")
  world = make_world(shapes, config, spec["tasks"], spec["seed"])
  mcfg = dataclasses.replace(bench_meta_config(config), inner_steps=spec["inner_steps"])
  mesh = sharding.task_mesh()
  tx = optax.adam(world.lr)
  step = meta.make_train_step(world.model, world.mapper, mcfg, tx, mesh)
  state, frozen = sharding.replicate((_fresh_state(world, tx), world.frozen), mesh)
  batch = sharding.shard_tasks(task_batch(world, spec["tasks"]), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], m = compiled(box[0], frozen, batch)
    jax.block_until_ready((box[0], m))

  times = time_runs(run, spec["repeats"])
  print("RESULT " + json.dumps({
      "devices": spec["devices"], "tasks": spec["tasks"],
      "inner_steps": spec["inner_steps"], "compile_s": compile_s,
      "tasks_per_s": spec["tasks"] / statistics.median(times), "times_s": times,
      "load1": os.getloadavg()[0]}))


def run_scaling(options: Options, config: ml_collections.ConfigDict,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """The sharded step on 1, 2, ... forced CPU devices, one subprocess each."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = []
  for n in options.devices:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    proc = subprocess.run(
        [sys.executable, "-c", "from emerflow_jax import bench; bench.scaling_main()",
         json.dumps(_scaling_spec(options, config, n))],
        cwd=root, env=env, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"scaling run on {n} devices failed:\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    log(f"scaling: {n} CPU device(s): {res['tasks_per_s']:.1f} tasks/s")
    out.append(res)
  return out


# ---------------------------------------------------------------- the run


def read_e2e(path: str) -> dict[str, Any]:
  """The wall time of a finished run from its results.json."""
  with open(path) as f:
    res = json.load(f)
  return {"dataset": res.get("dataset"), "method": res.get("method"),
          "backbone": res.get("backbone"), "seeds": len(res.get("seeds", [])) or None,
          "seconds": res.get("seconds", {})}


def describe_variant(world: World, mcfg: meta.MetaConfig) -> str:
  """Which meta-training step is timed, in words (it follows the config)."""
  start = ("a fixed table of cross-fitted mapper outputs" if "e0_table" in world.frozen
           else "the mapper g_phi(r_i, side_i) inside the step")
  trained = [n for n, on in (("the mapper phi", mcfg.train_init and "e0_table" not in
                              world.frozen), ("alpha", mcfg.learn_alpha)) if on]
  return (f"inner rule {getattr(mcfg, 'rule', 'sgd')}; e_0 from {start}; the outer "
          "gradient trains "
          f"{' and '.join(trained) or 'nothing'}; "
          f"{'first' if mcfg.first_order else 'second'}-order; beta = {mcfg.beta}")


def run_benchmark(options: Options, config: ml_collections.ConfigDict,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Checks agreement, then times every case; returns the bench.json dict.

  Args:
    options: what to time.
    config: a run config (model, align and meta sections are used).
    log: progress messages.

  Returns:
    {"device", "info", "options", "agreement", "cases", "scaling", "adapt",
    "profile", "e2e", "torch", "load"}.

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
  info = device_info()
  log(f"device: {info['device']}; torch: {info['torch'] or 'not installed'}")
  n_world = max(list(options.tasks) + list(options.adapt_items) + [options.check_tasks])
  world = make_world(options.shapes, config, n_world, options.seed)
  base = bench_meta_config(config)
  impls_run = [n for n in options.impls if info["torch"] or not n.startswith("torch")]
  result: dict[str, Any] = {
      "device": info["device"], "info": info,
      "options": dataclasses.asdict(options),
      "meta": dataclasses.asdict(base), "cases": [], "agreement": {},
      "torch": info["torch"] or "skipped: torch is not installed",
      "emerg_tasks_per_s": list(EMERG_TASKS_PER_S), "load": [os.getloadavg()[0]],
      "variant": describe_variant(world, base), "n_fields": len(world.model.vocab_sizes)}
  if any(n.startswith("torch") for n in impls_run):
    if options.torch_threads:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(options.torch_threads)
      result["torch_threads"] = {"threads": options.torch_threads}
    else:
      from emerflow_jax.bench import torch_impl  # pylint: disable=g-import-not-at-top
      result["torch_threads"] = torch_impl.choose_torch_threads(
          world, dataclasses.replace(base, inner_steps=options.inner_steps[0]),
          min(16, options.loop_cap, max(options.tasks)))
    log(f"torch threads: {result['torch_threads']}")
  for t in options.inner_steps:
    mcfg = dataclasses.replace(base, inner_steps=t)
    impls = make_impls(world, mcfg, impls_run)
    worst = check_agreement(impls, task_batch(world, options.check_tasks), options.tol)
    result["agreement"][str(t)] = worst
    log(f"T={t}: agreement OK, worst relative error " +
        ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for n in options.tasks:
      for impl in impls.values():
        case = dict(time_impl(impl, world, n, options), inner_steps=t)
        result["cases"].append(case)
        log(f"T={t} tasks={n:5d} {impl.name:16s} {case['tasks_per_s']:10.1f} tasks/s"
            f" (measured {case['measured_tasks']}, load {case['load1']:.1f})")
    del impls
  result["adapt"] = [time_adapt(world, dataclasses.replace(base, inner_steps=t), n,
                                options.repeats)
                     for n in options.adapt_items for t in options.inner_steps[-1:]]
  for a in result["adapt"]:
    log(f"adapt: {a['items']} items T={a['inner_steps']}: {a['adapt_items_per_s']:.0f} "
        f"items/s (refine_items {a['refine_items_per_s']:.0f})")
  if options.profile:
    t_prof = (options.scaling_inner_steps if options.scaling_inner_steps in options.inner_steps
              else options.inner_steps[-1])
    n_prof = max(options.tasks)
    result["profile"] = profile_step(world, dataclasses.replace(base, inner_steps=t_prof),
                                     n_prof, options.repeats)
    log(f"profile: {result['profile']['step_s'] * 1e3:.1f} ms per step of {n_prof} tasks")
  result["scaling"] = run_scaling(options, config, log) if options.devices else []
  if options.e2e_results:
    result["e2e"] = read_e2e(options.e2e_results)
  result["load"].append(os.getloadavg()[0])
  return result
