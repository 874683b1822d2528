"""The method interface every approach (EmerFlow, base, baselines) implements.

A method turns a frozen pretrained backbone into embeddings for new items:

0. ``plan(config) -> Plan`` says, as data, what it needs from the harness:
   the backbones to pretrain (which old items each leaves out, the item
   dropout), the enrichment vectors it reads, the config sections it reads
   (its cache keys cover exactly those) and its search space for tuning;
1. ``fit(ctx)`` trains whatever the method needs on old items only;
2. ``cold(ctx, state, items)`` gives embeddings [n, d] before any row is seen;
3. ``refine(ctx, state, emb, batch, items, phase)`` updates them after warm
   phase ``phase`` from that phase's rows (Packed [n, K]), returning
   (emb, state).

``train.py`` carries out the plan and hands the results to the method in one
frozen ``Context``; nothing flows back except the method's own state.

The default ``refine`` is the shared batched fine-tuning of ``warmup``, so that
every method ends in the same refinement and the comparison is fair.  The
harness (``train.py``) calls a method twice per seed: on the validation
holdout (old items, for model selection) and on the emerging items (test).
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import cache, protocol, warmup
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.models import backbones


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """One backbone a method needs pretrained.

  Attributes:
    role: the name the method reads it by (``ctx.backbones[role]``); "main"
      is the backbone every phase is scored with.
    leave_out: fraction of old items kept out of its pretraining (their rows
      are never seen by it; the method gets them as ``Pretrained.held``).
      "main" carves from the split after validation, every other role from
      main's split.
    pick: which old items leave: "random" or "fewest_rows" (the old items
      most like emerging ones).
    carve_salt: added to the seed of that draw, so two roles draw
      independently; the values in use are kept so cached backbones stay valid.
    item_dropout: DropoutNet's per-batch item-embedding replacement rate.
    epochs: pretraining epochs; 0 means ``optim.epochs`` (only an auxiliary
      backbone may differ: "main" is the one every method is scored with).
  """
  role: str = "main"
  leave_out: float = 0.0
  pick: str = "random"
  carve_salt: int = 0
  item_dropout: float = 0.0
  epochs: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a method needs from the harness (``Method.plan``), as data.

  Attributes:
    backbones: the backbones to pretrain; exactly one has role "main".
    vectors: the enrichment source whose vectors r_i the method reads
      (``ctx.vectors``), or None.
    sections: the config sections the method itself reads beyond the shared
      ones (``SHARED_SECTIONS``).  The method is handed a config holding only
      those, and every cache key of its run covers exactly them.
    search_space: dotted config key -> ``space`` parameter, the method's own
      space for equal-budget tuning.
  """
  backbones: tuple[BackboneSpec, ...] = (BackboneSpec(),)
  vectors: str | None = None
  sections: tuple[str, ...] = ()
  search_space: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    roles = [b.role for b in self.backbones]
    if roles.count("main") != 1 or len(set(roles)) != len(roles):
      raise ValueError(f"a plan needs one 'main' backbone and distinct roles, got {roles}")


# Sections every run reads: the data, the backbone and its pretraining, the
# shared warm-up and what is evaluated.  ``seed``/``seeds`` are not here: a
# per-seed artifact is keyed by its own seed.
SHARED_SECTIONS = ("method", "backbone", "data", "model", "optim", "warmup", "eval")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretrained, frozen backbone and the old items it was trained on.

  Attributes:
    params: its parameters.
    split: the split it was pretrained on (``split.old_items``).
    held: old items left out of its pretraining ([m] ids; empty if none).
    key: its cache key (stage artifacts built on it include this key).
    seconds: the wall time its pretraining took, whichever run paid it (a
      backbone read from the cache keeps the time it was built in).
  """
  params: Any
  split: protocol.Split
  held: np.ndarray
  key: str
  seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may use. Nothing in it reveals emerging items' future rows.

  Attributes:
    config: the run config restricted to ``SHARED_SECTIONS`` and the
      method's ``Plan.sections``.
    ds: the dataset.
    split: main's split (validation items, and any items main leaves out,
      already removed from the old items).
    model: the backbone module (every role shares its architecture).
    tables: device feature tables.
    key: this method's PRNG key (per seed).
    workdir: this seed's folder; stage artifacts go to ``stage_dir``.
    backbones: role -> ``Pretrained``, as the plan asked.
    vectors: [n_items, D] enrichment vectors r_i, or None if the plan asked
      for none.
    writer: a ``curves`` writer for the method's training curves, or None.
  """
  config: ml_collections.ConfigDict
  ds: dataset_lib.Dataset
  split: protocol.Split
  model: backbones.Backbone
  tables: backbones.Tables
  key: jax.Array
  workdir: pathlib.Path
  backbones: Mapping[str, Pretrained]
  vectors: np.ndarray | None = None
  writer: Any = None

  @property
  def params(self) -> Any:
    """Main's pretrained parameters (frozen)."""
    return self.backbones["main"].params

  @property
  def dim(self) -> int:
    return int(backbones.item_embedding_table(self.params).shape[-1])

  def old_item_embeddings(self) -> jnp.ndarray:
    """[n_old, d] pretrained ID embeddings of the old items (training targets)."""
    table = backbones.item_embedding_table(self.params)
    return jnp.take(table, backbones.item_ids(self.tables, self.split.old_items), 0)

  def stage_dir(self, name: str, sections: Sequence[str],
                role: str = "main", **extra: Any) -> pathlib.Path:
    """Folder of a method's trained stage, keyed by what it depends on.

    Args:
      name: the stage ("align", "meta", ...).
      sections: the config sections the stage reads (its key covers only
        those, plus the backbone it is built on and ``extra``).
      role: the backbone the stage is built on.
      **extra: anything else it depends on.

    Returns:
      ``<workdir>/<name>-<key>`` (absolute).
    """
    k = cache.key(self.config, sections, backbone=self.backbones[role].key, **extra)
    return (self.workdir / f"{name}-{k}").absolute()


