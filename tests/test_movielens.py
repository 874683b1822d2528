"""Tests for the MovieLens readers: real ML-100K, tiny handmade files, errors.

The handmade files follow the GroupLens formats; each malformed variant must
raise DataError naming the file and the line.
"""

import pathlib

import numpy as np
import pytest

from emerflow_jax import data
from emerflow_jax.data import dataset, movielens

CLOSED_URL = "http://127.0.0.1:9/ml.zip"  # nothing listens: "offline"

_FLAGS = ["0"] * 19
U_ITEM = [
    "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(
        ["0", "0", "0", "1", "1", "1"] + ["0"] * 13),
    "2|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join(
        ["0", "1", "1"] + ["0"] * 16),
    "5|Copycat (1995)|01-Jan-1995||http://x|" + "|".join(_FLAGS),
]
U_USER = ["1|24|M|technician|85711", "2|53|F|other|94043"]
U_DATA = ["1\t1\t5\t881250949", "2\t1\t3\t881250950", "1\t2\t4\t881250951",
          "2\t5\t1\t881250952"]

ML1M = {
    "movies.dat": ["1::Toy Story (1995)::Animation|Children's|Comedy",
                   "2::Jumanji (1995)::Adventure|Children's|Fantasy"],
    "users.dat": ["1::F::1::10::48067", "2::M::56::16::70072"],
    "ratings.dat": ["1::1::5::978300760", "2::2::3::978302109",
                    "1::2::4::978301968"],
}


