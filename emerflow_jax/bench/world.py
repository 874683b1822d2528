"""The benchmark's world: synthetic data with MovieLens shapes, and its tasks.

``make_world`` builds a synthetic world whose fields have ML-1M's vocabularies
and widths, a DeepFM with pretrained-like weights, the mapper, and a batch
of the *flow tasks* a run meta-trains on (``tasks.flow_task_pool`` +
``tasks.sample_epoch``: P = 3 phases of K support rows, then Q query rows).
``bench_meta_config`` is the run's own ``meta.MetaConfig``: the benchmark
times the default step (flow tasks, per-phase step sizes, the pooled
pairwise outer loss), not a simplified one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emerflow_jax import align, emerflow_meta, meta, protocol, rank_loss, rule, tasks
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The world the tasks come from.

  Attributes:
    n_users, n_items: users and items (ML-1M has 6,040 and 3,706).
    text_dim: width of the item text vector r_i (MiniLM: 384).
    rows_per_item: (low, high) rows per item; above N every item is old.
    title_vocab, title_len, genre_vocab, genre_len: the two sequence fields.
  """
  n_users: int = 6040
  n_items: int = 3706
  text_dim: int = 384
  rows_per_item: tuple[int, int] = (110, 300)
  title_vocab: int = 4500
  title_len: int = 8
  genre_vocab: int = 18
  genre_len: int = 6


@dataclasses.dataclass
class World:
  """Everything a step needs: backbone, mapper, frozen pieces, packed tasks."""
  model: backbones.Backbone
  mapper: align.Mapper
  frozen: dict[str, Any]
  meta_params: dict[str, Any]
  tasks: dict[str, np.ndarray]  # flow tasks [n_tasks, ...], all real
  lr: float
  k: int
  query_rows: int


def ml1m_like(shapes: Shapes, seed: int) -> dataset_lib.Dataset:
  """A synthetic world whose fields have ML-1M's vocabularies and widths.

  Args:
    shapes: the world's sizes.
    seed: the generator seed.

  Returns:
    The dataset.
  """
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
  """The run's inner/outer loop settings (``emerflow_meta.meta_config``), unchanged."""
  return emerflow_meta.meta_config(config)


def make_world(shapes: Shapes, config: ml_collections.ConfigDict, n_tasks: int,
               seed: int = 0) -> World:
  """Builds the world, a DeepFM with random non-trivial weights, and flow tasks.

  Args:
    shapes: sizes of the world.
    config: a run config; its data (k), model, align and meta sections are used.
    n_tasks: flow tasks to pack (cycled when the world has fewer old items).
    seed: data and weights.

  Returns:
    The World; tasks in the layout ``meta.flow_task_loss`` reads.
  """
  ds = ml1m_like(shapes, seed)
  k, q = int(config.data.k), int(config.meta.query_rows)
  n_max = shapes.rows_per_item[0] - 1
  split = protocol.split_emerging_items(ds, n_max=n_max, k=k)
  pool = tasks.flow_task_pool(ds, split, k, q)
  ep = tasks.sample_epoch(pool, jax.random.key(seed), q, len(pool["item"]) - 1)
  flat = {key: np.asarray(v[0]) for key, v in ep.items() if key != "task_mask"}
  pick = np.resize(np.random.default_rng(seed).permutation(len(flat["item"])), n_tasks)
  packed = {key: v[pick] for key, v in flat.items()}
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
  phases = len(protocol.WARM_PHASES) if config.meta.phase_alpha else 0
  meta_params = {"phi": phi, "log_alpha": rule.init_alpha(
      float(config.meta.alpha), config.meta.alpha_mode, dim, phases)}
  return World(model=model, mapper=mapper, frozen=frozen, meta_params=meta_params,
               tasks=packed, lr=float(config.meta.lr), k=k, query_rows=q)


def task_batch(world: World, n: int) -> dict[str, np.ndarray]:
  """The first ``n`` tasks with ``task_mask`` (all real).

  Args:
    world: the benchmark world.
    n: tasks.

  Returns:
    [n, ...] task arrays.
  """
  return tasks.pad_tasks({k: v[:n] for k, v in world.tasks.items()}, n)


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """{"phi/params/Dense_0/kernel": array, ...}: names shared with torch."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x, np.float32)
          for p, x in leaves}


def step_key(step: int = 0, rng: Any = None) -> jax.Array:
  """The key ``meta.make_train_step`` draws sampled AUC pairs with at ``step``.

  Args:
    step: the step index.
    rng: raw key data of the train state (default zeros).

  Returns:
    The key.
  """
  rng = jnp.zeros((2,), jnp.uint32) if rng is None else rng
  return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


def auc_partners(mcfg: meta.MetaConfig, batch: dict[str, Any], key: jax.Array
                 ) -> np.ndarray | None:
  """[P, B * Q, pairs] partners the step draws (None with exact pairs).

  ``meta.batch_loss`` splits its key over the P phases and draws each
  phase's pairs over the pooled query rows; the PyTorch references take the
  same draws, so that every implementation computes the same step.

  Args:
    mcfg: the meta config.
    batch: [B, ...] task arrays.
    key: the step's key.

  Returns:
    The partners, or None.
  """
  if mcfg.outer_loss != "auc" or mcfg.auc_pairs <= 0:
    return None
  n_phases = batch["support/users"].shape[1] + int(mcfg.cold_in_outer)
  mask = jnp.asarray(batch["query/mask"]) * jnp.asarray(batch["task_mask"])[:, None]
  keys = jax.random.split(key, n_phases)
  return np.stack([np.asarray(rank_loss.draw_auc_pairs(jnp.asarray(batch["query/labels"]),
                                                  mask, k, mcfg.auc_pairs))
                   for k in keys])
