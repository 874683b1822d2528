"""Tests for baselines/emerg.py: EmerG's hypernetwork, meta-step and warm-up."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import methods, pretrain, tasks
from emerflow_jax.baselines import emerg, metaemb
from emerflow_jax.data import paths
from emerflow_jax.models import backbones
from experiments.configs import common

import conftest
from conftest import TINY_K, TINY_N


@pytest.fixture(scope="module")
def gnn(tiny_ds, tiny_split, tmp_path_factory) -> types.SimpleNamespace:
  """The emerg_gnn backbone (d=4) pretrained on the tiny world's base rows."""
  model = backbones.make_backbone("emerg_gnn", tiny_ds, dim=4)
  tables = backbones.make_tables(tiny_ds)
  params = pretrain.pretrain_backbone(
      model, tables, tasks.pack_flat(tiny_ds, tiny_split.base_rows),
      jax.random.key(0), epochs=3, batch_size=64, lr=3e-3,
      ckpt_dir=tmp_path_factory.mktemp("gnn"), log=lambda _: None)
  return types.SimpleNamespace(model=model, tables=tables, params=params)


def _config(**overrides):
  config = common.base_config("synthetic", n_max=TINY_N, k=TINY_K)
  config.backbone = "emerg_gnn"
  config.emerg.epochs = 1
  config.emerg.warm_steps = 3
  config.emerg.batch_tasks = 8
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _context(ds, split, gnn, workdir, **overrides):
  return methods.context_for(_config(**overrides), ds, split, gnn.model, gnn.tables,
                             gnn.params, jax.random.key(1), workdir)


def _phase(ds, split, phase="warm_a"):
  return {k: np.asarray(v) for k, v in tasks.pack_phase(ds, split.warm_rows[phase]).items()}


def test_plan_needs_the_gnn_backbone():
  with pytest.raises(ValueError, match="backbone=emerg_gnn"):
    emerg.EmerG().plan(common.base_config("synthetic", n_max=TINY_N, k=TINY_K))
  plan = emerg.EmerG().plan(_config())
  assert plan.sections == ("emerg",) and "emerg.inner_lr" in plan.search_space


def test_untrained_generator_is_a_small_residual_on_the_global_graph(gnn):
  gen = emerg.GraphGenerator(n_fields=gnn.model.n_fields, n_layers=3)
  items = jnp.arange(5)
  s = metaemb.side_embeddings(metaemb.backbone_embed(gnn.params), gnn.tables, items)
  gp = gen.init(jax.random.key(0), s[0])
  rep = emerg.cold_rep(gen, gp, gnn.model, gnn.params, gnn.tables, items,
                       jnp.zeros((5, 4)))
  f = gnn.model.n_fields
  graphs = rep[:, 4:].reshape(5, 3, f, f)
  base = gnn.params["params"]["graph"]
  assert float(jnp.abs(graphs - base).max()) < 0.2
  assert float(jnp.abs(graphs[0] - graphs[1]).max()) > 0  # item-specific