def context_for(config: ml_collections.ConfigDict, ds: dataset_lib.Dataset,
                split: protocol.Split, model: backbones.Backbone,
                tables: backbones.Tables, params: Any, key: jax.Array,
                workdir: pathlib.Path, vectors: np.ndarray | None = None) -> Context:
  """A Context around one already pretrained backbone (notebooks, tests).

  Args:
    config: the config the method reads (not restricted).
    ds: the dataset.
    split: the split ``params`` was pretrained on.
    model: the backbone module.
    tables: its feature tables.
    params: its pretrained parameters, used as "main".
    key: the method's PRNG key.
    workdir: the method's folder.
    vectors: optional [n_items, D] enrichment vectors.

  Returns:
    The Context; its "main" backbone has the cache key "given".
  """
  main = Pretrained(params=params, split=split, held=np.zeros(0, np.int64), key="given")
  return Context(config=config, ds=ds, split=split, model=model, tables=tables, key=key,
                 workdir=pathlib.Path(workdir), backbones={"main": main}, vectors=vectors)


class Method:
  """Base class; subclasses override what differs.

  ``plan(config)`` says what the method needs before anything runs; the
  harness carries it out and calls ``fit(ctx)`` once per seed, then
  ``cold`` and ``refine`` per item set (validation holdout, emerging items).
  ``phase`` in ``refine`` is the warm phase's index (0 = warm_a).
  ``report(state)`` hands back what ``fit`` measured on old items.

  ``backbone_kinds`` names the backbones (``config.backbone``) the method can
  score with, or is None for any; a comparison whose grid has none of them
  runs the method once on the first.
  """
  name = "method"
  backbone_kinds: tuple[str, ...] | None = None

  def plan(self, config: ml_collections.ConfigDict) -> Plan:
    """What the harness must provide; also validates the method's options."""
    return Plan(search_space=warmup_space())

  def fit(self, ctx: Context) -> Any:
    return None

  def report(self, state: Any) -> dict[str, Any]:
    """Numbers ``fit`` measured on old items only (``state`` is what it
    returned), recorded per seed in results.json under "report"; none here."""
    del state
    return {}

  def cold(self, ctx: Context, state: Any, items: np.ndarray) -> jnp.ndarray:
    """Cold embeddings [n, d] of ``items``, before any of their rows is seen.

    Args:
      ctx: the run's context.
      state: what ``fit`` returned.
      items: [n] item ids (validation holdout or emerging items).

    Returns:
      [n, d] embeddings, one row per entry of ``items``.
    """
    raise NotImplementedError

  def refine(self, ctx: Context, state: Any, emb: jnp.ndarray,
             batch: dict[str, np.ndarray], items: np.ndarray, phase: int
             ) -> tuple[jnp.ndarray, Any]:
    """Updates ``emb`` [n, d] from warm phase ``phase``'s rows (Packed [n, K]).

    Args:
      ctx: the run's context.
      state: what ``fit`` (or the previous phase) returned.
      emb: [n, d] current embeddings of ``items``.
      batch: the phase's rows, each [n, K].
      items: [n] item ids.
      phase: 0, 1, 2 for warm_a, warm_b, warm_c.

    Returns:
      (new embeddings [n, d], new state).
    """
    del items, phase
    cfg = ctx.config.warmup
    emb = warmup.finetune(ctx.model, ctx.params, ctx.tables, emb,
                          {k: jnp.asarray(v) for k, v in batch.items()},
                          steps=int(cfg.steps), lr=float(cfg.lr))
    return emb, state


def warmup_space() -> dict[str, Any]:
  """The shared fine-tuning's search space, which every method's space includes."""
  from emerflow_jax import space  # pylint: disable=g-import-not-at-top
  return {"warmup.lr": space.Float(1e-3, 1e-1, log=True),
          "warmup.steps": space.Int(2, 20)}


# name -> "module:Class"; modules import lazily so one method's deps never
# burden another.
REGISTRY = {
    "base": "emerflow_jax.baselines.base:Base",
    "dropoutnet": "emerflow_jax.baselines.dropoutnet:DropoutNet",
    "metaemb": "emerflow_jax.baselines.metaemb:MetaEmb",
    "mwuf": "emerflow_jax.baselines.mwuf:MWUF",
    "cvar": "emerflow_jax.baselines.cvar:CVAR",
    "emerg": "emerflow_jax.baselines.emerg:EmerG",
    "gme": "emerflow_jax.baselines.gme:GME",
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
