"""Speed of EmerFlow's meta-training step next to per-task loops and PyTorch.

``run_benchmark`` times the real step (``meta.make_train_step``, the one
``emerflow.run_meta_training`` uses) on packed item tasks of a synthetic world
with MovieLens-1M shapes, side by side with three other implementations of
the same math, in one process:

* ``jax_vmap_jit``: ours, one jitted program for the whole batch of tasks;
* ``jax_task_loop``: the same ``meta.task_loss`` + grad, jitted per task and
  called in a Python loop over tasks, then the outer Adam update;
* ``torch_task_loop``: PyTorch the way the public code bases (EmerG, MetaEmb
  in CVAR) do it: a loop over tasks, inner steps by
  ``torch.autograd.grad(..., create_graph=True)``, ``backward`` per task;
* ``torch_func_vmap``: ``torch.func.grad`` inside ``torch.func.vmap`` over
  tasks, the best PyTorch offers.

Before anything is timed, every implementation must give the same outer loss
and meta-gradients on one batch (``check_agreement``), or ``AgreementError``
is raised.  torch is optional: without it the torch cases are skipped and the
reports say so.  ``write_reports`` turns the result into bench.json (DESIGN
§8), bench.md and bench.png.
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


class _Torch:
  """The DeepFM + mapper + meta-learning math in PyTorch, from the JAX weights.

  Pure functions of tensors: parameters are plain tensors in dicts, so the
  same code serves the autograd loop and ``torch.func``.  Mirrors
  ``layers.FieldEmbedding`` (sum-pooled sequence fields), DeepFM's linear + FM
  + deep parts, ``align.Mapper`` (tanh-approximated GELU, like ``nn.gelu``),
  ``backbones.bce_loss`` and ``meta.task_loss`` (both inner rules of
  ``meta.adapt``).
  """

  def __init__(self, world: World, mcfg: meta.MetaConfig):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.mcfg = torch, mcfg
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = lambda x, dtype=torch.float32: torch.as_tensor(np.array(x), dtype=dtype,
                                                       device=self.dev)
    model = world.model
    if model.kind != "deepfm":
      raise ValueError(f"the torch reference implements deepfm, not {model.kind!r}")
    p = world.frozen["params"]["params"]
    self.fields = [(k, t(world.frozen["tables"][k], torch.int64), k.startswith("user/"))
                   for k, _ in model.vocab_sizes]
    self.embed = {k: t(p["embed"][k.replace("/", "_")]) for k, _ in model.vocab_sizes}
    self.linear = (t(p["linear"]["kernel"]), t(p["linear"]["bias"]))
    self.mlp = [(t(p["mlp"][f"Dense_{i}"]["kernel"]), t(p["mlp"][f"Dense_{i}"]["bias"]))
                for i in range(len(model.mlp))]
    self.deep_out = (t(p["deep_out"]["kernel"]), t(p["deep_out"]["bias"]))
    self.r = t(world.frozen["r"])
    side = world.frozen.get("side")
    self.side = None if side is None else t(side)
    table = world.frozen.get("e0_table")
    self.e0_table = None if table is None else t(table)
    self.n_dense = len(world.mapper.hidden) + 1
    self.params = {k: t(v).requires_grad_(True)
                   for k, v in flatten(world.meta_params).items()}
    self.opt = torch.optim.Adam(list(self.params.values()), lr=world.lr)

  def _t(self, batch):
    torch = self.torch
    out = {}
    for k, v in batch.items():
      dtype = torch.int64 if np.issubdtype(v.dtype, np.integer) else torch.float32
      out[k] = torch.as_tensor(np.array(v), dtype=dtype, device=self.dev)
    return out

  def logits(self, users, items, e):
    """users, items: [R] ints; e: [d] -> [R] logits."""
    torch = self.torch
    cols = []
    for key, table, is_user in self.fields:
      if key == backbones.ITEM_ID:
        cols.append(e.expand(users.shape[0], e.shape[-1]))
        continue
      ids = table[users if is_user else items]
      vec = self.embed[key][ids]
      if ids.dim() == 2:
        vec = (vec * (ids > 0).unsqueeze(-1).to(vec.dtype)).sum(1)
      cols.append(vec)
    emb = torch.stack(cols, 1)  # [R, F, d]
    flat = emb.reshape(emb.shape[0], -1)
    linear = flat @ self.linear[0] + self.linear[1]
    s = emb.sum(1)
    fm = 0.5 * (s * s - (emb * emb).sum(1)).sum(-1)
    h = flat
    for w, b in self.mlp:
      h = torch.relu(h @ w + b)
    deep = h @ self.deep_out[0] + self.deep_out[1]
    return linear[:, 0] + fm + deep[:, 0]

  def item_loss(self, e, rows):
    logits = self.logits(rows["users"], rows["items"], e)
    per_row = self.torch.nn.functional.binary_cross_entropy_with_logits(
        logits, rows["labels"], reduction="none")
    return (per_row * rows["mask"]).sum() / rows["mask"].sum().clamp(min=1.0)

  def cold(self, p, item):
    torch = self.torch
    if self.e0_table is not None:  # cross-fitted starts, as in meta.cold_embedding
      return self.e0_table[item]
    h = self.r[item]
    if self.side is not None:
      h = torch.cat([h, self.side[item]], -1)
    for i in range(self.n_dense):
      h = h @ p[f"phi/params/Dense_{i}/kernel"] + p[f"phi/params/Dense_{i}/bias"]
      if i < self.n_dense - 1:
        h = torch.nn.functional.gelu(h, approximate="tanh")
    return h

  def outer(self, p, item, sup, qry, inner_grad):
    """beta * L(support; e0) + (1 - beta) * L(query; e_T) of one task."""
    cfg = self.mcfg
    alpha = self.torch.exp(p["log_alpha"])
    if not cfg.learn_alpha:
      alpha = alpha.detach()
    if not cfg.train_init:
      p = {k: (v.detach() if k.startswith("phi/") else v) for k, v in p.items()}
    e0 = self.cold(p, item)
    e = e0
    rule = getattr(cfg, "rule", "sgd")
    b1, b2, eps = 0.9, 0.999, 1e-8  # as in meta.adapt
    m = v = self.torch.zeros_like(e0)
    for t in range(cfg.inner_steps):
      g = inner_grad(e, sup)
      if rule == "sgd":
        e = e - alpha * g
        continue
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      m_hat = m / (1 - b1 ** (t + 1))
      v_hat = v / (1 - b2 ** (t + 1))
      e = e - alpha * m_hat / (self.torch.sqrt(v_hat + eps ** 2) + eps)
    return cfg.beta * self.item_loss(e0, sup) + (1 - cfg.beta) * self.item_loss(e, qry)

  @staticmethod
  def _split(tb):
    sup = {k.split("/")[1]: v for k, v in tb.items() if k.startswith("support/")}
    qry = {k.split("/")[1]: v for k, v in tb.items() if k.startswith("query/")}
    return tb["item"], sup, qry

  def sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def build(self, batch) -> float:
    self.tb = self._t(batch)
    t0 = time.perf_counter()
    self.run()  # eager: the first call is the warm-up, not a compilation
    return time.perf_counter() - t0


class TorchTaskLoop(_Torch):
  """Per-task autograd with ``create_graph=True``, as in EmerG and CVAR's MetaE."""
  name = "torch_task_loop"

  def _inner_grad(self, e, rows):
    torch = self.torch
    if not e.requires_grad:  # e0 of a frozen mapper still needs grad_e
      e = e.detach().requires_grad_(True)
    g, = torch.autograd.grad(self.item_loss(e, rows), e,
                             create_graph=not self.mcfg.first_order)
    return g

  def _backward(self, tb):
    items, sup, qry = self._split(tb)
    n = items.shape[0]
    total = 0.0
    for i in range(n):
      loss = self.outer(self.params, items[i], {k: v[i] for k, v in sup.items()},
                        {k: v[i] for k, v in qry.items()}, self._inner_grad) / n
      loss.backward()
      total += float(loss.detach())
    return total

  def loss_and_grads(self, batch):
    self.opt.zero_grad(set_to_none=False)
    loss = self._backward(self._t(batch))
    # A parameter outside the graph (phi with cross-fitted starts) has no grad.
    grads = {k: np.zeros(tuple(v.shape), np.float32) if v.grad is None
             else v.grad.detach().cpu().numpy().copy() for k, v in self.params.items()}
    self.opt.zero_grad(set_to_none=False)
    return loss, grads

  def run(self) -> None:
    self.opt.zero_grad(set_to_none=False)
    self._backward(self.tb)
    self.opt.step()
    self.sync()


