"""One Optuna study shared by any number of workers: storage, samplers, the loop.

``work`` is the loop a sweep or tuning worker runs.  Several workers (threads,
processes, machines) may run it on one study; every trial is run by exactly
one worker, and none is lost:

* trial numbers are handed out atomically by the storage (PostgreSQL and
  MySQL lock the study row; for SQLite, whose driver does not, ``lock_for``
  serialises the few storage calls that must be atomic with a file lock next
  to the database file, so SQLite workers must share one file system);
* a grid point is decided by its lowest-numbered live trial: a worker that
  drew a point another live trial with a lower number holds (a grid point
  queued twice, a GridSampler race) marks its own trial PRUNED and moves on;
* a random/TPE study runs ``n_trials`` trials in all, whatever the number of
  workers (the lowest ``n_trials`` numbers run, later ones are PRUNED);
* a trial that raises is recorded as FAIL with its error text; the next
  ``work`` call on a grid retries failed points, never COMPLETE ones;
* a RUNNING trial whose heartbeat is older than ``grace_s``, or whose worker
  process on this host has exited (it was killed), is marked FAIL when a
  worker starts, so its point is retried;
* a worker returns only when no trial is RUNNING: one with nothing left to
  draw waits for the others, and takes over a point whose worker dies, so a
  study read after ``work`` is complete (every budget trial finished).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import optuna

State = optuna.trial.TrialState
_LIVE = (State.RUNNING, State.WAITING, State.COMPLETE)


class TrialError(Exception):
  """A trial that failed; ``attrs`` are stored on the FAIL trial with the text."""

  def __init__(self, message: str, attrs: Mapping[str, Any] | None = None):
    super().__init__(message)
    self.attrs = dict(attrs or {})


def sqlite_url(path: str | pathlib.Path) -> str:
  return f"sqlite:///{pathlib.Path(path).absolute()}"


def lock_for(url: str) -> Callable[[], contextlib.AbstractContextManager]:
  """A factory of the lock around storage calls that must be atomic.

  A file lock next to a SQLite database; nothing for a server database,
  whose row locks already make them atomic.
  """
  if not url.startswith("sqlite:///"):
    return contextlib.nullcontext
  path = pathlib.Path(url[len("sqlite:///"):] + ".lock")

  @contextlib.contextmanager
  def locked():
    with open(path, "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)
  return locked


class _GridSampler(optuna.samplers.GridSampler):
  """Optuna's GridSampler without its stop call.

  After each trial it calls ``study.stop()`` once the grid is used up, which
  only ``Study.optimize`` allows; ``work`` runs ask/tell and decides itself
  when a grid is done (``_open_points``), so the call is dropped.
  """

  def after_trial(self, study, trial, state, values):
    """Does nothing: ``work`` decides when a grid is done, not ``study.stop()``.

    Args:
      study: the study (unused).
      trial: the finished trial (unused).
      state: its state (unused).
      values: its objective values (unused).
    """
    del study, trial, state, values


def make_sampler(name: str, grid: Mapping[str, Sequence[Any]] | None = None,
                 seed: int = 0) -> optuna.samplers.BaseSampler:
  """"grid" (GridSampler over ``grid``), "random" or "tpe", seeded.

  Args:
    name: "grid", "random" or "tpe".
    grid: parameter name -> its values; required for "grid", ignored otherwise.
    seed: the sampler's seed.

  Returns:
    The sampler; the grid one never calls ``study.stop()``.

  Raises:
    ValueError: on an unknown name, or "grid" without ``grid``.
  """
  if name == "grid":
    if grid is None:
      raise ValueError("the grid sampler needs the grid's values")
    return _GridSampler({k: list(v) for k, v in grid.items()}, seed=seed)
  if name == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  if name == "tpe":
    return optuna.samplers.TPESampler(seed=seed)
  raise ValueError(f"unknown sampler {name!r}: want grid, random or tpe")


def open_study(url: str, name: str, sampler: optuna.samplers.BaseSampler
               ) -> optuna.Study:
  """Creates the study, or re-opens it (its trials are kept: resume).

  Args:
    url: an RDB URL: ``sqlite:///<file>``, ``postgresql://...``, ``mysql://...``.
    name: the study's name in that storage.
    sampler: how new trials are sampled (not stored; each worker brings one).

  Returns:
    The study, maximising its objective.
  """
  kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
  url = driver_url(url)
  with lock_for(url)():  # two SQLite workers creating the tables at once collide
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                               direction="maximize", load_if_exists=True)


def driver_url(url: str) -> str:
  """``postgresql://`` with the installed driver.

  SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; the pinned
  requirement is psycopg2, so the URL names it unless psycopg 3 is there.
  """
  if not url.startswith("postgresql://"):
    return url
  try:
    importlib.import_module("psycopg")
    return url
  except ImportError:
    return "postgresql+psycopg2://" + url[len("postgresql://"):]


def key(params: Mapping[str, Any]) -> str:
  return json.dumps(dict(params), sort_keys=True, default=str)


def _claim(t: optuna.trial.FrozenTrial) -> str | None:
  """The point a trial holds: its params, its queued point, or its claim."""
  if t.params:
    return key(t.params)
  return t.user_attrs.get("claim") or t.user_attrs.get("queued")


def fail_stale(st: optuna.Study, grace_s: float,
               log: Callable[[str], None] = logging.info) -> list[int]:
  """Marks FAIL every RUNNING trial without a heartbeat for ``grace_s`` seconds.

  A trial that never beat counts from its start time.

  Args:
    st: the study.
    grace_s: seconds without a heartbeat after which a worker counts as dead.
    log: called with one line per trial marked.

  Returns:
    The numbers of the trials marked FAIL.
  """
  now, out = time.time(), []
  for t in st.get_trials(deepcopy=False, states=(State.RUNNING,)):
    last = t.user_attrs.get("heartbeat") or t.datetime_start.timestamp()
    why = (f"had no heartbeat for {now - last:.0f} s" if now - last > grace_s
           else "its worker process on this host is gone" if _worker_gone(t) else "")
    if why:
      st.tell(t.number, state=State.FAIL, skip_if_finished=True)
      log(f"study: trial {t.number} {why}: FAIL")
      out.append(t.number)
  return out


def _worker_gone(t: optuna.trial.FrozenTrial) -> bool:
  """True when the trial's worker ran on this host and its process has exited.

  A killed run restarted on the same machine thus retries the killed trial at
  once instead of waiting out the heartbeat's grace period.
  """
  host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
  if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def requeue_failed(st: optuna.Study, grid: Sequence[Mapping[str, Any]]) -> int:
  """Queues again every grid point whose trials all failed; returns how many.

  Args:
    st: the study.
    grid: the grid's points, parameter name -> value each.

  Returns:
    The number of points queued (a point with a live trial is not).
  """
  trials = st.get_trials(deepcopy=False)
  live = {_claim(t) for t in trials if t.state in _LIVE}
  failed = {_claim(t) for t in trials if t.state == State.FAIL}
  n = 0
  for params in grid:
    k = key(params)
    if k in failed and k not in live:
      st.enqueue_trial(dict(params), user_attrs={"queued": k})
      n += 1
  return n


def _open_points(st: optuna.Study, grid: Sequence[Mapping[str, Any]]) -> list[str]:
  """Grid points still to run: not COMPLETE/RUNNING, never tried or queued."""
  trials = st.get_trials(deepcopy=False)
  busy = {_claim(t) for t in trials if t.state in (State.COMPLETE, State.RUNNING)}
  tried = {_claim(t) for t in trials}
  queued = {_claim(t) for t in trials if t.state == State.WAITING}
  return [k for k in map(key, grid) if k not in busy and (k not in tried or k in queued)]


def _yields(st: optuna.Study, number: int, claim: str | None, grid: bool,
            n_trials: int | None, wait_s: float) -> str | None:
  """Why trial ``number`` must not run (another holds its point, or the budget).

  Waits until every lower-numbered RUNNING trial has published what it holds
  (it does so right after it is drawn), so the lowest-numbered live holder of
  a point is known to all; one that stays silent ``wait_s`` (its worker died
  in between) is ignored.
  """
  deadline = time.time() + wait_s
  while True:
    lower = [t for t in st.get_trials(deepcopy=False) if t.number < number]
    silent = [t for t in lower if t.state == State.RUNNING and _claim(t) is None]
    if not silent or time.time() > deadline:
      break
    time.sleep(0.2)
  if grid:
    done = [t.number for t in st.get_trials(deepcopy=False, states=(State.COMPLETE,))
            if _claim(t) == claim and t.number != number]
    holders = [t.number for t in lower if t.state in _LIVE and _claim(t) == claim]
    if done or holders:
      return f"duplicate of trial {(done or holders)[0]}"
    return None
  used = sum(t.state in _LIVE for t in lower)
  return f"budget of {n_trials} trials reached" if used >= n_trials else None


def work(st: optuna.Study, suggest: Callable[[optuna.Trial], dict],
         execute: Callable[[int, dict, Callable[[], None]], dict],
         grid: Sequence[Mapping[str, Any]] | None = None, n_trials: int | None = None,
         lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
         grace_s: float = 900.0, heartbeat_s: float = 30.0, wait_s: float = 60.0,
         poll_s: float = 5.0, log: Callable[[str], None] = logging.info) -> list[int]:
  """Runs trials until the grid is covered or the study's budget is used.

  Args:
    st: the study (``open_study``).
    suggest: ``suggest(trial) -> params`` (calls ``trial.suggest_*``).
    execute: ``execute(number, params, beat) -> {"value": float, **attrs}``;
      raises ``TrialError`` (or anything) for a failed trial; calls ``beat()``
      now and then while it runs.
    grid: every point of a grid study (params dicts); None for a budget study.
    n_trials: the budget of a random/TPE study (trials in all, all workers).
    lock: ``lock_for(url)``.
    grace_s: a RUNNING trial silent this long belongs to a dead worker.
    heartbeat_s: the least seconds between two heartbeats of a trial.
    wait_s: how long to wait for a lower-numbered trial to say what it holds.
    poll_s: how often a worker with nothing left to draw checks the trials
      still running elsewhere (it returns once none runs).
    log: progress messages.

  Returns:
    The numbers of the trials this worker ran (COMPLETE or FAIL).
  """
  if (grid is None) == (n_trials is None):
    raise ValueError("give exactly one of grid and n_trials")
  def reap() -> None:
    """Fails dead workers' trials; on a grid, queues their points again."""
    with lock():
      fail_stale(st, grace_s, log)
      if grid is not None:
        requeue_failed(st, grid)

  reap()
  ran: list[int] = []
  failures = 0
  while True:
    if grid is None and failures >= n_trials:
      break
    trials = st.get_trials(deepcopy=False)
    queued = any(t.state == State.WAITING for t in trials)  # ask() pops it first
    if not queued and (not _open_points(st, grid) if grid is not None
                       else sum(t.state in _LIVE for t in trials) >= n_trials):
      # Nothing left to draw, but a trial still RUNNING elsewhere may yet
      # fail (its worker dies) and free its point: the study is decided only
      # when none runs, so a caller reading the best trial sees every one.
      if not any(t.state == State.RUNNING for t in trials):
        break
      time.sleep(min(heartbeat_s, poll_s))
      reap()
      continue
    with lock():
      trial = st.ask()
    params = suggest(trial)
    claim = key(params)
    trial.set_user_attr("claim", claim)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("heartbeat", time.time())
    why = _yields(st, trial.number, claim, grid is not None, n_trials, wait_s)
    if why:
      trial.set_user_attr("skipped", why)
      st.tell(trial, state=State.PRUNED)
      log(f"study: trial {trial.number} not run: {why}")
      continue
    last = [time.time()]

    def beat():
      if time.time() - last[0] >= heartbeat_s:
        trial.set_user_attr("heartbeat", time.time())
        last[0] = time.time()

    # The heartbeat also runs on its own thread, so a trial run in-process
    # (tuning) that never calls beat() is not taken for a dead worker's.
    stop = threading.Event()

    def pulse():
      while not stop.wait(heartbeat_s):
        beat()

    pulser = threading.Thread(target=pulse, daemon=True)
    pulser.start()
    error = None
    try:
      out = dict(execute(trial.number, params, beat))
    except Exception as e:  # pylint: disable=broad-except
      error = e
    finally:
      stop.set()
      pulser.join()
    if error is not None:
      # A failed trial is data (FAIL + its error), not the end of the study.
      for k, v in getattr(error, "attrs", {}).items():
        trial.set_user_attr(k, v)
      trial.set_user_attr("error", f"{type(error).__name__}: {error}"[-2000:])
      st.tell(trial, state=State.FAIL)
      failures += 1
      log(f"study: trial {trial.number} {params} FAILED: {str(error)[-300:]}")
    else:
      value = out.pop("value")
      for k, v in out.items():
        trial.set_user_attr(k, v)
      st.tell(trial, value)
      log(f"study: trial {trial.number} {params} -> {value:.4f}")
    ran.append(trial.number)
  return ran
