"""Tests for the four CTR backbones and the pure scoring functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax.models import backbones

KINDS = ("deepfm", "widedeep", "fm", "dcn")


@pytest.fixture(scope="module", params=KINDS)
def world(request, tiny_ds, random_params):
  """A backbone of each kind with random (not tiny) parameters."""
  model = backbones.make_backbone(request.param, tiny_ds, dim=4, mlp=(8,))
  tables = backbones.make_tables(tiny_ds)
  params = random_params(model, tables, seed=1)
  # Tables are an argument so that tests may change them without recompiling;
  # every test uses B = 8 or [T, R] = [2, 4] rows (few programs to compile).
  score = jax.jit(lambda p, t, u, i, e=None: backbones.score(model, p, t, u, i, e))
  return model, tables, params, score


def _rows(shape=(8,), seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 60, shape), jnp.int32),
          jnp.asarray(rng.integers(0, 40, shape), jnp.int32))


def test_make_backbone_orders_user_fields_then_item_fields(tiny_ds):
  model = backbones.make_backbone("fm", tiny_ds)
  keys = [k for k, _ in model.vocab_sizes]
  assert keys == ["user/user_id", "user/group", "item/item_id", "item/quality",
                  "item/genres"]
  assert dict(model.vocab_sizes)["item/item_id"] == tiny_ds.n_items + 1
  assert model.dim == 16 and tuple(model.mlp) == (16, 16)  # DESIGN §6 defaults


def _with_embed(params, name, value):
  """A copy of ``params`` with one embedding table replaced."""
  embed = dict(params["params"]["embed"], **{name: value})
  return {"params": dict(params["params"], embed=embed)}


def test_logits_for_flat_and_task_shaped_inputs(world):
  _, tables, params, score = world
  u, i = _rows()
  flat = score(params, tables, u, i)
  assert flat.shape == (8,) and flat.dtype == jnp.float32
  assert np.isfinite(np.asarray(flat)).all()
  grid = score(params, tables, u.reshape(2, 4), i.reshape(2, 4))
  assert grid.shape == (2, 4)
  # A [T, R] call scores exactly what the flat call does.
  np.testing.assert_allclose(grid.reshape(-1), flat, rtol=1e-6)
  e = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)
  np.testing.assert_allclose(
      score(params, tables, u.reshape(2, 4), i.reshape(2, 4), e.reshape(2, 4, 4)),
      score(params, tables, u, i, e).reshape(2, 4), rtol=1e-6)


def test_item_emb_override_replaces_exactly_the_item_id_embedding(world):
  _, tables, params, score = world
  u, i = _rows()
  table = backbones.item_embedding_table(params)
  rows = jnp.take(table, backbones.item_ids(tables, i), axis=0)
  plain = score(params, tables, u, i)
  np.testing.assert_allclose(score(params, tables, u, i, rows), plain,
                             rtol=1e-6, atol=1e-7)
  changed = score(params, tables, u, i, rows + 0.5)
  assert np.all(np.abs(np.asarray(changed - plain)) > 1e-6)
  # With an override, the item-ID table itself no longer matters.
  wiped = _with_embed(params, backbones.ITEM_ID_PARAM, jnp.zeros_like(table))
  np.testing.assert_allclose(score(wiped, tables, u, i, rows), plain,
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(score(wiped, tables, u, i), plain)


def test_sequence_padding_has_no_effect(world):
  _, tables, params, score = world
  # Give some items fewer genres (0 = padding) and make the padding row huge.
  genres = np.asarray(tables["item/genres"]).copy()
  genres[:20, 1] = 0
  tables = dict(tables, **{"item/genres": jnp.asarray(genres)})
  u, i = _rows()
  assert (genres[np.asarray(i), 1] == 0).any()
  g = params["params"]["embed"]["item_genres"]
  a = score(params, tables, u, i)
  b = score(_with_embed(params, "item_genres", g.at[0].set(50.0)), tables, u, i)
  np.testing.assert_array_equal(a, b)
  # Changing a real genre's row does change the output (the check can fail).
  real = int(genres[int(i[0]), 0])
  c = score(_with_embed(params, "item_genres", g.at[real].add(1.0)), tables, u, i)
  assert not np.allclose(a, c)


def test_grad_wrt_item_emb_matches_finite_differences(world):
  model, tables, params, _ = world
  u, i = _rows(seed=3)
  labels = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    e = jnp.asarray(rng.normal(size=(8, 4)), jnp.float64)
    v = jnp.asarray(rng.normal(size=(8, 4)), jnp.float64)

    def loss(emb):
      logits = backbones.score(model, p64, tables, u, i, emb)
      return backbones.bce_loss(logits, labels)

    g = jax.jit(jax.grad(loss))(e)
    assert g.dtype == jnp.float64
    h = 1e-6
    f = jax.jit(loss)
    fd = (f(e + h * v) - f(e - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6)
    assert abs(float(fd)) > 1e-3  # a non-trivial direction
    # Per-coordinate check on one row.
    for d in range(4):
      basis = jnp.zeros((8, 4), jnp.float64).at[2, d].set(1.0)
      fd = (f(e + h * basis) - f(e - h * basis)) / (2 * h)
      np.testing.assert_allclose(float(g[2, d]), float(fd), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mlp", [(8,), (8, 6)])
def test_prepared_rows_score_exactly_as_the_full_forward(world, mlp, random_params):
  model, tables, params, _ = world
  if tuple(model.mlp) != mlp:
    model = model.clone(mlp=mlp)
    params = random_params(model, tables, seed=3)
  u, i = _rows((2, 4), seed=5)
  rng = np.random.default_rng(6)
  e = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
  prep = backbones.prepare_rows(model, params, tables, u, i)
  assert ("users" in prep) == (model.kind not in backbones.PARTIAL_KINDS)
  full = backbones.score(model, params, tables, u, i, e)
  got = backbones.score_prepared(model, params, tables, prep, e)
  assert got.shape == (2, 4)
  np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-6)
  # One [d] embedding for every row, as an item task scores its rows.
  one = e[0, 0]
  np.testing.assert_allclose(
      backbones.score_prepared(model, params, tables, prep, one),
      backbones.score(model, params, tables, u, i, jnp.broadcast_to(one, e.shape)),
      rtol=1e-6, atol=1e-6)
  # vmapped over tasks equals a loop over tasks.
  vm = jax.vmap(lambda uu, ii, ee: backbones.score_prepared(
      model, params, tables, backbones.prepare_rows(model, params, tables, uu, ii), ee),
                in_axes=(0, 0, 0))(u, i, e[:, 0])
  for t in range(2):
    p_t = backbones.prepare_rows(model, params, tables, u[t], i[t])
    np.testing.assert_allclose(vm[t], backbones.score_prepared(
        model, params, tables, p_t, e[t, 0]), rtol=1e-6, atol=1e-6)


def test_prepared_grads_match_finite_differences_and_the_full_forward(world):
  model, tables, params, _ = world
  u, i = _rows(seed=7)
  labels = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    e = jnp.asarray(rng.normal(size=(4,)), jnp.float64)
    v = jnp.asarray(rng.normal(size=(4,)), jnp.float64)
    prep = backbones.prepare_rows(model, p64, tables, u, i)

    def loss(emb):
      return backbones.bce_loss(backbones.score_prepared(model, p64, tables, prep, emb),
                                labels)

    def full(emb):
      emb = jnp.broadcast_to(emb, (8, 4))
      return backbones.bce_loss(backbones.score(model, p64, tables, u, i, emb), labels)

    g = jax.grad(loss)(e)
    h = 1e-6
    fd = (loss(e + h * v) - loss(e - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6)
    assert abs(float(fd)) > 1e-3
    np.testing.assert_allclose(g, jax.grad(full)(e), rtol=1e-9, atol=1e-12)
    # Second order too: the meta-gradient differentiates the inner gradient.
    hv = jax.jvp(jax.grad(loss), (e,), (v,))[1]
    fd2 = (jax.grad(loss)(e + h * v) - jax.grad(loss)(e - h * v)) / (2 * h)
    np.testing.assert_allclose(hv, fd2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(hv, jax.jvp(jax.grad(full), (e,), (v,))[1],
                               rtol=1e-9, atol=1e-12)


def test_bce_loss_masked_mean():
  logits = jnp.asarray([0.0, 2.0, -1.0, 5.0])
  labels = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  per = np.log1p(np.exp(-np.asarray([0.0, -2.0, -1.0, -5.0])))
  np.testing.assert_allclose(backbones.bce_loss(logits, labels), per.mean(), rtol=1e-6)
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(backbones.bce_loss(logits, labels, mask),
                             (per[0] + per[2]) / 2, rtol=1e-6)
  assert float(backbones.bce_loss(logits, labels, jnp.zeros(4))) == 0.0


def test_unknown_kind_is_rejected(tiny_ds, random_params):
  model = backbones.make_backbone("nope", tiny_ds, dim=4)
  tables = backbones.make_tables(tiny_ds)
  with pytest.raises(ValueError, match="unknown backbone 'nope'"):
    random_params(model, tables)
