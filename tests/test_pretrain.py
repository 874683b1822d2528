"""Tests for resumable backbone pretraining, in process and with a real kill."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emerflow_jax import pretrain, sharding, tasks
from emerflow_jax.data import synthetic
from emerflow_jax.models import backbones

# The session's XLA_FLAGS (conftest.py sets a fast-compile level), kept in children.
_SESSION_FLAGS = os.environ.get("XLA_FLAGS", "")

# Same model and optimiser as the tiny_backbone fixture: the compiled epoch is
# shared through the session's compilation cache.
DIM, MLP, BATCH, LR = 4, (8,), 64, 1e-2


def _pretrain(ds, split, ckpt_dir, epochs, log=None):
  model = backbones.make_backbone("deepfm", ds, dim=DIM, mlp=MLP)
  tables = backbones.make_tables(ds)
  return pretrain.pretrain_backbone(
      model, tables, tasks.pack_flat(ds, split.base_rows), jax.random.key(0),
      epochs=epochs, batch_size=BATCH, lr=LR, ckpt_dir=ckpt_dir,
      log=(log or (lambda _: None)))


def _assert_bit_exact(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tiny_ds, tiny_split,
                                                         tmp_path):
  lines = []
  _pretrain(tiny_ds, tiny_split, tmp_path / "a", epochs=2)
  resumed = _pretrain(tiny_ds, tiny_split, tmp_path / "a", epochs=4, log=lines.append)
  straight = _pretrain(tiny_ds, tiny_split, tmp_path / "b", epochs=4)
  assert any("resumed from epoch 2" in s for s in lines)
  assert sum("pretrain: epoch" in s for s in lines) == 2  # epochs 3 and 4 only
  _assert_bit_exact(resumed, straight)
  # ...and it is not simply the 2-epoch state (the check can fail).
  two = _pretrain(tiny_ds, tiny_split, tmp_path / "a2", epochs=2)
  assert not np.array_equal(backbones.item_embedding_table(two),
                            backbones.item_embedding_table(straight))


def test_checkpoints_follow_the_time_budget_and_always_end_with_the_last_epoch(
    tiny_ds, tiny_split, tmp_path, monkeypatch):
  model = backbones.make_backbone("deepfm", tiny_ds, dim=DIM, mlp=MLP)
  tables = backbones.make_tables(tiny_ds)
  rows = tasks.pack_flat(tiny_ds, tiny_split.base_rows)
  saved = []
  real = pretrain.checkpoint.Checkpointer.save

  def spy(self, step, state, force=True):
    saved.append(int(step))
    return real(self, step, state, force)

  monkeypatch.setattr(pretrain.checkpoint.Checkpointer, "save", spy)
  clock = iter(range(0, 1000, 10))  # every epoch "takes" 10 s
  monkeypatch.setattr(pretrain, "_clock", lambda: next(clock))
  budget = pretrain.pretrain_backbone(model, tables, rows, jax.random.key(0), epochs=6,
                                      batch_size=BATCH, lr=LR, ckpt_dir=tmp_path / "a",
                                      log=lambda _: None, ckpt_every_s=25.0)
  assert saved == [3, 6]  # 30 s after the start, then the last epoch
  saved.clear()
  every = pretrain.pretrain_backbone(model, tables, rows, jax.random.key(0), epochs=6,
                                     batch_size=BATCH, lr=LR, ckpt_dir=tmp_path / "b",
                                     log=lambda _: None, ckpt_every_s=0.0)
  assert saved == [1, 2, 3, 4, 5, 6]
  _assert_bit_exact(budget, every)  # the cadence changes nothing computed


def test_finished_run_is_not_retrained(tiny_ds, tiny_split, tmp_path):
  first = _pretrain(tiny_ds, tiny_split, tmp_path / "c", epochs=2)
  lines = []
  again = _pretrain(tiny_ds, tiny_split, tmp_path / "c", epochs=2, log=lines.append)
  assert not any("pretrain: epoch" in s for s in lines)
  _assert_bit_exact(again, first)


def test_padded_rows_change_nothing_and_one_program_serves_a_bucket(tiny_ds, tiny_split,
                                                                   tmp_path):
  model = backbones.make_backbone("deepfm", tiny_ds, dim=DIM, mlp=MLP)
  tables = backbones.make_tables(tiny_ds)
  rows = tasks.pack_flat(tiny_ds, tiny_split.base_rows)
  n = len(rows["users"])
  assert pretrain.padded_rows(n, BATCH) >= n and pretrain.padded_rows(n, BATCH) % BATCH == 0
  assert pretrain.padded_rows(1000, 64) == 1024 and pretrain.padded_rows(1024, 64) == 1024
  tx = pretrain.make_optimizer(LR)
  fn = pretrain.make_epoch_fn(model, tx, tables, BATCH)
  init = lambda: pretrain.init_state(backbones.init_params(model, tables, jax.random.key(0)),
                                     tx, jax.random.key(1))
  plain, plain_losses = fn(init(), rows["users"], rows["items"], rows["labels"], 0)
  pad = lambda x: np.pad(x, (0, 3 * BATCH + 5), constant_values=7)  # junk past n
  padded, padded_losses = fn(init(), pad(rows["users"]), pad(rows["items"]),
                             pad(rows["labels"]), 0, n)
  assert padded_losses.shape == plain_losses.shape == (n // BATCH,)
  _assert_bit_exact(padded, plain)  # the empty batch slots and junk rows did nothing
  # Two backbones on different row counts in one bucket: one compiled epoch.
  program = pretrain._cached_epoch_program(model, LR, 0.0, BATCH, 0.0, sharding.task_mesh())
  for name, m in (("a", n), ("b", n - BATCH - 3)):
    assert pretrain.padded_rows(m, BATCH) == pretrain.padded_rows(n, BATCH)
    pretrain.pretrain_backbone(model, tables, {k: v[:m] for k, v in rows.items()},
                               jax.random.key(0), epochs=1, batch_size=BATCH, lr=LR,
                               ckpt_dir=tmp_path / name, log=lambda _: None)
  assert program._cache_size() == 1


def test_pretraining_lowers_the_training_loss(tiny_ds, tiny_split, tiny_backbone,
                                             random_params):
  bb = tiny_backbone
  rows = tasks.pack_flat(tiny_ds, tiny_split.base_rows)

  @jax.jit
  def loss(params):
    logits = backbones.score(bb.model, params, bb.tables, jnp.asarray(rows["users"]),
                             jnp.asarray(rows["items"]))
    return backbones.bce_loss(logits, jnp.asarray(rows["labels"]))

  untrained = random_params(bb.model, bb.tables, scale=0.01)
  assert float(loss(bb.params)) < float(loss(untrained)) - 0.01


# --- data parallel over 4 devices ---------------------------------------------


def _four_device_checks(workdir: str) -> dict:
  """Runs in a 4-device subprocess: 1-device vs 4-device pretraining."""
  assert jax.device_count() == 4, jax.devices()
  ds = synthetic.make_synthetic(n_users=60, n_items=40, mean_count=40, seed=0)
  rows = {k: v[:1500] for k, v in tasks.pack_flat(ds, np.arange(ds.n_rows)).items()}
  model = backbones.make_backbone("deepfm", ds, dim=DIM, mlp=MLP)
  tables = backbones.make_tables(ds)
  out, params = {}, {}
  for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
    mesh = sharding.task_mesh(devices)
    params[name] = pretrain.pretrain_backbone(
        model, tables, rows, jax.random.key(0), epochs=2, batch_size=BATCH, lr=LR,
        ckpt_dir=pathlib.Path(workdir) / name, item_dropout=0.1, mesh=mesh,
        log=lambda _: None)
    leaf = jax.tree.leaves(params[name])[0]
    out[f"devices_{name}"] = len(leaf.sharding.device_set)
    out[f"replicated_{name}"] = bool(leaf.sharding.is_fully_replicated)
  # The minibatch is split: the step all-reduces its gradient across devices.
  mesh = sharding.task_mesh()
  fn = pretrain.make_epoch_fn(model, pretrain.make_optimizer(LR), tables, BATCH,
                              mesh=mesh)
  state = sharding.replicate(pretrain.init_state(
      backbones.init_params(model, tables, jax.random.key(0)),
      pretrain.make_optimizer(LR), jax.random.key(1)), mesh)
  args = sharding.replicate((rows["users"], rows["items"], rows["labels"]), mesh)
  n = len(rows["users"])
  batches = fn.batches(state, n, n, 0)
  hlo = fn.program.lower(state, fn.tables, *args, batches, n // BATCH, 0).compile().as_text()
  out["all_reduce"] = "all-reduce" in hlo
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params["four"]), jax.tree.leaves(params["one"]))]
  out["param_diff"] = max(diffs)
  out["scale"] = max(float(np.max(np.abs(np.asarray(a))))
                     for a in jax.tree.leaves(params["one"]))
  return out


def test_four_devices_give_the_parameters_of_one(tmp_path, repo_root):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {_SESSION_FLAGS}",
             JAX_PLATFORMS="cpu")
  code = ("import json, sys; from tests import test_pretrain as t; "
          "print('RESULT', json.dumps(t._four_device_checks(sys.argv[1])))")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=repo_root,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["devices_one"] == 1 and out["devices_four"] == 4, out
  assert out["replicated_four"], out
  assert out["all_reduce"], out
  # Float tolerance: only the order of the batch sums differs.
  assert out["param_diff"] < 1e-5 * max(1.0, out["scale"]), out


# --- a real kill ---------------------------------------------------------------

# Many short epochs, so that the kill lands between two checkpoints.
EPOCHS = 12
FLAGS = ("--config=experiments/configs/synthetic.py:smoke", "--config.method=base",
         f"--config.optim.epochs={EPOCHS}", "--config.optim.ckpt_every_s=0")


def _start(argv, workdir: pathlib.Path, cwd) -> subprocess.Popen:
  workdir.mkdir(parents=True)
  # The child holds its own copy of the file descriptor.
  with open(workdir.parent / f"{workdir.name}.log", "wb") as log:
    return subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir: pathlib.Path) -> str:
  return (workdir.parent / f"{workdir.name}.log").read_text(errors="replace")


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Finished pretraining checkpoints (Orbax renames a step dir when complete)."""
  return sorted(int(p.name) for p in workdir.glob("backbones/*/*") if p.name.isdigit())


