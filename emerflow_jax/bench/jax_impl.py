"""The JAX implementations of the benchmarked step, and the agreement check.

* ``JaxVmapJit``: ours, ``meta.make_train_step`` (the step a run takes), one
  compiled program for the whole batch of flow tasks;
* ``JaxTaskLoop``: the same step task by task from Python: a jitted forward
  pass per task gives its support loss and query logits, the pooled outer
  loss gives their cotangents, and a jitted backward pass per task
  (``jax.vjp``) accumulates the meta-gradient; then the same Adam update.
  The pooled loss couples the tasks, so a loop needs these two passes.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emerflow_jax import meta, rank_loss
from emerflow_jax.bench import world as world_lib


class AgreementError(AssertionError):
  """Two implementations disagree on the loss or the meta-gradients."""


def fresh_state(w: world_lib.World, tx: optax.GradientTransformation) -> dict[str, Any]:
  """A new meta train state from the world's parameters.

  Args:
    w: the benchmark world.
    tx: the outer optimizer.

  Returns:
    {"params", "opt_state", "step", "rng"}.
  """
  params = jax.tree.map(jnp.array, w.meta_params)  # the step donates it
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}


def pooled_outer(mcfg: meta.MetaConfig, support: jnp.ndarray, task_losses: jnp.ndarray,
                 logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray,
                 key: jax.Array) -> jnp.ndarray:
  """``meta.batch_loss``'s outer loss from per-task pieces (all tasks real).

  Args:
    support: [B] L(support_0; e_0) per task.
    task_losses: [B] per-task outer losses (the "bce" outer loss).
    logits: [B, P, Q] query logits after each phase.
    labels, mask: [B, Q] query rows.
    key: the step's key (sampled pairs).

  Returns:
    [] the outer loss.
  """
  if mcfg.outer_loss == "bce":
    return task_losses.mean()
  if mcfg.auc_pairs > 0:
    keys = jax.random.split(key, logits.shape[1])
    rank = jax.vmap(rank_loss.sampled_pairwise_auc_loss,
                    in_axes=(1, None, None, 0, None))(
        logits, labels, mask, keys, mcfg.auc_pairs).mean()
  else:
    rank = jax.vmap(rank_loss.pairwise_auc_loss, in_axes=(1, None, None))(
        logits, labels, mask).mean()
  return mcfg.beta * support.mean() + (1 - mcfg.beta) * rank


class JaxVmapJit:
  """Ours: ``meta.make_train_step``, one program for all tasks."""
  name = "jax_vmap_jit"

  def __init__(self, w: world_lib.World, mcfg: meta.MetaConfig):
    self.w, self.mcfg = w, mcfg
    self.tx = optax.adam(w.lr)
    self._value_and_grad = jax.jit(jax.value_and_grad(meta.batch_loss, has_aux=True),
                                   static_argnums=(1, 2, 3))

  def loss_and_grads(self, batch, key):
    """The outer loss and its gradients on ``batch``.

    Args:
      batch: [B, ...] task arrays.
      key: the step's key (sampled pairs).

    Returns:
      (loss, flat gradients by parameter name).
    """
    (loss, _), g = self._value_and_grad(self.w.meta_params, self.w.model, self.w.mapper,
                                        self.mcfg, self.w.frozen, batch, key)
    return float(loss), world_lib.flatten(g)

  def build(self, batch) -> float:
    """Compiles the step for this batch shape; returns the compile seconds."""
    step = meta.make_train_step(self.w.model, self.w.mapper, self.mcfg, self.tx)
    self.state = fresh_state(self.w, self.tx)
    self.batch = jax.device_put(batch)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.w.frozen, self.batch).compile()
    return time.perf_counter() - t0

  def run(self) -> None:
    self.state, m = self.compiled(self.state, self.w.frozen, self.batch)
    jax.block_until_ready((self.state, m))


class JaxTaskLoop:
  """The same step, task by task: jitted per-task forward and backward passes."""
  name = "jax_task_loop"

  def __init__(self, w: world_lib.World, mcfg: meta.MetaConfig):
    self.w, self.mcfg = w, mcfg
    self.tx = optax.adam(w.lr)

    def pieces(params, frozen, task):
      loss, aux = meta.task_loss(params, w.model, w.mapper, mcfg, frozen, task)
      return loss, aux["support_e0"], aux["query_logits"]

    def backward(acc, params, frozen, task, cts):
      _, vjp = jax.vjp(lambda p: pieces(p, frozen, task), params)
      return jax.tree.map(jnp.add, acc, vjp(cts)[0])

    def outer(outs, labels, mask, key):
      losses, support, logits = outs
      return pooled_outer(mcfg, support, losses, logits, labels, mask, key)

    def update(state, grads):
      upd, opt = self.tx.update(grads, state["opt_state"], state["params"])
      return dict(state, params=optax.apply_updates(state["params"], upd),
                  opt_state=opt, step=state["step"] + 1)

    self._forward = jax.jit(pieces)
    self._backward = jax.jit(backward, donate_argnums=0)
    self._outer = jax.jit(jax.value_and_grad(outer))
    self._update = jax.jit(update, donate_argnums=0)

  def _tasks(self, batch):
    # Split on the host once, outside the timed loop (a kind choice for loops).
    return [{k: jnp.asarray(v[i]) for k, v in batch.items() if k != "task_mask"}
            for i in range(len(batch["item"]))]

  def _grads(self, params, task_list, labels, mask, key):
    outs = [self._forward(params, self.w.frozen, t) for t in task_list]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *outs)
    loss, cts = self._outer(stacked, labels, mask, key)
    acc = jax.tree.map(jnp.zeros_like, params)
    for i, t in enumerate(task_list):
      acc = self._backward(acc, params, self.w.frozen, t, jax.tree.map(lambda c: c[i], cts))
    return loss, acc

  def loss_and_grads(self, batch, key):
    """The outer loss and its gradients on ``batch``.

    Args:
      batch: [B, ...] task arrays.
      key: the step's key (sampled pairs).

    Returns:
      (loss, flat gradients by parameter name).
    """
    loss, g = self._grads(self.w.meta_params, self._tasks(batch),
                          jnp.asarray(batch["query/labels"]),
                          jnp.asarray(batch["query/mask"]), key)
    return float(loss), world_lib.flatten(g)

  def build(self, batch) -> float:
    self.state = fresh_state(self.w, self.tx)
    self.task_list = self._tasks(batch)
    self.labels = jnp.asarray(batch["query/labels"])
    self.mask = jnp.asarray(batch["query/mask"])
    t0 = time.perf_counter()
    self.run()
    return time.perf_counter() - t0

  def run(self) -> None:
    key = world_lib.step_key(self.state["step"], self.state["rng"])
    _, g = self._grads(self.state["params"], self.task_list, self.labels, self.mask, key)
    self.state = self._update(self.state, g)
    jax.block_until_ready(self.state)


def torch_version() -> str | None:
  """The torch version, or None when torch does not import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch.__version__


