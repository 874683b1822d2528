"""The method interface every approach (EmerFlow, base, baselines) implements.

A method turns a frozen pretrained backbone into embeddings for new items:

1. ``fit(ctx)`` trains whatever the method needs on old items only;
2. ``cold(ctx, state, items)`` gives embeddings [n, d] before any row is seen;
3. ``refine(ctx, state, emb, batch, items)`` updates them after each warm
   phase from that phase's rows (Packed [n, K]) and returns (emb, state).

The default ``refine`` is the shared batched fine-tuning of ``warmup``, so that
every method ends in the same refinement and the comparison is fair.  The
harness (``train.py``) calls a method twice per seed: on the validation
holdout (old items, for model selection) and on the emerging items (test).
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import protocol, warmup
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.models import backbones


@dataclasses.dataclass
class RuleBackbone:
  """A second backbone pretrained without some old items (``rule_holdout``).

  To the backbone every old item is in-sample: it has fitted that item's rows,
  so a meta-task built from them barely gains from adapting and teaches the
  rule to stand still.  Items held out of this backbone's pretraining are
  genuinely new to it, like emerging items are to the main backbone; the rule
  meta-learned on them is then used with the main backbone.

  Attributes:
    params: the auxiliary backbone's parameters (frozen).
    split: the split it was pretrained on (old items without ``items``).
    items: the held-out old items (meta-training tasks only).
  """
  params: Any
  split: protocol.Split
  items: np.ndarray


@dataclasses.dataclass
class Context:
  """What a method may use. Nothing in it reveals emerging items' future rows.

  Attributes:
    config: the full run config.
    ds: the dataset.
    split: the split (validation items already removed from old items).
    model: the backbone module.
    params: pretrained backbone parameters (frozen).
    tables: device feature tables.
    key: this method's PRNG key (per seed).
    workdir: a directory for this method's checkpoints (per seed).
    item_vectors: [n_items, D] enrichment vectors r_i, or None if the run
      does not load any (only methods that need them ask for them).
    meta_items: old items kept out of pretraining for meta-training tasks
      (only when the method asks for ``meta_holdout`` > 0), else None.
    rule_backbone: the auxiliary backbone for meta-training (only when the
      method asks for ``rule_holdout`` > 0), else None.
  """
  config: ml_collections.ConfigDict
  ds: dataset_lib.Dataset
  split: protocol.Split
  model: backbones.Backbone
  params: Any
  tables: backbones.Tables
  key: jax.Array
  workdir: pathlib.Path
  item_vectors: np.ndarray | None = None
  meta_items: np.ndarray | None = None
  rule_backbone: RuleBackbone | None = None

  @property
  def dim(self) -> int:
    return int(backbones.item_embedding_table(self.params).shape[-1])

  def old_item_embeddings(self) -> jnp.ndarray:
    """[n_old, d] pretrained ID embeddings of the old items (training targets)."""
    table = backbones.item_embedding_table(self.params)
    return jnp.take(table, backbones.item_ids(self.tables, self.split.old_items), 0)


class Method:
  """Base class; subclasses override what differs.

  Class attributes:
    name: registry name.
    item_dropout: DropoutNet's pretraining dropout (0 = plain pretraining).
    needs_vectors: whether the run must load enrichment vectors.
    vector_source: enrichment source forced by the method (the no-LLM ablation).
  """
  name = "method"
  item_dropout = 0.0
  needs_vectors = False
  vector_source: str | None = None  # overrides config.enrich.source if set
  meta_holdout = 0.0  # fraction of old items kept out of pretraining for meta-tasks
  rule_holdout = 0.0  # fraction held out of an auxiliary backbone (RuleBackbone)
  rule_pick = "random"  # which old items: random | fewest_rows

  def configure(self, config: ml_collections.ConfigDict) -> None:
    """Reads config before pretraining (e.g. DropoutNet's dropout rate)."""

  def fit(self, ctx: Context) -> Any:
    return None

  def cold(self, ctx: Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    raise NotImplementedError

  def refine(self, ctx: Context, state: Any, emb: jnp.ndarray,
             batch: dict[str, np.ndarray], items: np.ndarray
             ) -> tuple[jnp.ndarray, Any]:
    cfg = ctx.config.warmup
    emb = warmup.finetune(ctx.model, ctx.params, ctx.tables, emb,
                          {k: jnp.asarray(v) for k, v in batch.items()},
                          steps=int(cfg.steps), lr=float(cfg.lr))
    return emb, state


# name -> "module:Class"; modules import lazily so one method's deps never
# burden another.
REGISTRY = {
    "base": "emerflow_jax.baselines.base:Base",
    "dropoutnet": "emerflow_jax.baselines.dropoutnet:DropoutNet",
    "metaemb": "emerflow_jax.baselines.metaemb:MetaEmb",
    "mwuf": "emerflow_jax.baselines.mwuf:MWUF",
    "cvar": "emerflow_jax.baselines.cvar:CVAR",
    "emerflow": "emerflow_jax.emerflow:EmerFlow",
    "emerflow_no_llm": "emerflow_jax.emerflow:EmerFlowNoLLM",
    "emerflow_no_align": "emerflow_jax.emerflow:EmerFlowNoAlign",
    "emerflow_no_meta": "emerflow_jax.emerflow:EmerFlowNoMeta",
}


def get_method(name: str) -> Method:
  """Instantiates a registered method by name."""
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ValueError(f"method {name!r} is not available: {e}") from e
  return getattr(mod, cls)()
