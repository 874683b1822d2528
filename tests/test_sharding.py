"""Sharding over the task axis: helpers, and sharded == single-device results.

The device count is fixed when jax is imported, so the 4-device checks run in
a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(``_four_device_checks`` below is what it runs).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emerflow_jax import (align, emerflow_meta, meta, methods, protocol, rule,
                          sharding, tasks)
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones

# The session's XLA_FLAGS (conftest.py sets a fast-compile level), kept in children.
_SESSION_FLAGS = os.environ.get("XLA_FLAGS", "")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pad_leading_pads_with_zeros_to_a_multiple():
  tree = {"a": np.ones((5, 2), np.float32), "b": np.arange(5, dtype=np.int32)}
  out = sharding.pad_leading(tree, 4)
  assert out["a"].shape == (8, 2) and out["b"].shape == (8,)
  np.testing.assert_array_equal(out["a"][5:], 0)
  np.testing.assert_array_equal(out["b"][:5], np.arange(5))
  assert sharding.pad_leading(tree, 5)["a"].shape == (5, 2)


def test_shard_and_gather_round_trip_on_this_host():
  mesh = sharding.task_mesh()
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  s = sharding.shard_tasks({"x": x}, mesh)["x"]
  assert s.shape == (sharding.padded_size(6, mesh), 2)
  np.testing.assert_array_equal(sharding.gather(s)[:6], x)
  r = sharding.replicate(jnp.ones(3), mesh)
  assert r.sharding.is_fully_replicated


def test_distributed_settings_all_or_none():
  env = sharding.ENV_ADDRESS, sharding.ENV_PROCESSES, sharding.ENV_PROCESS_ID
  assert not sharding.maybe_initialize_distributed({})
  # One process: nothing to join.
  assert not sharding.maybe_initialize_distributed(dict(zip(env, ("h:1", "1", "0"))))
  with pytest.raises(ValueError, match=sharding.ENV_PROCESS_ID):
    sharding.maybe_initialize_distributed(dict(zip(env[:2], ("h:1", "2"))))
  with pytest.raises(ValueError, match="not in"):
    sharding.maybe_initialize_distributed(dict(zip(env, ("h:1", "2", "2"))))
  with pytest.raises(ValueError, match="integers"):
    sharding.maybe_initialize_distributed(dict(zip(env, ("h:1", "two", "0"))))
  with pytest.raises(ValueError, match="a sweep"):
    sharding.maybe_initialize_distributed(dict(zip(env, ("h:1", "2", "0"))),
                                          refuse="a sweep shares machines")
  assert not jax.distributed.is_initialized()


def _random_init(init_fn, seed: int, scale: float):
  """N(0, scale^2) leaves shaped like ``init_fn(key)``'s, with nothing compiled.

  Eager Flax initialisers compile one small program per op: seconds per world
  in every subprocess below.
  """
  leaves, treedef = jax.tree.flatten(jax.eval_shape(init_fn, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.normal(size=s.shape), s.dtype) for s in leaves])


def _world():
  ds = synthetic.make_synthetic(n_users=60, n_items=40, mean_count=40, seed=3)
  split = protocol.split_emerging_items(ds, n_max=30, k=4)
  model = backbones.make_backbone("deepfm", ds, dim=4, mlp=(8,))
  tables = backbones.make_tables(ds)
  # Large weights: non-trivial gradients.
  params = _random_init(lambda k: backbones.init_params(model, tables, k), 0, 1.0)
  r = align.standardize(ds.item_vectors, split.old_items)
  frozen = {"params": params, "tables": tables, "r": jnp.asarray(r)}
  mapper = align.Mapper(out_dim=4, hidden=(8,))
  phi = _random_init(lambda k: mapper.init(k, frozen["r"][:2]), 1, 0.3)
  meta_params = {"phi": phi, "log_alpha": rule.init_alpha(0.5, "per_dim", 4)}
  return ds, split, model, frozen, mapper, meta_params


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _four_device_checks(workdir: str) -> dict:
  """Runs in the 4-device subprocess; returns max abs differences and facts."""
  # pylint: disable-next=g-import-not-at-top
  from experiments.configs import synthetic as synthetic_config
  assert jax.device_count() == 4, jax.devices()
  ds, split, model, frozen, mapper, meta_params = _world()
  one, four = sharding.task_mesh(jax.devices()[:1]), sharding.task_mesh()
  out = {}

  # 1. Two meta steps on a batch of 6 real tasks (padded to 8 on 4 devices).
  cfg = meta.MetaConfig(inner_steps=2)
  tx = optax.adam(1e-2)
  all_tasks = tasks.build_meta_tasks(ds, split, 4, 6, np.random.default_rng(0))
  batch = tasks.pad_tasks({k: v[:6] for k, v in all_tasks.items()}, 6)
  results = {}
  for name, mesh in (("plain", None), ("four", four)):
    params = jax.tree.map(jnp.array, meta_params)  # the step donates its state
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}
    step = meta.make_train_step(model, mapper, cfg, tx, mesh)
    fz = frozen
    b = batch
    if mesh is not None:
      state, fz = sharding.replicate((state, frozen), mesh)
      b = sharding.shard_tasks(batch, mesh)
      out[f"batch_devices_{name}"] = len(b["item"].sharding.device_set)
    losses = []
    for _ in range(2):
      state, m = step(state, fz, b)
      losses.append(float(m["loss"]))
    results[name] = (losses, sharding.gather(state["params"]))
  # Relative: the scaled-up backbone gives losses far above 1.
  out["step_loss_diff"] = max(abs(a - b) / max(abs(b), 1.0)
                              for a, b in zip(results["four"][0], results["plain"][0]))
  out["step_param_diff"] = _max_diff(results["four"][1], results["plain"][1])

  # 2. The warm-up rule on 7 items (not a multiple of 4).
  items = split.emerging_items[:7]
  phase = tasks.pack_phase(ds, split.warm_rows["warm_a"][:7])
  emb = meta.cold_embedding(meta_params, mapper, frozen, jnp.asarray(items))
  plain = rule.adapt_items(meta_params, model, cfg, frozen, emb,
                           {k: jnp.asarray(v) for k, v in phase.items()})
  sharded = emerflow_meta.refine_items(meta_params, model, cfg, frozen, emb, phase, four)
  out["adapt_shape_ok"] = sharded.shape == plain.shape
  out["adapt_moved"] = float(np.max(np.abs(np.asarray(plain) - np.asarray(emb))))
  out["adapt_diff"] = _max_diff(sharded, plain)

  # 3. The real training loop (batches, checkpoints) on 1 vs 4 devices.
  config = synthetic_config.get_config("smoke")
  config.meta.epochs = 1
  config.meta.batch_tasks = 6
  config.meta.inner_steps = 2
  # The default run: flow tasks, one step size per phase, the pooled pairwise
  # loss (a reduction over every device's tasks).
  assert config.meta.tasks == "flow" and config.meta.outer_loss == "auc"
  flow_params = dict(meta_params, log_alpha=rule.init_alpha(
      0.5, "per_dim", 4, len(protocol.WARM_PHASES)))
  trained = {}
  for name, mesh in (("one", one), ("four", four)):
    ctx = methods.context_for(config, ds, split, model, frozen["tables"],
                              frozen["params"], jax.random.key(1),
                              pathlib.Path(workdir) / name)
    trained[name] = emerflow_meta.run_meta_training(ctx, mapper, flow_params, frozen,
                                               ctx.workdir / "meta", mesh=mesh)
  out["train_param_diff"] = _max_diff(trained["four"], trained["one"])
  out["train_moved"] = _max_diff(trained["one"], flow_params)
  return out


def test_sharded_over_four_devices_equals_single_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {_SESSION_FLAGS}",
             JAX_PLATFORMS="cpu")
  code = ("import json, sys; from tests import test_sharding as t; "
          "print('RESULT', json.dumps(t._four_device_checks(sys.argv[1])))")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["batch_devices_four"] == 4
  assert out["step_loss_diff"] < 1e-5, out
  assert out["step_param_diff"] < 1e-5, out
  assert out["adapt_shape_ok"] and out["adapt_moved"] > 1e-3, out
  assert out["adapt_diff"] < 1e-5, out
  assert out["train_moved"] > 1e-4, out
  assert out["train_param_diff"] < 1e-5, out


def test_compilation_cache_folder_comes_from_the_environment(tmp_path):
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  try:
    assert sharding.setup_compilation_cache({"EMERFLOW_XLA_CACHE": "0"}) is None
    assert jax.config.jax_compilation_cache_dir == before["jax_compilation_cache_dir"]
    got = sharding.setup_compilation_cache({"XDG_CACHE_HOME": str(tmp_path)})
    assert got == str(tmp_path / "emerflow_jax" / "xla")
    assert jax.config.jax_compilation_cache_dir == got
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    own = sharding.setup_compilation_cache({"JAX_COMPILATION_CACHE_DIR": "/x",
                                            "EMERFLOW_XLA_CACHE": "/y",
                                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"})
    assert own == "/x" and jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    assert sharding.setup_compilation_cache({"EMERFLOW_XLA_CACHE": "/y"}) == "/y"
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
