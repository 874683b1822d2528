"""Sweeps on Optuna: grids, resume, failed trials, several workers on one study."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import optuna
import pytest

from emerflow_jax import study, sweep

SMOKE = "experiments/configs/synthetic.py:smoke"
PHASES = ["cold", "warm_a", "warm_b", "warm_c"]
State = optuna.trial.TrialState


def test_parse_grid_and_product():
  axes = sweep.parse_grid("meta.inner_steps=1,3,5; meta.alpha=0.05,0.1")
  assert axes == {"meta.inner_steps": ["1", "3", "5"], "meta.alpha": ["0.05", "0.1"]}
  points = sweep.grid_points(axes)
  assert len(points) == 6 and points[0] == {"meta.inner_steps": "1", "meta.alpha": "0.05"}
  assert len({sweep.trial_name(p) for p in points}) == 6
  for bad in ("meta.alpha", "meta.alpha=", "a=1;a=2"):
    with pytest.raises(ValueError):
      sweep.parse_grid(bad)


def test_trial_names_are_safe_and_bounded():
  name = sweep.trial_name({"align.hidden": (64, 32), "method": "emerflow"})
  assert "/" not in name and " " not in name and "(" not in name
  long = sweep.trial_name({f"k{i}.field": "x" * 20 for i in range(10)})
  assert len(long) <= 111


def test_trial_argv_is_the_run_binary_contract(tmp_path):
  argv = sweep.trial_argv(SMOKE, {"meta.alpha": 0.05}, tmp_path, base={"seeds": 1})
  assert argv[1:4] == ["-m", "experiments.run", f"--config={SMOKE}"]
  assert "--config.seeds=1" in argv and "--config.meta.alpha=0.05" in argv
  assert argv[-1] == f"--workdir={tmp_path}"


def _fake_results(val, test):
  return {"dataset": "synthetic", "method": "emerflow", "backbone": "deepfm",
          "phases": PHASES, "auc": {p: [test, test] for p in PHASES},
          "val_auc": {p: [val, val - 0.01] for p in PHASES},
          "seconds": {"total": 1.0}}


def _argv_point(argv):
  return {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[1]
          for a in argv if a.startswith("--config.")}


def cheap_runner(calls, scores, sleep=0.0):
  """A stand-in for the run binary: writes results.json from the point's value.

  A value "bad" fails the way a crashed run does.  Every call is logged to
  ``calls`` (a list, or a file path shared by worker processes).
  """
  def run(argv, workdir, cwd, timeout, beat):
    del cwd, timeout
    point = _argv_point(argv)
    beat()
    line = f"{workdir.name} {os.getpid()}\n"
    if isinstance(calls, list):
      calls.append(workdir.name)
    else:
      with open(calls, "a") as f:
        f.write(line)
    time.sleep(sleep)
    if "bad" in point.values():
      raise study.TrialError("Traceback ...\nValueError: bad value for the run")
    workdir.mkdir(parents=True, exist_ok=True)
    res = _fake_results(*scores(point))
    (workdir / "results.json").write_text(json.dumps(res))
    return res
  return run


def test_ranks_by_validation_never_by_test(tmp_path):
  # Validation and test rankings disagree: b is best on validation, c on test.
  scores = {"a": (0.60, 0.70), "b": (0.70, 0.60), "c": (0.65, 0.80)}
  calls = []
  summary = sweep.run_sweep(SMOKE, None, tmp_path, axes={"meta.alpha": ["a", "b", "c"]},
                            runner=cheap_runner(calls, lambda p: scores[p["meta.alpha"]]),
                            log=lambda _: None)
  assert sorted(calls) == ["meta.alpha=a", "meta.alpha=b", "meta.alpha=c"]
  assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 0, "running": 0}
  order = [t["overrides"]["meta.alpha"] for t in summary["trials"]]
  assert order == ["b", "c", "a"]
  assert summary["best"]["overrides"] == {"meta.alpha": "b"}
  assert summary["best"]["val_score"] == pytest.approx(0.695)
  assert summary["best"]["test_score"] == pytest.approx(0.60)
  md = (tmp_path / "sweep.md").read_text()
  assert md.index("meta.alpha=b") < md.index("meta.alpha=c") < md.index("meta.alpha=a")
  loaded = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path}/study.db")
  assert loaded.best_params == {"meta.alpha": "b"}


def test_failing_trial_is_recorded_and_resume_reruns_only_it(tmp_path):
  calls = []
  runner = cheap_runner(calls, lambda p: (0.6, 0.6))
  axes = {"warmup.steps": ["1", "bad", "3"]}
  summary = sweep.run_sweep(SMOKE, None, tmp_path, axes=axes, runner=runner,
                            log=lambda _: None)
  assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1, "running": 0}
  failed = [t for t in summary["trials"] if t["status"] == "failed"][0]
  assert failed["state"] == "FAIL" and "bad value for the run" in failed["error"]
  assert "ValueError: bad value for the run" in (tmp_path / "sweep.md").read_text()
  # Re-open: COMPLETE trials are not rerun, the FAIL point is retried once.
  calls.clear()
  again = sweep.run_sweep(SMOKE, None, tmp_path, axes=axes, runner=runner,
                          log=lambda _: None)
  assert calls == ["warmup.steps=bad"]
  assert again["counts"] == {"done": 0, "skipped": 2, "failed": 1, "running": 0}
  # A third time with the failure fixed (results.json now there): read back.
  (tmp_path / "warmup.steps=bad").mkdir(exist_ok=True)
  (tmp_path / "warmup.steps=bad" / "results.json").write_text(
      json.dumps(_fake_results(0.9, 0.5)))
  calls.clear()
  third = sweep.run_sweep(SMOKE, None, tmp_path, axes=axes, runner=runner,
                          log=lambda _: None)
  assert calls == [] and third["best"]["name"] == "warmup.steps=bad"
  assert [t["state"] for t in third["trials"]] == ["COMPLETE"] * 3


def test_killed_worker_trial_is_failed_and_retried(tmp_path):
  url = study.sqlite_url(tmp_path / "study.db")
  st = study.open_study(url, "s", study.make_sampler("grid", {"x": ["1", "2"]}))
  stale = st.ask()  # a worker drew it, then died: RUNNING forever
  stale.suggest_categorical("x", ["1", "2"])
  stale.set_user_attr("heartbeat", time.time() - 3600)
  ran = study.work(st, lambda t: {"x": t.suggest_categorical("x", ["1", "2"])},
                   lambda n, p, beat: {"value": float(p["x"])},
                   grid=[{"x": "1"}, {"x": "2"}], grace_s=60, log=lambda _: None)
  states = {t.number: t.state for t in st.get_trials()}
  assert states[stale.number] == State.FAIL
  done = sorted(t.params["x"] for t in st.get_trials(states=(State.COMPLETE,)))
  assert done == ["1", "2"] and len(ran) == 2


def _stale_budget_study(tmp_path, worker):
  """A random study (budget 2) with one RUNNING trial drawn by ``worker``."""
  st = study.open_study(study.sqlite_url(tmp_path / "study.db"), "s",
                        study.make_sampler("random", seed=0))
  stale = st.ask()
  stale.suggest_float("x", 0.0, 1.0)
  stale.set_user_attr("worker", worker)
  stale.set_user_attr("heartbeat", time.time())  # fresh: not stale by the clock
  return st, stale


def _budget_work(st, **kwargs):
  return study.work(st, lambda t: {"x": t.suggest_float("x", 0.0, 1.0)},
                    lambda n, p, beat: {"value": p["x"]}, n_trials=2,
                    log=lambda _: None, **kwargs)


def test_a_trial_of_a_dead_process_on_this_host_is_retried_at_once(tmp_path):
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  st, stale = _stale_budget_study(tmp_path, f"{socket.gethostname()}:{gone.stdout.strip()}")
  start = time.time()
  ran = _budget_work(st, grace_s=3600)
  assert time.time() - start < 60  # not the hour of grace
  states = {t.number: t.state for t in st.get_trials()}
  assert states[stale.number] == State.FAIL
  assert len(st.get_trials(states=(State.COMPLETE,))) == 2 and len(ran) == 2


def test_a_worker_waits_for_running_trials_and_fills_a_dead_ones_budget(tmp_path):
  # The stale trial's worker is on another host: only its heartbeat tells.
  st, stale = _stale_budget_study(tmp_path, "another-host:1")
  ran = _budget_work(st, grace_s=1.0, poll_s=0.05)
  # One trial ran at once (the stale one held the other budget slot); the
  # worker then waited for it, failed it after the grace and ran its slot.
  states = {t.number: t.state for t in st.get_trials()}
  assert states[stale.number] == State.FAIL
  assert len(st.get_trials(states=(State.COMPLETE,))) == 2 and len(ran) == 2
  assert not st.get_trials(states=(State.RUNNING,))


def test_a_point_queued_twice_runs_once(tmp_path):
  st = study.open_study(study.sqlite_url(tmp_path / "db"), "s",
                        study.make_sampler("grid", {"x": ["1", "2"]}))
  for _ in range(2):
    st.enqueue_trial({"x": "2"}, user_attrs={"queued": study.key({"x": "2"})})
  runs = []
  study.work(st, lambda t: {"x": t.suggest_categorical("x", ["1", "2"])},
             lambda n, p, beat: runs.append(p["x"]) or {"value": 1.0},
             grid=[{"x": "1"}, {"x": "2"}], log=lambda _: None)
  assert sorted(runs) == ["1", "2"]
  pruned = st.get_trials(states=(State.PRUNED,))
  assert len(pruned) == 1 and "duplicate" in pruned[0].user_attrs["skipped"]


def _worker_main(args):
  """One worker process of the two-worker test (run through ``python -c``)."""
  root, sampler, calls, go = map(pathlib.Path, args[:3] + [args[3]])
  while not go.exists():  # start together, so that they really compete
    time.sleep(0.05)
  axes = {"a": [str(i) for i in range(4)], "b": ["x", "y", "z"]}
  score = lambda p: (0.5 + 0.01 * int(p["a"]) + 0.001 * "xyz".index(p["b"]), 0.5)
  sweep.run_sweep(SMOKE, None, root, axes=axes, sampler=str(sampler),
                  n_trials=None if str(sampler) == "grid" else 7,
                  runner=cheap_runner(str(calls), score, sleep=0.3),
                  log=lambda _: None)


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_two_worker_processes_share_one_sqlite_study(tmp_path, repo_root, sampler):
  calls, go = tmp_path / "calls.txt", tmp_path / "go"
  code = ("import sys; from tests import test_sweep; "
          "test_sweep._worker_main(sys.argv[1:])")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "sweep"), sampler,
                             str(calls), str(go)], cwd=repo_root,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  time.sleep(1.0)
  go.touch()
  for p in procs:
    assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
  lines = [l.split() for l in calls.read_text().splitlines()]
  ran = [name for name, _ in lines]
  assert len({pid for _, pid in lines}) == 2  # both workers took trials
  st = optuna.load_study(study_name="sweep",
                         storage=study.sqlite_url(tmp_path / "sweep" / "study.db"))
  complete = st.get_trials(states=(State.COMPLETE,))
  assert len(ran) == len(set(ran))  # no trial ran twice
  assert len(complete) == len(ran)  # every run is a COMPLETE trial
  assert not st.get_trials(states=(State.RUNNING, State.WAITING, State.FAIL))
  owners = {t.user_attrs["workdir"] for t in complete}
  assert owners == set(ran)
  if sampler == "grid":  # none lost: every grid point exactly once
    assert len({study.key(t.params) for t in complete}) == len(complete) == 12
  else:  # the budget is the study's, not each worker's
    assert len(complete) == 7
  summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
  assert len(summary["trials"]) == len(complete)


def test_sweep_binary_reads_get_sweep_from_the_config(tmp_path, repo_root):
  config = tmp_path / "swept.py"
  config.write_text(
      "from experiments.configs import synthetic\n"
      "def get_config(arg=None):\n"
      "  return synthetic.get_config(arg)\n"
      "def get_sweep(arg=None):\n"
      "  return [{'meta.alpha': 0.05}, {'meta.inner_steps': 'oops'}]\n")
  work = tmp_path / "sweep"
  done = work / sweep.trial_name({"meta.alpha": 0.05})
  done.mkdir(parents=True)
  (done / "results.json").write_text(json.dumps(_fake_results(0.6, 0.6)))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={config}:smoke",
       f"--workdir={work}", "--config.seeds=1"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((work / "sweep.json").read_text())
  assert summary["counts"] == {"done": 0, "skipped": 1, "failed": 1, "running": 0}
  assert summary["base_overrides"] == {"seeds": 1}
  assert "oops" in [t for t in summary["trials"] if t["status"] == "failed"][0]["error"]
  assert (work / "study.db").exists()


def test_sweep_binary_rejects_unknown_keys(tmp_path, repo_root):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={SMOKE}",
       f"--workdir={tmp_path}", "--grid=meta.no_such_field=1,2"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no_such_field" in proc.stderr
