"""The ML-1M config on a synthetic replica of ML-1M, and on the real ratings when present.

The replica keeps the real ``movies.dat`` and ``users.dat`` (in the data
directory) and draws ``ratings.dat`` with a heavy-tailed popularity, so that
the N=200 / K=20 protocol has old and emerging movies as on the real data.
"""

import pathlib
import shutil

import numpy as np
import pytest

from emerflow_jax import data, protocol, train
from experiments.configs import movielens1m


def _replica(real: pathlib.Path, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
  folder = out / "movielens-1m"
  folder.mkdir(parents=True)
  for name in ("movies.dat", "users.dat"):
    shutil.copy(real / name, folder / name)
  movies = [int(l.split("::")[0]) for l in
            (real / "movies.dat").read_text(encoding="latin-1").splitlines() if l]
  n_users = sum(1 for l in (real / "users.dat").read_text().splitlines() if l)
  rng = np.random.default_rng(seed)
  # 60 old movies (250-320 ratings), 120 emerging (61-200), the rest a few each.
  counts = np.concatenate([rng.integers(250, 320, 60), rng.integers(61, 200, 120),
                           rng.integers(0, 4, len(movies) - 180)])
  lines, t = [], 978300760
  for movie, n in zip(rng.permutation(movies), counts):
    users = rng.choice(np.arange(1, n_users + 1), n, replace=False)
    for u in users:
      t += int(rng.integers(1, 50))
      lines.append(f"{u}::{movie}::{int(rng.integers(1, 6))}::{t}")
  (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
  return out


def test_config_is_the_canonical_setting():
  c = movielens1m.get_config()
  assert (c.data.name, c.data.n_max, c.data.k) == ("movielens1m", 200, 20)


def test_replica_runs_end_to_end(real_data, tmp_path):
  real = real_data("movielens-1m", "movies.dat", "users.dat")
  c = movielens1m.get_config("smoke")
  c.data.dir = str(_replica(real, tmp_path / "data"))
  c.data.download = False
  c.method = "base"
  c.eval.curves = False
  ds = data.load_dataset(c.data)
  split = protocol.split_emerging_items(ds, c.data.n_max, c.data.k)
  assert split.counts()["old_items"] == 60 and split.counts()["emerging_items"] == 120
  res = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert res["dataset"] == "movielens1m"
  assert all(0 < v[0] < 1 for v in res["auc"].values())


def test_real_ratings_give_the_canonical_split(data_dir):
  folder = data_dir / "movielens-1m"
  if not (folder / "ratings.dat").exists():
    pytest.skip("ML-1M ratings.dat is not in the data directory (it is downloaded "
                "on first use, and cannot be here offline)")
  c = movielens1m.get_config()
  c.data.download = False
  ds = data.load_dataset(c.data)
  counts = protocol.split_emerging_items(ds, 200, 20).counts()
  assert counts["emerging_items"] == 972
  assert counts["base_rows"] == 854530 and counts["test_rows"] == 58409
  assert all(counts[f"{p}_rows"] == 19440 for p in protocol.WARM_PHASES)
