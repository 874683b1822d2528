"""Two processes x 2 CPU devices on localhost == one process x 4 devices.

Meta-training (``emerflow_meta.run_meta_training``: the default flow tasks and
pooled pairwise loss, a collective Orbax checkpoint) and the warm-up
(``emerflow_meta.refine_items``, ``warmup.finetune``) run over 4 global devices
that two processes share, joined by ``sharding.maybe_initialize_distributed``
from the environment the binaries read.  Each process (``_checks``) saves its
results; they must equal each other and a single 4-device process to 1e-5.

Everything is bounded: the coordinator listens on loopback only, joining
times out, and every child is killed at its deadline.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from emerflow_jax import rule, sharding

# The session's XLA_FLAGS (conftest.py sets a fast-compile level), kept in children.
_SESSION_FLAGS = os.environ.get("XLA_FLAGS", "")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 150  # a hung collective fails the test; a normal run takes ~30 s
PHASE = 1  # warm_b's step size (phase_alpha learns one per phase)


def _checks(workdir: str, out_file: str) -> None:
  """Runs in every child: meta-training and the warm-up over all devices."""
  # pylint: disable=g-import-not-at-top
  joined = sharding.maybe_initialize_distributed(timeout_s=300)
  import jax
  import jax.numpy as jnp
  from emerflow_jax import emerflow_meta, meta, methods, protocol, tasks, warmup
  from emerflow_jax.models import scoring
  from experiments.configs import synthetic as synthetic_config
  from tests import test_sharding

  assert jax.device_count() == 4, jax.devices()
  ds, split, model, frozen, mapper, meta_params = test_sharding._world()
  mesh = sharding.task_mesh()
  config = synthetic_config.get_config("smoke")
  config.meta.epochs = 2
  config.meta.batch_tasks = 6
  config.meta.inner_steps = 2
  config.meta.ckpt_every_s = 0.0  # a checkpoint every epoch: the processes write it together
  assert config.meta.tasks == "flow" and config.meta.outer_loss == "auc"
  init = dict(meta_params, log_alpha=rule.init_alpha(
      0.5, "per_dim", 4, len(protocol.WARM_PHASES)))
  # The same folder for every process: Orbax writes the checkpoint together.
  ctx = methods.context_for(config, ds, split, model, frozen["tables"],
                            frozen["params"], jax.random.key(1),
                            pathlib.Path(workdir) / "run")
  trained = emerflow_meta.run_meta_training(ctx, mapper, init, frozen,
                                       ctx.workdir / "meta", mesh=mesh)

  # Warm-up of 7 items (not a multiple of 4) with the learned rule...
  items = split.emerging_items[:7]
  phase = tasks.pack_phase(ds, split.warm_rows["warm_b"][:7])
  emb0 = meta.cold_embedding(trained, mapper, frozen, jnp.asarray(items))
  refined = emerflow_meta.refine_items(trained, model, emerflow_meta.meta_config(config),
                                  frozen, emb0, phase, mesh, phase=PHASE)
  # ...and by the shared fine-tuning, on global arrays built here.
  emb_s, rows_s = sharding.shard_tasks(
      (emb0, {k: phase[k] for k in scoring.ROW_KEYS}), mesh)
  params_r, tables_r = sharding.replicate((frozen["params"], frozen["tables"]), mesh)
  tuned = warmup.finetune(model, params_r, tables_r, emb_s, rows_s, steps=3, lr=1e-2)
  out = {f"trained/{i}": np.asarray(x)
         for i, x in enumerate(jax.tree.leaves(jax.device_get(trained)))}
  out.update(
      init=np.concatenate([np.ravel(x) for x in jax.tree.leaves(init)]),
      emb0=np.asarray(emb0), refined=np.asarray(refined),
      tuned=sharding.gather(tuned)[:7], joined=np.asarray(joined),
      processes=np.asarray(jax.process_count()),
      batch_processes=np.asarray(len({d.process_index for d in emb_s.sharding.device_set})),
      meta_checkpoint=np.asarray(len(list((ctx.workdir / "meta").glob("[0-9]*")))))
  np.savez(out_file, **out)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(tmp: pathlib.Path, name: str, env: dict,
           workdir: pathlib.Path) -> subprocess.Popen:
  code = ("import sys; from tests import test_distributed as t; "
          "t._checks(sys.argv[1], sys.argv[2])")
  with open(tmp / f"{name}.log", "wb") as log:  # the child keeps its own copy
    return subprocess.Popen([sys.executable, "-c", code, str(workdir),
                             str(tmp / f"{name}.npz")],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs: dict, workdir: pathlib.Path) -> None:
  deadline = time.monotonic() + DEADLINE_S
  try:
    for name, proc in procs.items():
      try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {DEADLINE_S} s:\n" +
                    (workdir / f"{name}.log").read_text(errors="replace")[-3000:])
      assert rc == 0, f"{name} failed:\n" + (
          workdir / f"{name}.log").read_text(errors="replace")[-3000:]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  base = {k: v for k, v in os.environ.items()
          if k not in (sharding.ENV_ADDRESS, sharding.ENV_PROCESSES,
                       sharding.ENV_PROCESS_ID)}
  base["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  shared = tmp_path / "shared"  # both processes' workdir (as on a shared disk)
  shared.mkdir()
  single = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {_SESSION_FLAGS}")
  procs = {"single": _start(tmp_path, "single", single, tmp_path / "single")}
  for i in range(2):
    env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {_SESSION_FLAGS}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    # Both work in one folder: the meta checkpoint is written collectively.
    procs[f"proc{i}"] = _start(tmp_path, f"proc{i}", env, shared)
  _wait_all(procs, tmp_path)
  res = {name: dict(np.load(tmp_path / f"{name}.npz")) for name in procs}

  single, p0, p1 = res["single"], res["proc0"], res["proc1"]
  assert not single["joined"] and int(single["processes"]) == 1
  for p in (p0, p1):
    assert p["joined"] and int(p["processes"]) == 2
    assert int(p["batch_processes"]) == 2  # the items really are split over hosts
    assert int(p["meta_checkpoint"]) >= 1
  # Training moved the rule, the rule moved the embeddings (the checks can fail).
  trained = sorted(k for k in single if k.startswith("trained/"))
  moved = np.concatenate([single[k].ravel() for k in trained])
  assert _max_diff(moved, single["init"]) > 1e-4
  assert _max_diff(single["refined"], single["emb0"]) > 1e-3
  assert _max_diff(single["tuned"], single["emb0"]) > 1e-3
  for p in (p0, p1):
    for k in trained + ["emb0", "refined", "tuned"]:
      assert _max_diff(p[k], single[k]) < 1e-5, k
