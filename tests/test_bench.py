"""The meta-learning speed benchmark: agreement check, and a tiny end-to-end run."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from emerflow_jax import bench
from experiments.configs import common


@pytest.fixture(scope="module")
def tiny():
  config = common.base_config("bench", n_max=200, k=20)
  world = bench.make_world(bench.TINY_SHAPES, config, 8)
  mcfg = dataclasses.replace(bench.bench_meta_config(config), inner_steps=1)
  return world, mcfg


def test_world_has_ml1m_like_fields_and_full_tasks(tiny):
  world, _ = tiny
  keys = [k for k, _ in world.model.vocab_sizes]
  assert keys == ["user/user_id", "user/gender", "user/age", "user/occupation",
                  "user/zip", "item/item_id", "item/year", "item/title", "item/genres"]
  assert world.tasks["support/users"].shape == (8, bench.TINY_SHAPES.support_rows)
  assert world.tasks["query/mask"].shape == (8, bench.TINY_SHAPES.query_rows)
  assert world.tasks["support/mask"].all()  # every item is old and long enough


def test_agreement_check_passes_then_catches_a_perturbed_implementation(tiny):
  world, mcfg = tiny
  # The other variant than the binary test's: sgd rule, mapper inside the step.
  world = dataclasses.replace(world, frozen={k: v for k, v in world.frozen.items()
                                             if k != "e0_table"})
  mcfg = dataclasses.replace(mcfg, rule="sgd", inner_steps=2, train_init=True)
  have_torch = bench.torch_version() is not None
  other = "torch_func_vmap" if have_torch else "jax_task_loop"
  impls = bench.make_impls(world, mcfg, ["jax_vmap_jit", other])
  batch = bench.task_batch(world, 4)
  assert bench.check_agreement(impls, batch, tol=1e-4)[other] < 1e-5
  if have_torch:
    w, _ = impls[other].mlp[0]
    w.mul_(1.001)  # a 0.1 % change of one backbone layer
  else:
    impls[other] = bench.JaxTaskLoop(world, dataclasses.replace(mcfg, beta=0.2))
  with pytest.raises(bench.AgreementError, match=other):
    bench.check_agreement(impls, batch, tol=1e-4)


def test_loop_impls_time_a_capped_subset(tiny):
  world, mcfg = tiny
  options = dataclasses.replace(bench.TINY, loop_cap=2, repeats=2)
  case = bench.time_impl(bench.JaxTaskLoop(world, mcfg), world, 8, options)
  assert case["measured_tasks"] == 2 and case["tasks"] == 8
  assert case["tasks_per_s"] > 0 and case["compile_s"] > 0
  assert len(case["times_s"]) == 2


def test_op_kinds_reads_fusions_from_hlo():
  f = jax.jit(lambda t, i: (t[i] * 2.0).sum())
  text = f.lower(np.ones((5, 3), np.float32), np.arange(4)).compile().as_text()
  kinds = bench.op_kinds(text)
  assert "gather" in kinds.values()


def test_bench_binary_tiny_end_to_end(tmp_path, repo_root):
  e2e = tmp_path / "results.json"
  e2e.write_text(json.dumps({"dataset": "movielens100k", "method": "emerflow",
                             "backbone": "deepfm", "seeds": [0],
                             "seconds": {"pretrain": 1.0, "method": 2.0, "total": 3.5}}))
  out = tmp_path / "bench"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_meta", f"--workdir={out}", "--tiny",
       "--inner_steps=1", "--tasks=4", "--devices=2", f"--e2e_results={e2e}"],
      cwd=repo_root, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "bench.json").read_text())
  assert isinstance(res["device"], str) and res["device"]
  have_torch = bench.torch_version() is not None
  want = set(bench.IMPLS) if have_torch else {"jax_vmap_jit", "jax_task_loop"}
  assert {c["impl"] for c in res["cases"]} == want
  # The run checked agreement of all implementations before timing them.
  assert set(res["agreement"]["1"]) == want - {"jax_vmap_jit"}
  assert max(res["agreement"]["1"].values()) < 1e-5
  for c in res["cases"]:
    assert c["tasks"] == 4 and c["inner_steps"] == 1
    assert c["tasks_per_s"] > 0 and "compile_s" in c and c["peak_rss_mb"] > 0
  assert res["scaling"][0]["devices"] == 2
  assert res["adapt"] and res["profile"]["step_s"] > 0
  assert res["e2e"]["seconds"]["total"] == 3.5
  md = (out / "bench.md").read_text()
  assert res["device"] in md and "jax_vmap_jit / torch_task_loop" in md
  if not have_torch:
    assert "torch is not installed" in md
  assert (out / "bench.png").stat().st_size > 0