def test_vmapped_warmup_equals_per_item_loop(tiny_ds, tiny_split, gnn, random_params):
  params = random_params(gnn.model, gnn.tables, seed=2)  # outputs depend on every input
  batch = {k: jnp.asarray(v) for k, v in _phase(tiny_ds, tiny_split).items()
           if k in ("users", "items", "labels", "mask")}
  batch["mask"] = batch["mask"].at[0, 2:].set(0)  # one item with a short phase
  n = batch["users"].shape[0]
  width = gnn.model.dim + gnn.model.graph_size
  rep = jnp.asarray(np.random.default_rng(0).normal(size=(n, width)) * 0.3, jnp.float32)
  tx = emerg.warm_tx(1e-2, 1e-3)
  opt = jax.vmap(tx.init)(rep)
  out, opt_out = emerg.warm_items(gnn.model, params, gnn.tables, rep, opt, batch, tx, 4)
  # ... and a second phase continuing the Adam state.
  out2, _ = emerg.warm_items(gnn.model, params, gnn.tables, out, opt_out, batch, tx, 3)
  one = jax.jit(emerg.warm_item, static_argnames=("model", "tx", "steps"))
  for j in range(n):
    rows = {k: v[j] for k, v in batch.items()}
    r, o = one(gnn.model, params, gnn.tables, rep[j], tx.init(rep[j]), rows, tx=tx, steps=4)
    np.testing.assert_allclose(out[j], r, rtol=1e-5, atol=1e-5)
    r2, _ = one(gnn.model, params, gnn.tables, r, o, rows, tx=tx, steps=3)
    np.testing.assert_allclose(out2[j], r2, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out - rep).max()) > 1e-3  # the warm-up moved something
  assert float(jnp.abs(out[:, 4:] - rep[:, 4:]).max()) > 1e-3  # graphs too


def test_hypernetwork_gradient_matches_finite_differences(tiny_ds, tiny_split, gnn,
                                                          random_params):
  model, tables = gnn.model, gnn.tables
  params = random_params(model, tables, seed=3)
  all_tasks = tasks.build_meta_tasks(tiny_ds, tiny_split, TINY_K, 2 * TINY_K)
  batch = tasks.batches(all_tasks, 4, np.random.default_rng(0))[0]
  gen = emerg.GraphGenerator(n_fields=model.n_fields, n_layers=3)
  side = metaemb.side_embeddings(metaemb.backbone_embed(params), tables, jnp.arange(1))[0]
  gp = gen.init(jax.random.key(4), side)
  gp = jax.tree.map(lambda a: a * 30.0, gp)  # weights large enough to matter
  with jax.enable_x64(True):
    p64, g64 = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t) for t in (params, gp))
    b64 = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(g, first_order=False):
      return emerg.meta_loss(gen, g, model, p64, tables, b64, jax.random.key(5),
                             0.5, 0.1, first_order)

    grad = jax.jit(jax.grad(loss))(g64)
    f = jax.jit(loss)
    rng = np.random.default_rng(6)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float64), g64)
    h = 1e-6
    shift = lambda s: jax.tree.map(lambda a, d: a + s * d, g64, v)
    fd = (f(shift(h)) - f(shift(-h))) / (2 * h)
    dot = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
    np.testing.assert_allclose(dot, float(fd), rtol=1e-5)
    assert abs(float(fd)) > 1e-4
    # First order drops the inner step's second derivative: a different gradient.
    g1 = jax.jit(jax.grad(lambda g: loss(g, True)))(g64)
    dot1 = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(g1), jax.tree.leaves(v)))
    assert abs(dot1 - dot) > 1e-8


def test_fit_cold_refine_end_to_end(tiny_ds, tiny_split, gnn, tmp_path):
  ctx = _context(tiny_ds, tiny_split, gnn, tmp_path / "m")
  method = emerg.EmerG()
  state = method.fit(ctx)
  items = tiny_split.emerging_items
  emb = method.cold(ctx, state, items)
  assert emb.shape == (len(items), 4 + gnn.model.graph_size)
  for phase, name in enumerate(("warm_a", "warm_b", "warm_c")):
    new, state = method.refine(ctx, state, emb, _phase(tiny_ds, tiny_split, name),
                               items, phase)
    assert bool(jnp.all(jnp.isfinite(new))) and float(jnp.abs(new - emb).max()) > 0
    emb = new
  # A second fit resumes from its checkpoint: the same generator.
  again = method.fit(_context(tiny_ds, tiny_split, gnn, tmp_path / "m"))
  np.testing.assert_array_equal(method.cold(ctx, again, items),
                                method.cold(ctx, state, items))