class TorchFuncVmap(_Torch):
  """``torch.func.grad`` (inner and outer) and ``torch.func.vmap`` over tasks."""
  name = "torch_func_vmap"

  def _value_and_grads(self, tb):
    func = self.torch.func
    items, sup, qry = self._split(tb)
    inner = func.grad(self.item_loss)
    if self.mcfg.first_order:
      inner = lambda e, rows, g=inner: g(e, rows).detach()

    def batch_loss(p):
      per_task = func.vmap(lambda i, s, q: self.outer(p, i, s, q, inner))(items, sup, qry)
      return per_task.mean()

    detached = {k: v.detach() for k, v in self.params.items()}
    return func.grad_and_value(batch_loss)(detached)

  def loss_and_grads(self, batch):
    grads, loss = self._value_and_grads(self._t(batch))
    return float(loss), {k: v.detach().cpu().numpy() for k, v in grads.items()}

  def run(self) -> None:
    grads, _ = self._value_and_grads(self.tb)
    for k, v in self.params.items():
      v.grad = grads[k]
    self.opt.step()
    self.sync()


_CLASSES = {c.name: c for c in (JaxVmapJit, JaxTaskLoop, TorchTaskLoop, TorchFuncVmap)}


def torch_version() -> str | None:
  """The torch version, or None when torch does not import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch.__version__


def make_impls(world: World, mcfg: meta.MetaConfig, names) -> dict[str, Any]:
  """Instantiates the named implementations (torch ones only if torch imports)."""
  have_torch = torch_version() is not None
  return {n: _CLASSES[n](world, mcfg) for n in names
          if have_torch or not n.startswith("torch")}


def choose_torch_threads(world: World, mcfg: meta.MetaConfig, n_tasks: int,
                         repeats: int = 2) -> dict[str, Any]:
  """Times torch_task_loop with 1 thread and with torch's default; keeps the faster."""
  import torch  # pylint: disable=g-import-not-at-top
  default = torch.get_num_threads()
  rates = {}
  for n in sorted({1, default}):
    torch.set_num_threads(n)
    impl = TorchTaskLoop(world, mcfg)
    impl.build(task_batch(world, n_tasks))
    rates[n] = n_tasks / statistics.median(time_runs(impl.run, repeats))
  best = max(rates, key=rates.get)
  torch.set_num_threads(best)
  return {"threads": best, "default": default,
          "probe_tasks_per_s": {str(k): v for k, v in rates.items()}}


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
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
      result["torch_threads"] = choose_torch_threads(
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


# ----------------------------------------------------------------- reports


def _fmt(x: float | None, digits: int = 0) -> str:
  if x is None:
    return "—"
  return f"{x:,.{digits}f}"


def _rate(result: dict, impl: str, tasks: int, t: int) -> float | None:
  for c in result["cases"]:
    if c["impl"] == impl and c["tasks"] == tasks and c["inner_steps"] == t:
      return c["tasks_per_s"]
  return None


_KIND_WORDS = {
    "gather": "gathers (embedding-row and feature-table lookups)",
    "scatter": "scatter-adds (gradients of those lookups)",
    "dot": "small matrix products (MLP layers, forward and backward)",
    "reduce": "reductions (FM sums, sequence pooling, losses)",
    "elementwise": "element-wise fusions"}


def _limits_text(p: dict, result: dict) -> list[str]:
  """What bounds the jax_vmap_jit step, in sentences derived from ``p``."""
  lines = [f"Profiled case: {p['tasks']} tasks, T = {p['inner_steps']}.", "",
           "| part | ms per step | share of step |", "|---|---|---|"]
  for key, what in (("loss_T0_s", "outer loss, no inner steps (T = 0)"),
                    ("loss_s", f"outer loss with T = {p['inner_steps']}"),
                    ("grad_s", "outer loss + meta-gradient"),
                    ("step_s", "full step (+ Adam update)"),
                    ("first_order_step_s", "full step, first-order")):
    lines.append(f"| {what} | {p[key] * 1e3:.1f} | {p[key] / p['step_s']:.0%} |")
  lines += ["", f"XLA cost analysis of the step: {p['flops'] / 1e9:.2f} GFLOP and "
            f"{p['bytes'] / 1e9:.2f} GB accessed per step, i.e. {p['gflop_per_s']:.1f} "
            f"GFLOP/s and {p['gbyte_per_s']:.1f} GB/s achieved "
            f"({p['flops'] / max(p['bytes'], 1):.2f} FLOP per byte)."]
  tr = p.get("trace")
  if tr:
    total = max(tr["op_ms_per_step"], 1e-9)
    wall = p["step_s"] * 1e3
    kinds = sorted(tr["by_kind"].items(), key=lambda kv: -kv[1])
    unmatched = tr.get("unattributed_ms_per_step", 0.0)
    lines += ["", f"Op time by kind (profiler trace of 3 steps): {total + unmatched:.1f} ms "
              f"of XLA op time per {wall:.1f} ms step. On a CPU, ops on parallel threads "
              "overlap, so this can exceed the wall time; on a GPU, the gap to the wall "
              "time is idle time between kernels.", "",
              "| kind | ms per step | share of op time |", "|---|---|---|"]
    lines += [f"| {k} | {ms:.1f} | {ms / (total + unmatched):.0%} |" for k, ms in kinds]
    if unmatched > 0.01 * total:
      lines.append(f"| (ops not matched to an HLO instruction) | {unmatched:.1f} | "
                   f"{unmatched / (total + unmatched):.0%} |")
    lines += ["", "Heaviest ops: " + "; ".join(
        f"`{n}` ({k}, {ms:.2f} ms)" for n, k, ms in tr["top_ops"][:5]) + "."]
    lead = "; ".join(f"{_KIND_WORDS.get(k, k)}: {ms / total:.0%}" for k, ms in kinds[:3])
    matched = "" if unmatched <= 0.01 * total else " (of the matched op time)"
    lines += ["", f"**What limits it.** Op time splits as {lead}{matched}. The meta-gradient "
              f"costs {p['grad_s'] / max(p['loss_s'], 1e-12):.1f}x the outer loss, and "
              f"each inner step adds about "
              f"{max(p['loss_s'] - p['loss_T0_s'], 0) / max(p['inner_steps'], 1) * 1e3:.1f}"
              " ms to the forward pass alone. At "
              f"{p['flops'] / max(p['bytes'], 1):.1f} FLOP per byte accessed the work is "
              "memory- and latency-bound, not compute-bound: d = 16 embeddings and a "
              "16-16 MLP give many small ops with little arithmetic each."]
  elif "trace_error" in p:
    lines += ["", f"(no op trace: {p['trace_error']})"]
  lines += _batch_size_text(result)
  return lines


def _batch_size_text(result: dict) -> list[str]:
  """How per-task throughput of jax_vmap_jit falls with the batch size (CPU)."""
  sh = result["options"]["shapes"]
  if result["info"]["platform"] != "cpu":
    return []
  drops, largest = [], 0
  for t in sorted({c["inner_steps"] for c in result["cases"]}):
    pts = sorted((c["tasks"], c["tasks_per_s"]) for c in result["cases"]
                 if c["impl"] == "jax_vmap_jit" and c["inner_steps"] == t)
    if len(pts) < 2:
      continue
    best_n, best = max(pts, key=lambda x: x[1])
    last_n, last = pts[-1]
    if last_n != best_n and last < 0.8 * best:
      drops.append(f"T = {t}: {best:,.0f} tasks/s at {best_n} tasks, {last:,.0f} at {last_n}")
      largest = max(largest, last_n)
  if not drops:
    return []
  # One [rows, fields, d] float32 activation of the whole batch.
  mb = largest * (sh["support_rows"] + sh["query_rows"]) * result["n_fields"] * 16 * 4 / 2**20
  return ["", "Per-task throughput falls at large batches (" + "; ".join(drops) + "). One "
          f"[rows, fields, d] activation of a {largest}-task batch is about {mb:.0f} MB, "
          "far beyond the CPU caches, so big batches are bound by memory bandwidth (our "
          "reading, not measured directly). Running a big batch as a `lax.map` over chunks "
          "of the best size, gradients summed, should keep the best per-task rate on CPUs."]


def markdown(result: dict) -> str:
  """bench.md: tables, ratios and the profile, device next to every number."""
  dev = result["device"]
  opts = result["options"]
  impls = [i for i in IMPLS if any(c["impl"] == i for c in result["cases"])]
  ts = sorted({c["inner_steps"] for c in result["cases"]})
  ns = sorted({c["tasks"] for c in result["cases"]})
  loads = [c["load1"] for c in result["cases"]] + result["load"]
  sh = opts["shapes"]
  out = ["# Meta-training speed: EmerFlow (JAX) vs per-task loops and PyTorch", "",
         f"**Device: {dev}** (all numbers below; jax {result['info']['jax']}, "
         f"torch {result['torch']}). 1-minute load average during the run: "
         f"{min(loads):.1f}–{max(loads):.1f}.", "",
         f"World: ML-1M-like synthetic data ({sh['n_users']} users, {sh['n_items']} "
         f"items, 9 fields incl. title-word and genre sequences, {sh['text_dim']}-d text "
         f"vectors); tasks of {sh['support_rows']} support and {sh['query_rows']} query "
         "rows; DeepFM d = 16, MLP (16, 16); float32. The timed step follows the "
         f"config: {result['variant']}.", "",
         f"tasks/s = tasks per meta step / median step time of {opts['repeats']} runs "
         "after a warm-up run; compile time is separate. Loop implementations (marked *) "
         f"time at most {opts['loop_cap']} tasks per step and report that per-task "
         "throughput for bigger batches (their cost is linear in tasks).", ""]
  if not str(result["torch"])[:1].isdigit():
    out += [f"PyTorch cases: {result['torch']}.", ""]
  elif result.get("torch_threads"):
    tt = result["torch_threads"]
    probe = tt.get("probe_tasks_per_s")
    line = f"PyTorch ran with {tt['threads']} intra-op thread(s)"
    if probe:
      rates = ", ".join(f"{k} thread(s): {v:.1f} tasks/s" for k, v in probe.items())
      line += f", the faster on a probe of torch_task_loop ({rates})"
    out += [line + ".", ""]
  out += ["## Agreement (checked before timing)", "",
          f"Outer loss and meta-gradients on {opts['check_tasks']} tasks, worst error "
          "relative to jax_vmap_jit (per gradient leaf: max abs diff / max abs value); "
          f"tolerance {opts['tol']:g}.", "", "| T | " + " | ".join(
              i for i in impls if i != "jax_vmap_jit") + " |",
          "|---|" + "---|" * (len(impls) - 1)]
  for t, worst in result["agreement"].items():
    out.append(f"| {t} | " + " | ".join(f"{worst.get(i, float('nan')):.1e}"
                                        for i in impls if i != "jax_vmap_jit") + " |")
  out += ["", f"## Throughput (tasks/s) on {dev}", "",
          "| T | tasks | " + " | ".join(i + ("*" if i in LOOP_IMPLS else "")
                                        for i in impls) + " |",
          "|---|---|" + "---|" * len(impls)]
  for t in ts:
    for n in ns:
      out.append(f"| {t} | {n} | " + " | ".join(_fmt(_rate(result, i, n, t))
                                               for i in impls) + " |")
  out += ["", f"Compile time (JAX) / first call (PyTorch, eager), seconds, on {dev}:", "",
          "| T | tasks | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
  for t in ts:
    for n in ns:
      cells = []
      for i in impls:
        c = [c for c in result["cases"] if (c["impl"], c["tasks"], c["inner_steps"]) == (i, n, t)]
        v = c[0]["compile_s"] if c and c[0]["compile_s"] is not None else (
            c[0]["first_call_s"] if c else None)
        cells.append(_fmt(v, 2))
      out.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
  lo, hi = result["emerg_tasks_per_s"]
  out += ["", f"## Ratios on {dev}", "",
          "| T | tasks | jax_vmap_jit / torch_task_loop | jax_vmap_jit / torch_func_vmap "
          f"| jax_vmap_jit / EmerG ({lo:.0f}–{hi:.0f} tasks/s, DESIGN §9) |",
          "|---|---|---|---|---|"]
  for t in ts:
    for n in [n for n in (256, 4096) if n in ns] or ns[-1:]:
      ours = _rate(result, "jax_vmap_jit", n, t)
      tl, tf = _rate(result, "torch_task_loop", n, t), _rate(result, "torch_func_vmap", n, t)
      r = lambda other: f"{ours / other:,.1f}x" if ours and other else "—"
      emerg = f"{ours / hi:,.0f}x–{ours / lo:,.0f}x" if ours else "—"
      out.append(f"| {t} | {n} | {r(tl)} | {r(tf)} | {emerg} |")
  out += ["", "EmerG's 38–50 tasks/s were measured with its own code on ML-100K "
          "(K = 10) on a 2-core CPU; the comparison is indicative, not same-code."]
  if result.get("scaling"):
    s0 = result["scaling"][0]["tasks_per_s"]
    out += ["", "## Scaling over forced CPU devices", "",
            f"The sharded step (`sharding.task_mesh`, tasks split over devices) with "
            f"`--xla_force_host_platform_device_count=N`, {result['scaling'][0]['tasks']} "
            f"tasks, T = {result['scaling'][0]['inner_steps']}, one process per N, on "
            f"{result['info']['cpu']} with {result['info']['cores']} cores: virtual "
            "devices share those cores, so the speed-up is bounded by the core count.",
            "", f"| devices | tasks/s | speed-up vs {result['scaling'][0]['devices']} | compile s "
            "| load |", "|---|---|---|---|---|"]
    for s in result["scaling"]:
      out.append(f"| {s['devices']} | {s['tasks_per_s']:,.0f} | "
                 f"{s['tasks_per_s'] / s0:.2f}x | {s['compile_s']:.1f} | {s['load1']:.1f} |")
  if result.get("adapt"):
    out += ["", f"## Adaptation only (one warm-up phase) on {dev}", "",
            "`meta.adapt_items` (the jitted rule) and `emerflow.refine_items` (what a run "
            "calls: the rule sharded over all devices, with host transfers), K = "
            f"{sh['support_rows']} rows per item.", "",
            "| items | T | adapt_items items/s | refine_items items/s | compile s |",
            "|---|---|---|---|---|"]
    for a in result["adapt"]:
      out.append(f"| {a['items']} | {a['inner_steps']} | {a['adapt_items_per_s']:,.0f} | "
                 f"{a['refine_items_per_s']:,.0f} | {a['compile_s']:.2f} |")
  if result.get("profile"):
    out += ["", f"## What limits jax_vmap_jit on {dev}", ""] + _limits_text(
        result["profile"], result)
  if result.get("e2e"):
    e = result["e2e"]
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in e["seconds"].items())
    out += ["", "## End to end", "",
            f"{e['method']} / {e['backbone']} on {e['dataset']}, {e['seeds']} seed(s): "
            f"{secs} (from its results.json, measured by that run)."]
  return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> None:
  """bench.png: tasks/s vs tasks per batch, log-log, one panel per T."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ts = sorted({c["inner_steps"] for c in result["cases"]})
  fig, axes = plt.subplots(1, len(ts), figsize=(4.2 * len(ts), 4.2), squeeze=False,
                           sharey=True)
  for ax, t in zip(axes[0], ts):
    for impl in IMPLS:
      pts = sorted((c["tasks"], c["tasks_per_s"]) for c in result["cases"]
                   if c["impl"] == impl and c["inner_steps"] == t)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl + ("*" if impl in LOOP_IMPLS else ""))
    lo, hi = result["emerg_tasks_per_s"]
    ax.axhspan(lo, hi, color="grey", alpha=0.3, label="EmerG (DESIGN §9)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks per meta step")
    ax.set_title(f"T = {t} inner steps")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("tasks / s")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
  fig.suptitle(result["device"], fontsize=8)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_reports(result: dict, workdir: str) -> None:
  """Writes bench.json, bench.md and bench.png into ``workdir``."""
  from emerflow_jax import results  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  results.write_json_atomic(os.path.join(workdir, "bench.json"), result)
  with open(os.path.join(workdir, "bench.md"), "w") as f:
    f.write(markdown(result))
  plot(result, os.path.join(workdir, "bench.png"))
