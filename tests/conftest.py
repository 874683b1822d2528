"""Shared pytest fixtures: a tiny synthetic world, real-data access, the binary.

Session-scoped fixtures are built once and shared by many tests: treat the
arrays they return as read-only (copy before changing anything).

Fixtures:
  data_dir: the real data directory ($EMERFLOW_DATA_DIR); skips when unset.
  real_data: ``real_data("movielens-100k", "u.data", ...)`` -> the folder, or
    a skip naming the missing files.
  make_dataset: builds a validated Dataset from raw row arrays.
  random_params: backbone parameters drawn with NumPy (nothing to compile).
  tiny_ds / tiny_split: a ~1,500-row synthetic world and its split (N=40, K=5).
  tiny_backbone: a DeepFM (d=4) pretrained 2 epochs on tiny_split's base rows.
  repo_root, experiment_argv: where and how to run ``python -m experiments.run``.
  background_run: the finished command of a ``@pytest.mark.background`` test.

Background commands: a test marked ``@pytest.mark.background(make_argv=...)``
checks a long command (a binary end to end) that needs nothing from the tests
before it.  ``make_argv(params, workdir)`` (the test's parametrisation, a
fresh folder) gives its command line, or None to run nothing (missing data:
the test skips itself).  In a plain pytest process the commands start once
collection is done and run one at a time in the background while the other
tests run; the marked tests run last, each checking its finished command, so
the suite uses a second core.  Under pytest-xdist (``-n``, as ``make test``
runs it) the workers already fill the cores: each marked test runs its
command when it comes up.  Either way the command runs exactly as it would
inside its test.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import jax
import numpy as np
import pytest

from emerflow_jax import methods, pretrain, protocol, sharding, tasks
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.data import paths, synthetic
from emerflow_jax.models import backbones
from experiments.configs import common

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_N, TINY_K = 40, 5

# Cache every compiled program, however small or quick to compile.
_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
FAST_COMPILE = "--xla_backend_optimization_level=0"
_own_cache_dir = None
BACKGROUND_TIMEOUT_S = 1800


def experiment_command(workdir, *flags: str) -> list[str]:
  """The command line of experiments/run.py (run it with ``cwd=REPO_ROOT``).

  Args:
    workdir: its --workdir.
    *flags: ``--config=...`` and any ``--config.<field>=...`` overrides.

  Returns:
    The argv list.
  """
  return [sys.executable, "-m", "experiments.run", *flags, f"--workdir={workdir}"]


class _Background:
  """Runs the marked tests' commands one at a time in a worker thread."""

  def __init__(self):
    self.root = pathlib.Path(tempfile.mkdtemp(prefix="emerflow-jax-bg-"))
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.jobs: dict[str, tuple[concurrent.futures.Future, pathlib.Path]] = {}
    self.procs: set[subprocess.Popen] = set()
    self.lock = threading.Lock()
    self.closed = False
    self.env = dict(os.environ)  # as configured; tests may patch os.environ later

  def submit(self, nodeid: str, argv: list[str], workdir: pathlib.Path):
    self.jobs[nodeid] = (self.pool.submit(self._run, argv), workdir)

  def _run(self, argv):
    with self.lock:
      if self.closed:
        return None
      proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
      self.procs.add(proc)
    try:
      out, err = proc.communicate(timeout=BACKGROUND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
    with self.lock:
      self.procs.discard(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)

  def close(self):
    with self.lock:
      self.closed = True
      for proc in self.procs:
        proc.kill()
    self.pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(self.root, ignore_errors=True)


_background: _Background | None = None


def pytest_configure(config):
  """Absolute data dir; one XLA compilation cache for the whole session.

  Binaries started by tests may run from another directory, so a relative
  data dir (``make test`` passes ../shared/data) is made absolute.

  Many tests compile the same program more than once (each pretraining run
  builds a fresh jit closure, each binary starts a fresh process).  A
  persistent compilation cache, shared through the environment with the
  binaries the tests start, compiles each program once; it changes no result.
  A cache directory already set in the environment is used as is.

  Tests also compile with LLVM's lowest optimisation level
  (``--xla_backend_optimization_level=0``, appended to ``XLA_FLAGS`` unless
  a level is set there), a fifth less time for a suite that is mostly
  compiling; it changes no result (a smoke run's AUCs are bit-identical).
  """
  global _own_cache_dir
  config.addinivalue_line(
      "markers", "background(make_argv=f): run make_argv(params, workdir) in the "
      "background from the start of the session; the test runs last (conftest.py)")
  value = os.environ.get(paths.ENV_VAR)
  if value:
    os.environ[paths.ENV_VAR] = str(pathlib.Path(value).expanduser().resolve())
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _own_cache_dir = tempfile.mkdtemp(prefix="emerflow-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache_dir
  for name, default in _CACHE_ENV.items():
    os.environ.setdefault(name, default)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()
  # jax read its environment at import time: configure this process as the
  # binaries configure themselves (from the environment just set).
  sharding.setup_compilation_cache()


def _background_argv(item, workdir: pathlib.Path) -> list[str] | None:
  """The command of a ``background`` test: its make_argv on its parameters."""
  make_argv = item.get_closest_marker("background").kwargs["make_argv"]
  callspec = getattr(item, "callspec", None)
  return make_argv(dict(callspec.params) if callspec else {}, workdir)


def pytest_collection_finish(session):
  """Starts the commands of the selected background tests; runs those tests last."""
  global _background
  if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
    return  # under xdist, background_run runs each command when its test comes up
  marked = [it for it in session.items if it.get_closest_marker("background")]
  if not marked:
    return
  _background = _Background()
  for n, item in enumerate(marked):
    workdir = _background.root / f"job{n}" / "run"
    workdir.parent.mkdir(parents=True)
    argv = _background_argv(item, workdir)
    if argv is not None:
      _background.submit(item.nodeid, argv, workdir)
  rest = [it for it in session.items if not it.get_closest_marker("background")]
  session.items[:] = rest + marked


def pytest_unconfigure(config):
  del config
  if _background is not None:
    _background.close()
  if _own_cache_dir:
    shutil.rmtree(_own_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The real data directory; skips the test when there is none."""
  value = os.environ.get(paths.ENV_VAR)
  if not value:
    pytest.skip(f"${paths.ENV_VAR} is not set: no real data to test against")
  folder = pathlib.Path(value)
  if not folder.is_dir():
    pytest.skip(f"${paths.ENV_VAR}={folder} is not a directory")
  return folder


@pytest.fixture(scope="session")
def real_data(data_dir):
  """Returns ``get(sub, *files)``: the sub-folder, or a skip naming what is missing."""

  def get(sub: str, *files: str) -> pathlib.Path:
    folder = data_dir / sub
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
      pytest.skip(f"{folder} lacks {', '.join(missing)}")
    return folder

  return get


@pytest.fixture(scope="session")
def make_dataset():
  """Returns ``build(items, times, users=None, labels=None, n_items=None)``.

  The Dataset has one categorical field per side (user_id / item_id); users
  default to ``row % 7`` and labels to ``row % 2``.
  """

  def build(items, times, users=None, labels=None, n_items=None):
    items = np.asarray(items, np.int32)
    n = len(items)
    users = (np.arange(n) % 7 if users is None else np.asarray(users)).astype(np.int32)
    labels = (np.arange(n) % 2 if labels is None else np.asarray(labels))
    n_items = int(items.max()) + 1 if n_items is None else n_items
    n_users = int(users.max()) + 1
    return dataset_lib.Dataset(
        name="handmade", item_type="item", users=users, items=items,
        labels=labels.astype(np.float32), times=np.asarray(times, np.float64),
        user_fields={"user_id": np.arange(1, n_users + 1, dtype=np.int32)},
        item_fields={"item_id": np.arange(1, n_items + 1, dtype=np.int32)},
        vocab_sizes={"user/user_id": n_users + 1, "item/item_id": n_items + 1},
        item_keys=np.asarray([str(i) for i in range(n_items)]),
        item_raw=[{"name": f"item {i}"} for i in range(n_items)]).validate()

  return build


@pytest.fixture(scope="session")
def random_params():
  """Returns ``init(model, tables, seed=0, scale=0.3)``: N(0, scale^2) params.

  Shapes come from ``jax.eval_shape`` of the real initialiser, so nothing is
  compiled; the larger-than-default scale makes outputs depend visibly on
  every input (useful for gradient and masking checks).
  """

  def init(model, tables, seed: int = 0, scale: float = 0.3):
    shapes = jax.eval_shape(
        lambda k: backbones.init_params(model, tables, k), jax.random.key(0))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [
        jax.numpy.asarray(scale * rng.normal(size=s.shape), s.dtype) for s in leaves])

  return init


@pytest.fixture(scope="session")
def tiny_ds() -> dataset_lib.Dataset:
  """60 users, 40 items, about 1,500 rows (seed 0)."""
  return synthetic.make_synthetic(n_users=60, n_items=40, mean_count=40, seed=0)


@pytest.fixture(scope="session")
def tiny_split(tiny_ds) -> protocol.Split:
  """tiny_ds split with N=40, K=5: 8 old and 14 emerging items."""
  return protocol.split_emerging_items(tiny_ds, n_max=TINY_N, k=TINY_K)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_ds, tiny_split, tmp_path_factory) -> types.SimpleNamespace:
  """A small DeepFM pretrained on the tiny world: .model, .tables, .params."""
  model = backbones.make_backbone("deepfm", tiny_ds, dim=4, mlp=(8,))
  tables = backbones.make_tables(tiny_ds)
  params = pretrain.pretrain_backbone(
      model, tables, tasks.pack_flat(tiny_ds, tiny_split.base_rows),
      jax.random.key(0), epochs=2, batch_size=64, lr=1e-2,
      ckpt_dir=tmp_path_factory.mktemp("tiny_backbone"), log=lambda _: None)
  return types.SimpleNamespace(model=model, tables=tables, params=params)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  """The repository root: the working directory for binaries started by tests."""
  return REPO_ROOT


@pytest.fixture(scope="session")
def experiment_argv():
  """Returns ``argv(workdir, *flags)``, the command line of experiments/run.py.

  Run it with ``cwd=repo_root`` (``-m`` imports from the working directory);
  ``flags`` holds ``--config=...`` and any ``--config.<field>=...`` overrides.
  """
  return experiment_command


@pytest.fixture
def background_run(request) -> types.SimpleNamespace:
  """The finished command of this ``background`` test: .proc (CompletedProcess,
  text stdout/stderr) and .workdir (the folder given to its make_argv)."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return _run_now(request)
  if _background is None:
    pytest.fail("background commands start after collection; none was started")
  job = _background.jobs.get(request.node.nodeid)
  if job is None:
    pytest.skip("make_argv gave no command (it found no real data to run on)")
  future, workdir = job
  proc = future.result()
  if proc is None:
    pytest.fail("the session closed before this background command ran")
  return types.SimpleNamespace(proc=proc, workdir=workdir)


def _run_now(request) -> types.SimpleNamespace:
  """``background_run`` inside an xdist worker: the command, run here and now."""
  workdir = request.getfixturevalue("tmp_path") / "run"
  argv = _background_argv(request.node, workdir)
  if argv is None:
    pytest.skip("make_argv gave no command (it found no real data to run on)")
  try:
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=BACKGROUND_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{' '.join(argv)} ran past {BACKGROUND_TIMEOUT_S} s:\n{e.stderr}")
  return types.SimpleNamespace(proc=proc, workdir=workdir)


@pytest.fixture
def tiny_context(tiny_ds, tiny_split, tiny_backbone, tmp_path):
  """make(**{"section.field": value}) -> a methods.Context on the tiny world.

  The shared setup of the baseline tests: the tiny split, its pretrained
  DeepFM, a synthetic base config with 3 warm-up steps (overrides applied on
  top), and a fresh method folder.
  """
  def make(**overrides):
    config = common.base_config("synthetic", n_max=TINY_N, k=TINY_K)
    config.warmup.steps = 3
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
    return methods.context_for(config, tiny_ds, tiny_split, tiny_backbone.model,
                               tiny_backbone.tables, tiny_backbone.params,
                               jax.random.key(1), tmp_path / "method")
  return make