def _straight_argv(params, workdir):
  """The uninterrupted run's command line (run in the background, conftest.py)."""
  del params
  # Imported here: the 4-device subprocess imports this module without tests/
  # on its path.
  import conftest  # pylint: disable=g-import-not-at-top
  return conftest.experiment_command(workdir, *FLAGS)


@pytest.mark.background(make_argv=_straight_argv)
def test_killed_run_resumes_and_matches_an_uninterrupted_run(
    background_run, tmp_path, experiment_argv, repo_root):
  # The uninterrupted run went first, in the background (conftest.py): it also
  # filled the session's compilation cache, so the run that gets killed only
  # reads the cache, never writes it.
  straight, straight_dir = background_run.proc, background_run.workdir
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed_dir = tmp_path / "killed"
  victim = _start(experiment_argv(killed_dir, *FLAGS), killed_dir, repo_root)
  try:
    while not _checkpoint_steps(killed_dir):
      assert victim.poll() is None, "run ended before its first checkpoint:\n" + (
          _log(killed_dir)[-3000:])
      time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
  finally:
    if victim.poll() is None:
      victim.kill()
  steps = _checkpoint_steps(killed_dir)
  assert steps and max(steps) < EPOCHS, f"kill came too late: steps {steps}"
  assert not (killed_dir / "results.json").exists()

  rerun = subprocess.run(experiment_argv(killed_dir, *FLAGS), cwd=repo_root,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from epoch {max(steps)}" in rerun.stderr
  got = json.loads((killed_dir / "results.json").read_text())
  want = json.loads((straight_dir / "results.json").read_text())
  for key in ("auc", "f1", "val_auc"):
    assert got[key] == want[key], key
  assert max(_checkpoint_steps(killed_dir)) == EPOCHS
