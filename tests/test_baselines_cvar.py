"""CVAR: finite, decreasing loss terms; the CVAE is re-trained on each warm phase."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import tasks, train
from emerflow_jax.baselines import cvar
from emerflow_jax.models import backbones


@pytest.fixture
def ctx(tiny_context):
  """The shared tiny world and its pretrained DeepFM."""
  return tiny_context(**{"cvar.epochs": 3, "cvar.iters": 2, "cvar.batch_size": 128,
                         "cvar.lr": 1e-2})


def test_wasserstein_matches_closed_form():
  m1, m2 = jnp.asarray([[0.0, 1.0]]), jnp.asarray([[1.0, 1.0]])
  lv1, lv2 = jnp.log(jnp.asarray([[4.0, 1.0]])), jnp.log(jnp.asarray([[1.0, 1.0]]))
  # ||m1 - m2||^2 + ||sigma1 - sigma2||^2 = 1 + (2 - 1)^2.
  np.testing.assert_allclose(cvar.wasserstein(m1, lv1, m2, lv2), [2.0], rtol=1e-6)


def test_loss_terms_finite_and_decreasing(ctx):
  state = cvar.CVAR().fit(ctx)
  hist = state["history"]
  assert len(hist) == 3
  for h in hist:
    assert all(np.isfinite(v) for v in h.values())
  assert hist[-1]["loss"] < hist[0]["loss"]
  assert hist[-1]["recon"] < hist[0]["recon"]
  assert hist[-1]["main"] < hist[0]["main"]


def test_refine_retrains_the_cvae_and_regenerates(ctx):
  ctx.config.cvar.keep = 0.0  # CVAR's own rule: replace by the regenerated embedding
  method = cvar.CVAR()
  state = method.fit(ctx)
  items = ctx.split.emerging_items
  cold = method.cold(ctx, state, items)
  batch = tasks.pack_phase(ctx.ds, ctx.split.warm_rows["warm_a"])
  emb, new_state = method.refine(ctx, state, cold, batch, items, 0)
  # The emerging items' own ID rows start at zero and learn from their rows.
  ids = backbones.item_ids(ctx.tables, items)
  assert float(jnp.abs(state["params"]["own_id"][ids]).max()) == 0.0
  assert float(jnp.abs(new_state["params"]["own_id"][ids]).max()) > 0.0
  # keep = 0: the phase's output is the regenerated embedding, as CVAR does.
  again = cvar._generate(method._cvae(ctx), new_state["params"], ctx.tables,
                         jnp.asarray(items),
                         jax.random.split(jax.random.fold_in(state["key"], 1))[1],
                         float(ctx.config.cvar.noise))
  np.testing.assert_allclose(emb, again, rtol=1e-5, atol=1e-6)


def test_end_to_end_finite_auc(ctx):
  method = cvar.CVAR()
  state = method.fit(ctx)
  sp = ctx.split
  out, _ = train.evaluate_items(method, ctx, state, sp.emerging_items, sp.warm_rows,
                                sp.test_rows, sp.test_owner)
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in out["auc"].values())