def _write(folder: pathlib.Path, files: dict[str, list[str]]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for name, lines in files.items():
    (folder / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
  return folder


def _ml100k(folder, data=None, item=None, user=None):
  return _write(folder, {"u.data": U_DATA if data is None else data,
                         "u.item": U_ITEM if item is None else item,
                         "u.user": U_USER if user is None else user})


def test_handmade_ml100k_reads_rows_labels_and_fields(tmp_path):
  ds = movielens.load_movielens100k(_ml100k(tmp_path), download=False)
  assert (ds.n_rows, ds.n_users, ds.n_items) == (4, 2, 3)
  np.testing.assert_array_equal(ds.labels, [1, 0, 1, 0])  # rating >= 4
  np.testing.assert_array_equal(ds.items, [0, 0, 1, 2])  # ids 1, 2, 5 -> 0, 1, 2
  np.testing.assert_array_equal(ds.times, [881250949, 881250950, 881250951,
                                           881250952])
  assert list(ds.item_keys) == ["1", "2", "5"]
  assert ds.item_raw[0] == {"title": "Toy Story", "year": "1995",
                            "genres": "Animation, Children's, Comedy"}
  assert ds.item_raw[2]["genres"] == ""
  genres = ds.item_fields["genres"]
  assert (genres[0] > 0).sum() == 3 and (genres[2] > 0).sum() == 0
  assert set(ds.user_fields) == {"user_id", "gender", "age", "occupation", "zip"}
  assert set(ds.item_fields) == {"item_id", "year", "title", "genres"}


def test_handmade_ml1m_reads_double_colon_files(tmp_path):
  ds = movielens.load_movielens1m(_write(tmp_path, ML1M), download=False)
  assert (ds.n_rows, ds.n_users, ds.n_items) == (3, 2, 2)
  np.testing.assert_array_equal(ds.labels, [1, 0, 1])
  assert ds.item_raw[1]["title"] == "Jumanji" and ds.item_raw[1]["year"] == "1995"


@pytest.mark.parametrize("bad_line, message", [
    ("1\t2\t4", "expected 4 '\t'-separated fields"),  # bad line
    ("1,2,4,881250951", "expected 4"),  # wrong separator
    ("1\t2\tfour\t881250951", "rating 'four' is not an integer"),
    ("1\t2\t4.5\t881250951", "rating '4.5' is not an integer"),
    ("1\t99\t4\t881250951", "unknown item id 99"),
    ("7\t2\t4\t881250951", "unknown user id 7"),
    ("1\t2\t6\t881250951", "rating 6 not in 1..5"),
    ("1\t2\t0\t881250951", "rating 0 not in 1..5"),
])
def test_malformed_ratings_name_file_and_line(tmp_path, bad_line, message):
  folder = _ml100k(tmp_path, data=U_DATA[:2] + [bad_line] + U_DATA[3:])
  with pytest.raises(dataset.DataError, match=message) as e:
    movielens.load_movielens100k(folder, download=False)
  assert f"{folder / 'u.data'}:3:" in str(e.value)


def test_malformed_item_and_user_files_name_file_and_line(tmp_path):
  bad_flags = U_ITEM[:1] + [U_ITEM[1].replace("|0|1|1|", "|0|x|1|")] + U_ITEM[2:]
  folder = _ml100k(tmp_path / "a", item=bad_flags)
  with pytest.raises(dataset.DataError, match=r"u\.item:2: genre flags"):
    movielens.load_movielens100k(folder, download=False)
  folder = _ml100k(tmp_path / "b", user=["1|24|M|technician|85711", "two|53|F"])
  with pytest.raises(dataset.DataError, match=r"u\.user:2: expected 5"):
    movielens.load_movielens100k(folder, download=False)
  folder = _ml100k(tmp_path / "c", user=["x1|24|M|technician|85711"])
  with pytest.raises(dataset.DataError, match=r"u\.user:1: user id 'x1'"):
    movielens.load_movielens100k(folder, download=False)


def test_malformed_ml1m_ratings_name_file_and_line(tmp_path):
  files = dict(ML1M, **{"ratings.dat": ML1M["ratings.dat"] + ["1\t1\t5\t9"]})
  folder = _write(tmp_path, files)
  with pytest.raises(dataset.DataError, match=r"ratings\.dat:4: expected 4 '::'"):
    movielens.load_movielens1m(folder, download=False)


def test_missing_files_without_download_fail_naming_dir_and_files(tmp_path):
  (tmp_path / "u.user").write_text(U_USER[0] + "\n")
  with pytest.raises(dataset.DataError) as e:
    movielens.load_movielens100k(tmp_path, download=False)
  msg = str(e.value)
  assert str(tmp_path) in msg and "u.data" in msg and "u.item" in msg
  assert "u.user" not in msg.split("Download")[0]
  assert movielens.ML100K_URL in msg  # says where to get them


def test_offline_download_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(movielens, "ML100K_URL", CLOSED_URL)
  # load_movielens100k reads the URL at call time through the module global.
  with pytest.raises(dataset.DataError) as e:
    movielens.load_movielens100k(tmp_path / "ml", download=True)
  msg = str(e.value)
  assert "could not download" in msg and CLOSED_URL in msg
  assert str(tmp_path / "ml") in msg and "u.data" in msg


def test_split_title():
  assert movielens.split_title("Toy Story (1995)") == ("Toy Story", "1995")
  assert movielens.split_title("City of Lost Children, The (1995) ") == (
      "City of Lost Children, The", "1995")
  assert movielens.split_title("unknown") == ("unknown", "")


# --- real data ---------------------------------------------------------------


def test_real_ml100k_counts(real_data):
  folder = real_data("movielens-100k", "u.data", "u.item", "u.user")
  ds = data.load_dataset({"name": "movielens100k", "dir": str(folder.parent),
                          "download": False})
  assert (ds.n_rows, ds.n_users, ds.n_items) == (100_000, 943, 1_682)
  # Ratings 4 and 5 (34,174 + 21,201) are positives.
  assert int(ds.labels.sum()) == 55_375
  assert ds.item_raw[0]["title"] == "Toy Story"


def test_real_ml1m_without_ratings_names_only_the_missing_file(real_data):
  folder = real_data("movielens-1m", "movies.dat", "users.dat")
  if (folder / "ratings.dat").exists():
    pytest.skip("ratings.dat is present: nothing is missing")
  with pytest.raises(dataset.DataError) as e:
    movielens.load_movielens1m(folder, download=False)
  head = str(e.value).split("Download")[0]
  assert "ratings.dat" in head and "movies.dat" not in head


def test_load_dataset_rejects_unknown_names():
  with pytest.raises(dataset.DataError, match="unknown dataset 'nope'"):
    data.load_dataset({"name": "nope"})
