"""The PyTorch references of the benchmarked meta-step; torch is optional.

The step is EmerFlow's default one: flow tasks (P phases of T inner steps,
each phase restarting the rule from the previous phase's embedding with its
own step size), the pooled pairwise outer loss over every task's query rows
(with sampled pairs, the same draws as the JAX step: ``world.auc_partners``).
``TorchTaskLoop`` loops over tasks with ``create_graph=True`` autograd, the
way EmerG and CVAR's MetaEmb do, then takes one backward pass of the pooled
loss; ``TorchFuncVmap`` runs ``torch.func.grad`` inside ``torch.func.vmap``.
torch is imported only when one of them is built, so this module imports
without it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from emerflow_jax import meta
from emerflow_jax.bench import timing
from emerflow_jax.bench import world as world_lib
from emerflow_jax.models import backbones


class _Torch:
  """The DeepFM + mapper + meta-learning math in PyTorch, from the JAX weights.

  Pure functions of tensors: parameters are plain tensors in dicts, so the
  same code serves the autograd loop and ``torch.func``.  Mirrors
  ``layers.FieldEmbedding`` (sum-pooled sequence fields), DeepFM's linear + FM
  + deep parts, ``align.Mapper`` (tanh-approximated GELU, like ``nn.gelu``),
  ``backbones.bce_loss``, ``meta.flow_task_loss`` (both inner rules of
  ``rule.adapt``) and ``meta.batch_loss``'s pooled outer loss.
  """

  def __init__(self, world: world_lib.World, mcfg: meta.MetaConfig):
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
                   for k, v in world_lib.flatten(world.meta_params).items()}
    self.opt = torch.optim.Adam(list(self.params.values()), lr=world.lr)
    self.world, self.partners, self.step = world, None, 0

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

  def flow(self, p, item, sup, qry, inner_grad):
    """One flow task: (L(support_0; e_0), query logits [P', Q] after each phase)."""
    torch, cfg = self.torch, self.mcfg
    alpha = torch.exp(p["log_alpha"])
    if not cfg.learn_alpha:
      alpha = alpha.detach()
    if not cfg.train_init:
      p = {k: (v.detach() if k.startswith("phi/") else v) for k, v in p.items()}
    n_phases = sup["users"].shape[0]
    if not cfg.phase_alpha:
      alpha = alpha.expand((n_phases,) + tuple(alpha.shape))
    e0 = self.cold(p, item)
    e = e0
    b1, b2, eps = 0.9, 0.999, 1e-8  # as in rule.adapt
    logits = [self.logits(qry["users"], qry["items"], e0)] if cfg.cold_in_outer else []
    for ph in range(n_phases):
      rows = {k: v[ph] for k, v in sup.items()}
      m = v = torch.zeros_like(e0)  # each phase restarts the rule's moments
      for t in range(cfg.inner_steps):
        g = inner_grad(e, rows)
        if cfg.rule == "sgd":
          e = e - alpha[ph] * g
          continue
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** (t + 1))
        v_hat = v / (1 - b2 ** (t + 1))
        e = e - alpha[ph] * m_hat / (torch.sqrt(v_hat + eps ** 2) + eps)
      logits.append(self.logits(qry["users"], qry["items"], e))
    first = {k: v[0] for k, v in sup.items()}
    return self.item_loss(e0, first), torch.stack(logits)

  def bce(self, logits, labels, mask):
    per_row = self.torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, reduction="none")
    return (per_row * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

  def pooled(self, support, logits, qry, partners):
    """``meta.batch_loss``'s outer loss: support [B], logits [B, P', Q]."""
    torch, cfg = self.torch, self.mcfg
    if cfg.outer_loss == "bce":
      per_task = self.bce(logits, qry["labels"][:, None], qry["mask"][:, None])
      return (cfg.beta * support + (1 - cfg.beta) * per_task.mean(1)).mean()
    y, mk = qry["labels"].reshape(-1), qry["mask"].reshape(-1)
    pos, neg = y * mk, (1.0 - y) * mk
    ranks = []
    for ph in range(logits.shape[1]):
      s = logits[:, ph].reshape(-1)
      if partners is None:  # every pair, as rank_loss.pairwise_auc_loss
        pair = pos[:, None] * neg[None, :] * torch.nn.functional.softplus(
            s[None, :] - s[:, None])
        ranks.append(pair.sum() / (pos.sum() * neg.sum()).clamp(min=1.0))
        continue
      part = partners[ph]  # as rank_loss.paired_auc_loss
      is_pos = (pos > 0)[:, None]
      s_pos = torch.where(is_pos, s[:, None], s[part])
      s_neg = torch.where(is_pos, s[part], s[:, None])
      w = (pos[:, None] * neg[part] / pos.sum().clamp(min=1.0)
           + neg[:, None] * pos[part] / neg.sum().clamp(min=1.0))
      ranks.append(0.5 * (w * torch.nn.functional.softplus(s_neg - s_pos)).sum()
                   / part.shape[1])
    return cfg.beta * support.mean() + (1 - cfg.beta) * torch.stack(ranks).mean()

  def _partners(self, batch, key):
    part = world_lib.auc_partners(self.mcfg, batch, key)
    return None if part is None else self.torch.as_tensor(part, dtype=self.torch.int64,
                                                          device=self.dev)

  @staticmethod
  def _split(tb):
    sup = {k.split("/")[1]: v for k, v in tb.items() if k.startswith("support/")}
    qry = {k.split("/")[1]: v for k, v in tb.items() if k.startswith("query/")}
    return tb["item"], sup, qry

  def sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def build(self, batch) -> float:
    self.batch, self.tb = batch, self._t(batch)
    t0 = time.perf_counter()
    self.run()  # eager: the first call is the warm-up, not a compilation
    return time.perf_counter() - t0

  def _step_partners(self):
    # The draws of the JAX step at this step number, outside the timed work
    # (they depend on labels and masks only).
    if self.partners is None or self.partners[0] != self.step:
      self.partners = (self.step, self._partners(self.batch, world_lib.step_key(self.step)))
    return self.partners[1]


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

  def _loss(self, tb, partners):
    items, sup, qry = self._split(tb)
    support, logits = [], []
    for i in range(items.shape[0]):
      l_s, lg = self.flow(self.params, items[i], {k: v[i] for k, v in sup.items()},
                          {k: v[i] for k, v in qry.items()}, self._inner_grad)
      support.append(l_s)
      logits.append(lg)
    return self.pooled(self.torch.stack(support), self.torch.stack(logits), qry, partners)

  def loss_and_grads(self, batch, key):
    """The outer loss and its gradients on ``batch``.

    Args:
      batch: [B, ...] task arrays.
      key: the step's key (sampled pairs).

    Returns:
      (loss, gradients by parameter name as numpy arrays).
    """
    self.opt.zero_grad(set_to_none=False)
    loss = self._loss(self._t(batch), self._partners(batch, key))
    loss.backward()
    # A parameter outside the graph (phi with train_init off) has no grad.
    grads = {k: np.zeros(tuple(v.shape), np.float32) if v.grad is None
             else v.grad.detach().cpu().numpy().copy() for k, v in self.params.items()}
    self.opt.zero_grad(set_to_none=False)
    return float(loss.detach()), grads

  def run(self) -> None:
    partners = self._step_partners()
    self.opt.zero_grad(set_to_none=False)
    self._loss(self.tb, partners).backward()
    self.opt.step()
    self.step += 1
    self.sync()


class TorchFuncVmap(_Torch):
  """``torch.func.grad`` (inner and outer) and ``torch.func.vmap`` over tasks."""
  name = "torch_func_vmap"

  def _value_and_grads(self, tb, partners):
    func = self.torch.func
    items, sup, qry = self._split(tb)
    inner = func.grad(self.item_loss)
    if self.mcfg.first_order:
      inner = lambda e, rows, g=inner: g(e, rows).detach()

    def batch_loss(p):
      support, logits = func.vmap(lambda i, s, q: self.flow(p, i, s, q, inner))(
          items, sup, qry)
      return self.pooled(support, logits, qry, partners)

    detached = {k: v.detach() for k, v in self.params.items()}
    return func.grad_and_value(batch_loss)(detached)

  def loss_and_grads(self, batch, key):
    """The outer loss and its gradients on ``batch``.

    Args:
      batch: [B, ...] task arrays.
      key: the step's key (sampled pairs).

    Returns:
      (loss, gradients by parameter name as numpy arrays).
    """
    grads, loss = self._value_and_grads(self._t(batch), self._partners(batch, key))
    return float(loss), {k: v.detach().cpu().numpy() for k, v in grads.items()}

  def run(self) -> None:
    grads, _ = self._value_and_grads(self.tb, self._step_partners())
    for k, v in self.params.items():
      v.grad = grads[k]
    self.opt.step()
    self.step += 1
    self.sync()


def choose_torch_threads(world: world_lib.World, mcfg: meta.MetaConfig, n_tasks: int,
                         repeats: int = 2) -> dict[str, Any]:
  """Times torch_task_loop with 1 thread and with torch's default; keeps the faster.

  Args:
    world: the benchmark world.
    mcfg: the meta config.
    n_tasks: tasks per step.
    repeats: timed steps per setting.

  Returns:
    The chosen thread count and both timings.
  """
  import torch  # pylint: disable=g-import-not-at-top
  default = torch.get_num_threads()
  rates = {}
  for n in sorted({1, default}):
    torch.set_num_threads(n)
    impl = TorchTaskLoop(world, mcfg)
    impl.build(world_lib.task_batch(world, n_tasks))
    rates[n] = n_tasks / statistics.median(timing.time_runs(impl.run, repeats))
  best = max(rates, key=rates.get)
  torch.set_num_threads(best)
  return {"threads": best, "default": default,
          "probe_tasks_per_s": {str(k): v for k, v in rates.items()}}

