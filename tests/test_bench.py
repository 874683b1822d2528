"""The meta-step benchmark: agreement check, and a tiny end-to-end run."""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest

from emerflow_jax import bench
from experiments.configs import bench as bench_config


@pytest.fixture(scope="module")
def tiny():
  config = bench_config.get_config("tiny")
  options = bench.options_from_config(config)
  world = bench.make_world(options.shapes, config, 8)
  return world, bench.bench_meta_config(config), config


def test_the_benchmark_times_the_runs_default_step(tiny):
  world, mcfg, config = tiny
  # The run's own settings: flow tasks, per-phase step sizes, the pooled loss.
  assert mcfg.phase_alpha and mcfg.outer_loss == "auc" and mcfg.rule == "adam"
  assert mcfg.inner_steps == config.meta.inner_steps
  keys = [k for k, _ in world.model.vocab_sizes]
  assert keys == ["user/user_id", "user/gender", "user/age", "user/occupation",
                  "user/zip", "item/item_id", "item/year", "item/title", "item/genres"]
  assert world.tasks["support/users"].shape == (8, 3, config.data.k)
  assert world.tasks["query/mask"].shape == (8, config.meta.query_rows)
  assert world.tasks["support/mask"].all()  # every item is old and long enough
  assert world.meta_params["log_alpha"].shape == (3,)


@pytest.mark.parametrize("auc_pairs", [0, 8])
def test_agreement_check_passes_then_catches_a_perturbed_implementation(tiny, auc_pairs):
  world, mcfg, _ = tiny
  mcfg = dataclasses.replace(mcfg, auc_pairs=auc_pairs, train_init=True)
  have_torch = bench.torch_version() is not None
  others = ["jax_task_loop"] + (["torch_task_loop", "torch_func_vmap"] if have_torch else [])
  impls = bench.make_impls(world, mcfg, ["jax_vmap_jit"] + others)
  batch = bench.task_batch(world, 4)
  worst = bench.check_agreement(impls, batch, tol=1e-4)
  assert set(worst) == set(others) and max(worst.values()) < 1e-4
  if have_torch:
    w, _ = impls["torch_func_vmap"].mlp[0]
    w.mul_(1.001)  # a 0.1 % change of one backbone layer
    bad = "torch_func_vmap"
  else:
    impls["jax_task_loop"] = bench.JaxTaskLoop(world, dataclasses.replace(mcfg, beta=0.2))
    bad = "jax_task_loop"
  with pytest.raises(bench.AgreementError, match=bad):
    bench.check_agreement(impls, batch, tol=1e-4)


def test_sampled_pairs_differ_by_key_and_every_implementation_follows_them(tiny):
  world, mcfg, _ = tiny
  mcfg = dataclasses.replace(mcfg, auc_pairs=2)
  batch = bench.task_batch(world, 4)
  a = bench.auc_partners(mcfg, batch, bench.step_key(0))
  b = bench.auc_partners(mcfg, batch, bench.step_key(1))
  assert a.shape == (3, 4 * world.query_rows, 2) and not np.array_equal(a, b)
  impl = bench.JaxVmapJit(world, mcfg)
  l0, _ = impl.loss_and_grads(batch, bench.step_key(0))
  l1, _ = impl.loss_and_grads(batch, bench.step_key(1))
  assert l0 != l1


def test_loop_impls_time_a_capped_subset(tiny):
  world, mcfg, _ = tiny
  case = bench.time_impl(bench.JaxTaskLoop(world, mcfg), world, 8, repeats=2, loop_cap=2)
  assert case["measured_tasks"] == 2 and case["tasks"] == 8
  assert case["tasks_per_s"] > 0 and case["compile_s"] > 0
  assert len(case["times_s"]) == 2


def test_options_come_from_the_config_and_reject_unknown_fields():
  config = bench_config.get_config()
  options = bench.options_from_config(config)
  assert options.tasks == (16, 64, 256, 1024) and options.shapes.n_items == 3706
  with config.unlocked():
    config.bench.nope = 1
  with pytest.raises(ValueError, match="nope"):
    bench.options_from_config(config)


def test_op_kinds_reads_fusions_from_hlo():
  f = jax.jit(lambda t, i: (t[i] * 2.0).sum())
  text = f.lower(np.ones((5, 3), np.float32), np.arange(4)).compile().as_text()
  kinds = bench.op_kinds(text)
  assert "gather" in kinds.values()


def _bench_argv(params, workdir):
  """experiments.bench_meta --tiny, given a made-up end-to-end results.json."""
  del params
  workdir.mkdir(parents=True)
  e2e = workdir / "results.json"
  e2e.write_text(json.dumps({"dataset": "movielens100k", "method": "emerflow",
                             "backbone": "deepfm", "seeds": [0],
                             "seconds": {"pretrain": 1.0, "method": 2.0, "total": 3.5}}))
  return [sys.executable, "-m", "experiments.bench_meta", f"--workdir={workdir / 'bench'}",
          "--tiny", "--tasks=4", "--devices=2", "--adapt_items=4", f"--e2e_results={e2e}"]


@pytest.mark.background(make_argv=_bench_argv)  # runs while the other tests run (conftest.py)
def test_bench_binary_tiny_end_to_end(background_run):
  proc, out = background_run.proc, background_run.workdir / "bench"
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "bench.json").read_text())
  assert isinstance(res["device"], str) and res["device"]
  have_torch = bench.torch_version() is not None
  want = set(bench.IMPLS) if have_torch else {"jax_vmap_jit", "jax_task_loop"}
  assert {c["impl"] for c in res["cases"]} == want
  # The run checked agreement of all implementations before timing them.
  assert set(res["agreement"]["2"]) == want - {"jax_vmap_jit"}
  assert max(res["agreement"]["2"].values()) < 1e-4
  for c in res["cases"]:
    assert c["tasks"] == 4 and c["inner_steps"] == 2
    assert c["tasks_per_s"] > 0 and "compile_s" in c and c["peak_rss_mb"] > 0
  assert res["scaling"][0]["devices"] == 2
  assert res["adapt"] and res["profile"]["step_s"] > 0
  assert res["e2e"][0]["seconds"]["total"] == 3.5
  md = (out / "bench.md").read_text()
  assert res["device"] in md and "vmap / torch_task_loop" in md
  assert "task-inner-steps/s" in md and "default meta-step of a run" in md
  if not have_torch:
    assert "torch is not installed" in md
  assert (out / "bench.png").stat().st_size > 0
