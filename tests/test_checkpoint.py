"""Tests for the Orbax checkpoint wrapper: bit-exact round trips and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emerflow_jax import checkpoint, pretrain


def _state(seed=0, steps=3):
  """A train state with a non-trivial Adam state, step and PRNG key data."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
            "table": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
  tx = optax.adam(1e-2)
  state = pretrain.init_state(params, tx, jax.random.key(seed))
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, state["params"])
    updates, opt = tx.update(grads, state["opt_state"], state["params"])
    state = dict(state, params=optax.apply_updates(state["params"], updates),
                 opt_state=opt, step=state["step"] + 1)
  return state


def _assert_bit_exact(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_exact(tmp_path):
  state = _state()
  assert int(state["step"]) == 3
  assert state["rng"].dtype == jnp.uint32  # raw key data, checkpointable
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(7, state)
  # A fresh manager (as in a new process) restores into a template of zeros.
  template = jax.tree.map(jnp.zeros_like, state)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 7
    restored, step = ckpt.restore_or(template)
  assert step == 7
  _assert_bit_exact(restored, state)
  key = jax.random.wrap_key_data(restored["rng"])
  np.testing.assert_array_equal(jax.random.key_data(key), state["rng"])


def test_restore_or_without_checkpoint_returns_the_template(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    got, step = ckpt.restore_or(state)
    assert step is None and got is state
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(state)


def test_keeps_the_latest_steps_and_restores_a_given_one(tmp_path):
  states = {s: _state(seed=s) for s in (1, 2, 3)}
  with checkpoint.Checkpointer(tmp_path / "c", max_to_keep=2) as ckpt:
    for s, st in states.items():
      ckpt.save(s, st)
    assert ckpt.latest_step() == 3
    _assert_bit_exact(ckpt.restore(states[3], step=2), states[2])
  kept = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.isdigit())
  assert kept == ["2", "3"]


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer("rel") as ckpt:
    assert ckpt.directory == str(tmp_path / "rel")


def test_save_and_load_arrays(tmp_path):
  path = tmp_path / "emb.npz"
  assert checkpoint.load_arrays(path) is None
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  checkpoint.save_arrays(path, emb=a, items=np.asarray([4, 9]))
  got = checkpoint.load_arrays(path)
  assert set(got) == {"emb", "items"}
  np.testing.assert_array_equal(got["emb"], a)
  assert got["emb"].dtype == np.float32
  assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]  # no temp file left
