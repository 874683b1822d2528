"""Tests for emerflow_jax.enrich.sources: title matching and the two importers.

Match counts run on the real shared data (skipped when $EMERFLOW_DATA_DIR is
unset); the title normalisation tests need no data.
"""

import dataclasses

import numpy as np
import pytest

from emerflow_jax import data
from emerflow_jax.data import dataset as dataset_lib
from emerflow_jax.enrich import sources


def _movies(make_dataset, name, titles):
  """A handmade dataset whose items are the given (key, title, year) movies."""
  ds = make_dataset(items=np.arange(len(titles)), times=np.zeros(len(titles)))
  return dataclasses.replace(
      ds, name=name, item_type="movie",
      item_keys=np.asarray([k for k, _, _ in titles]),
      item_raw=[{"title": t, "year": y, "genres": ""} for _, t, y in titles])


def test_title_keys_articles_alternates_and_accents():
  keys = sources.title_keys("Horseman on the Roof, The (Hussard sur le toit, Le)")
  assert {"the horseman on the roof", "horseman on the roof",
          "le hussard sur le toit"} <= keys
  assert "l etoile" in sources.title_keys("Étoile, L'")
  assert "sydney" in sources.title_keys("Hard 8 (a.k.a. Sydney, a.k.a. Hard Eight)")
  assert "hard eight" in sources.title_keys("Hard 8 (a.k.a. Sydney, a.k.a. Hard Eight)")
  loose = sources.title_keys("Star Wars: Episode V - The Empire Strikes Back", True)
  assert {"star wars", "the empire strikes back", "empire strikes back"} <= loose
  assert "alien3" in sources.title_keys("Alien³", loose=True)
  assert "alien3" in sources.title_keys("Alien 3", loose=True)


def test_match_prefers_exact_then_loose_then_year_off_by_one(make_dataset):
  ml1m = {"1": ("Lion King, The", "1994"), "2": ("Star Wars: Episode IV - A New Hope", "1977"),
          "3": ("Heat", "1995"), "4": ("Heat", "1972"), "5": ("Twins", "1988"),
          "6": ("Twins", "1988")}
  ds = _movies(make_dataset, "movielens100k", [
      ("a", "Lion King, The", "1994"), ("b", "Star Wars", "1977"),
      ("c", "Heat", "1996"), ("d", "Twins", "1988"), ("e", "Nothing", "2000"),
      ("f", "unknown", "")])
  matched, counts = sources.match_ml1m(ds, ml1m)
  assert matched == {"a": "1", "b": "2", "c": "3"}
  assert counts == {"items": 6, "exact": 1, "loose": 1, "year_pm1": 1,
                    "ambiguous": 1, "unmatched": 2}


def test_match_ml1m_ids_directly_and_refuse_other_types(make_dataset):
  ds = _movies(make_dataset, "movielens1m", [("1", "A", "1990"), ("99", "B", "1991")])
  matched, counts = sources.match_ml1m(ds, {"1": ("A", "1990")})
  assert matched == {"1": "1"} and counts["unmatched"] == 1
  disease = dataclasses.replace(ds, name="disgenet", item_type="disease")
  with pytest.raises(dataset_lib.DataError, match="only cover movies"):
    sources.match_ml1m(disease, {})
  with pytest.raises(dataset_lib.DataError, match="unknown import source"):
    sources.import_texts(ds, "chatgpt")


@pytest.fixture(scope="module")
def ml100k():
  import os  # pylint: disable=g-import-not-at-top
  if not os.environ.get("EMERFLOW_DATA_DIR"):
    pytest.skip("$EMERFLOW_DATA_DIR is not set: no real data to test against")
  return data.load_dataset({"name": "movielens100k", "download": False})


def test_real_source_files_read_completely(data_dir):
  a4r = sources.read_agent4rec(data_dir)
  assert len(a4r) == 3883
  assert a4r["1"] == {"summary": "A group of toys embarks on a thrilling "
                                 "adventure to save their owner."}
  galkars = sources.read_galkars(data_dir)
  assert len(galkars) == 2800
  assert galkars["2"]["genre"] == "adventure, fantasy"
  assert sources.read_ml1m_movies(data_dir)["2571"] == ("Matrix, The", "1999")


def test_ml100k_to_ml1m_match_rate(ml100k, data_dir):
  matched, counts = sources.match_ml1m(ml100k, sources.read_ml1m_movies(data_dir))
  assert counts == {"items": 1682, "exact": 1658, "loose": 7, "year_pm1": 3,
                    "ambiguous": 2, "unmatched": 12}
  assert len(matched) == 1668  # 99.2 %
  assert matched["50"] == "260"  # Star Wars (1977) -> Star Wars: Episode IV
  assert matched["1"] == "1"


@pytest.mark.parametrize("source, n_text", [("agent4rec", 1668), ("galkars", 1235)])
def test_import_texts_on_ml100k(ml100k, source, n_text):
  records, fields = sources.import_texts(ml100k, source)
  assert fields["n_with_text"] == len(records) == n_text
  assert fields["match_rate"] == pytest.approx(1668 / 1682, abs=1e-4)
  assert len(fields["source_sha256"]) == 64
  golden = next(r for r in records if r["key"] == "2")
  assert golden["ml1m_id"] == "10"
  # The dataset's own title is used, never the importer's (mojibake) title.
  assert golden["text"].startswith(
      "title: GoldenEye; year: 1995; genres: Action, Adventure, Thriller; ")
  extra = "summary: " if source == "agent4rec" else "genre: action, spy; "
  assert extra in golden["text"]