def test_reads_no_future_rows(tiny_ds, tiny_split, gnn, tmp_path):
  """Garbling what comes after warm_a (emerging items' later phases and test rows)
  changes neither the trained method, nor the cold nor the warm_a embeddings."""
  later = np.concatenate([tiny_split.warm_rows["warm_b"].ravel(),
                          tiny_split.warm_rows["warm_c"].ravel(), tiny_split.test_rows])
  later = later[later >= 0]
  rng = np.random.default_rng(0)
  labels, users = tiny_ds.labels.copy(), tiny_ds.users.copy()
  labels[later] = 1.0 - labels[later]
  users[later] = rng.integers(0, tiny_ds.n_users, len(later))
  garbled = dataclasses.replace(tiny_ds, labels=labels, users=users)
  items = tiny_split.emerging_items
  outs = []
  for name, ds in (("clean", tiny_ds), ("garbled", garbled)):
    ctx = _context(ds, tiny_split, gnn, tmp_path / name)
    method = emerg.EmerG()
    state = method.fit(ctx)
    cold = method.cold(ctx, state, items)
    warm, _ = method.refine(ctx, state, cold, _phase(ds, tiny_split), items, 0)
    outs.append((np.asarray(cold), np.asarray(warm)))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  assert not np.array_equal(outs[0][0], outs[0][1])


# The binary, end to end: synthetic, then each real dataset's smoke config.  The
# runs go to the background (conftest.py) and share one backbone cache, so a
# backbone that two binaries need (repoDB's emerg_gnn) is pretrained once.
REAL = {"movielens100k": ("movielens-100k", "u.data", "u.item", "u.user"),
        "disgenet": ("disgenet-curated-v7", "curated_gene_disease_associations.tsv.gz"),
        "repodb": ("repodb", "derived_repodb_full.csv")}


def binary_argv(config, method, backbone, workdir):
  """experiments.run on ``config``:smoke, or None when its real data is missing.

  Args:
    config: a config file name under experiments/configs (no ``.py``).
    method: --config.method.
    backbone: --config.backbone.
    workdir: the run's --workdir; its grandparent holds the shared backbone cache.

  Returns:
    The argv list, or None.
  """
  if config in REAL:
    sub, *files = REAL[config]
    folder = pathlib.Path(os.environ.get(paths.ENV_VAR, "/nonexistent")) / sub
    if not all((folder / f).is_file() for f in files):
      return None
  cache_dir = pathlib.Path(workdir).parents[1] / "backbones"
  return conftest.experiment_command(
      workdir, f"--config=experiments/configs/{config}.py:smoke",
      f"--config.method={method}", f"--config.backbone={backbone}", "--config.seeds=1",
      f"--config.optim.cache_dir={cache_dir}")


def check_binary(run, method, backbone):
  """Asserts a finished binary run (``background_run``) succeeded; returns results.json."""
  assert run.proc.returncode == 0, run.proc.stderr[-3000:]
  res = json.loads((run.workdir / "results.json").read_text())
  assert res["method"] == method and res["backbone"] == backbone
  for phase in ("cold", "warm_a", "warm_b", "warm_c"):
    assert 0.0 < res["auc"][phase][0] < 1.0
  return res


@pytest.mark.background(
    make_argv=lambda _, w: binary_argv("synthetic", "emerg", "emerg_gnn", w))
def test_binary_on_synthetic(background_run):
  check_binary(background_run, "emerg", "emerg_gnn")


# One real dataset per new baseline keeps CI in its budget: EmerG runs on
# MovieLens-100K here, GME on DisGeNET and on repoDB with emerg_gnn
# (test_baselines_gme.test_binary), so every dataset's smoke run and the GNN
# backbone on real data are each exercised once.
@pytest.mark.background(
    make_argv=lambda p, w: binary_argv(p["config"], "emerg", "emerg_gnn", w))
@pytest.mark.parametrize("config", ["movielens100k"])
def test_binary_on_real_data(config, real_data, background_run):
  real_data(*REAL[config])
  check_binary(background_run, "emerg", "emerg_gnn")