def make_impls(w: world_lib.World, mcfg: meta.MetaConfig, names) -> dict[str, Any]:
  """Instantiates the named implementations (torch ones only if torch imports).

  Args:
    w: the benchmark world.
    mcfg: the meta config.
    names: implementation names.

  Returns:
    name -> implementation.
  """
  from emerflow_jax.bench import torch_impl  # pylint: disable=g-import-not-at-top
  classes = {c.name: c for c in (JaxVmapJit, JaxTaskLoop, torch_impl.TorchTaskLoop,
                                 torch_impl.TorchFuncVmap)}
  have_torch = torch_version() is not None
  return {n: classes[n](w, mcfg) for n in names
          if have_torch or not n.startswith("torch")}


def check_agreement(impls: dict[str, Any], batch: dict[str, np.ndarray],
                    tol: float, key: jax.Array | None = None) -> dict[str, float]:
  """Compares every implementation's loss and gradients with jax_vmap_jit's.

  All of them compute one step on ``batch`` with the pairs drawn by ``key``.
  The error of a gradient leaf is max|a - b| / max|b| (relative to the
  leaf's scale, so that tiny entries cannot hide a wrong leaf).

  Args:
    impls: name -> implementation.
    batch: [B, ...] task arrays.
    tol: largest relative error allowed.
    key: the step's key (default: ``world.step_key()``).

  Returns:
    {impl: worst relative error}.

  Raises:
    AgreementError: an implementation is off by more than ``tol``.
  """
  key = world_lib.step_key() if key is None else key
  names = list(impls)
  ref_name = "jax_vmap_jit" if "jax_vmap_jit" in impls else names[0]
  ref_loss, ref = impls[ref_name].loss_and_grads(batch, key)
  worst, problems = {}, []
  for name in names:
    if name == ref_name:
      continue
    loss, grads = impls[name].loss_and_grads(batch, key)
    errs = {"loss": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)}
    for k, g in ref.items():
      if k not in grads or grads[k].shape != g.shape:
        raise AgreementError(f"{name}: gradient {k} missing or mis-shaped")
      scale = float(np.max(np.abs(g)))
      if scale == 0.0:  # a frozen leaf: both must be exactly zero
        errs[k] = float(np.max(np.abs(grads[k])))
        continue
      errs[k] = float(np.max(np.abs(grads[k] - g)) / scale)
    worst[name] = max(errs.values())
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
      problems.append(f"{name} vs {ref_name}: " + ", ".join(
          f"{k} rel. err {v:.2e}" for k, v in sorted(bad.items())))
  if problems:
    raise AgreementError(f"implementations disagree (tol {tol:g}): " + "; ".join(problems))
  return worst
