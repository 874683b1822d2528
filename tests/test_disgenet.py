"""Tests for the DisGeNET reader: years, negatives, counts, errors.

Tests on the real file need $EMERFLOW_DATA_DIR; the synthetic-file tests always
run.
"""

import gzip
import os
import pathlib

import numpy as np
import pytest

from emerflow_jax.data import dataset, disgenet

HEADER = "\t".join(disgenet.COLUMNS)


def _line(gene, disease, year, name="Some disease", dsi="0.5", dpi="0.3",
          classes="C04;C06", gene_text=None):
  gene_text = f"{gene:>9}" if gene_text is None else gene_text
  return "\t".join([gene_text, f"G{gene}", dsi, dpi, disease, name, "disease",
                    classes, "Neoplastic Process", "0.30", "1", str(year),
                    str(year), "   1", "   0", "CTD_human"])


def _write(folder: pathlib.Path, lines: list[str]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / disgenet.FILE
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join([HEADER] + lines) + "\n")
  return path


def _toy(folder: pathlib.Path) -> pathlib.Path:
  """3 diseases over 12 genes; D1 has an undated association with gene 2."""
  lines = [_line(g, "C0000001", 2000 + g % 3) for g in (1, 3, 4, 5)]
  lines.append(_line(2, "C0000001", ""))
  lines += [_line(g, "C0000002", 1990 + g, name="Other illness", classes="")
            for g in (6, 7, 8)]
  lines += [_line(g, "C0000003", 2010, dsi="", dpi="") for g in (9, 10)]
  lines += [_line(g, "C0000004", 2015, dsi="0.9", dpi="0.1") for g in (11, 12)]
  return _write(folder, lines)


# --- synthetic files ------------------------------------------------------


def test_toy_file_rows_years_and_order(tmp_path):
  _toy(tmp_path)
  ds = disgenet.load_disgenet(tmp_path)
  assert ds.info["dropped_missing_year"] == 1
  assert ds.info["positives"] == 11 and ds.info["negatives"] == 11
  assert ds.n_items == 4 and ds.n_users == 12 and ds.n_rows == 22
  pos = ds.labels == 1
  # Positive times are the YearInitial of their line.
  key = {(ds.item_keys[i], u + 1): t
         for i, u, t in zip(ds.items[pos], ds.users[pos], ds.times[pos])}
  assert key[("C0000001", 4)] == 2001 and key[("C0000002", 7)] == 1997
  # Stored order: by item, then year; every negative right after its positive.
  assert np.all(np.diff(ds.items) >= 0)
  for i in range(ds.n_items):
    assert np.all(np.diff(ds.times[ds.items == i]) >= 0)
  np.testing.assert_array_equal(ds.labels[0::2], 1)
  np.testing.assert_array_equal(ds.labels[1::2], 0)
  np.testing.assert_array_equal(ds.times[1::2], ds.times[0::2])
  np.testing.assert_array_equal(ds.items[1::2], ds.items[0::2])
  # The undated gene 2 is a known positive of D1, so never its negative.
  d1 = np.flatnonzero(ds.item_keys == "C0000001")[0]
  assert not np.any((ds.items == d1) & (ds.labels == 0) & (ds.users + 1 <= 5))


def test_toy_file_features(tmp_path):
  _toy(tmp_path)
  ds = disgenet.load_disgenet(tmp_path, n_buckets=2)
  assert ds.item_raw[0] == {
      "name": "Some disease", "type": "disease",
      "classes": "C04 Neoplasms; C06 Digestive System Diseases",
      "semantic type": "Neoplastic Process"}
  assert ds.item_raw[1]["classes"] == ""
  np.testing.assert_array_equal((ds.item_fields["classes"] > 0).sum(1),
                                [2, 0, 2, 2])
  # Genes 9 and 10 have no DSI/DPI: bucket 0 (unknown).
  np.testing.assert_array_equal(ds.user_fields["dsi"][8:10], 0)
  assert ds.user_fields["dsi"][0] > 0
  ds.validate()


def test_missing_year_last(tmp_path):
  _toy(tmp_path)
  ds = disgenet.load_disgenet(tmp_path, missing_year="last")
  assert ds.info["dropped_missing_year"] == 0 and ds.n_rows == 24
  assert ds.info["missing_year_time"] == 2016
  d1 = np.flatnonzero(ds.item_keys == "C0000001")[0]
  rows = np.flatnonzero(ds.items == d1)
  assert ds.users[rows[-2]] == 1 and ds.times[rows[-2]] == 2016


def test_neg_ratio_and_degree_sampling(tmp_path):
  # 6 diseases x 5 genes over 30 genes: room for 2 negatives per positive.
  _write(tmp_path, [_line(5 * k + j, f"C000001{k}", 2000 + j)
                    for k in range(6) for j in range(1, 6)])
  for sampling in disgenet.NEG_SAMPLING:
    ds = disgenet.load_disgenet(tmp_path, neg_ratio=2, neg_sampling=sampling)
    assert ds.info["negatives"] == 2 * ds.info["positives"]
    np.testing.assert_array_equal(ds.labels.reshape(-1, 3)[:, 0], 1)
    for i in range(ds.n_items):
      neg = ds.users[(ds.items == i) & (ds.labels == 0)]
      pos = ds.users[(ds.items == i) & (ds.labels == 1)]
      assert len(set(neg)) == len(neg) and not set(neg) & set(pos)


def test_sample_negatives_properties():
  n_users, n_items = 80, 6
  rng = np.random.default_rng(3)
  known = [np.sort(rng.choice(n_users, 5 + 3 * i, replace=False))
           for i in range(n_items)]
  items = np.repeat(np.arange(n_items), [len(k) for k in known])
  items = items[rng.permutation(len(items))]
  draw = lambda seed, **kw: disgenet.sample_negatives(
      items, known, n_users, 2, np.random.default_rng(seed), **kw)
  neg = draw(0)
  assert neg.shape == (len(items), 2)
  for i in range(n_items):
    got = neg[items == i].ravel()
    assert not np.isin(got, known[i]).any()
    assert len(np.unique(got)) == len(got)
  assert neg.min() >= 0 and neg.max() < n_users
  np.testing.assert_array_equal(neg, draw(0))
  assert not np.array_equal(neg, draw(1))
  weights = np.zeros(n_users)
  weights[:60] = np.arange(1, 61)
  wneg = draw(0, weights=weights)
  assert wneg.max() < 60
  np.testing.assert_array_equal(wneg, draw(0, weights=weights))


def test_sample_negatives_too_many():
  with pytest.raises(dataset.DataError, match="item C9: needs 6 negatives"):
    disgenet.sample_negatives(np.zeros(3, int), [np.arange(5)], 8, 2,
                              np.random.default_rng(0), keys=["C9"])
  # Weighted draws name the right item too (item 1 lacks weighted users).
  weights = np.r_[np.ones(4), np.zeros(6)]
  with pytest.raises(dataset.DataError, match="item C8: needs 2 negatives"):
    disgenet.sample_negatives(np.asarray([0, 1, 1]), [np.asarray([0]),
                              np.asarray([0, 1, 2])], 10, 1,
                              np.random.default_rng(0), weights=weights,
                              keys=["C7", "C8"])


@pytest.mark.parametrize("bad, line, message", [
    (_line(5, "C1", 2000)[:-10], 3, "expected 16 tab-separated fields"),
    (_line(5, "C1", "19x9"), 3, "YearInitial '19x9' is not an integer"),
    (_line(5, "C1", 2000, gene_text="  ABC"), 3, "geneId 'ABC' is not an"),
    (_line(5, "C1", 2000, dsi="high"), 3, "DSI 'high' is not a number"),
])
def test_malformed_rows_name_file_and_line(tmp_path, bad, line, message):
  path = _write(tmp_path, [_line(1, "C1", 2000), bad, _line(2, "C1", 2001)])
  with pytest.raises(dataset.DataError) as e:
    disgenet.load_disgenet(tmp_path)
  assert f"{path}:{line}:" in str(e.value) and message in str(e.value)


def test_bad_header_and_missing_file(tmp_path):
  path = tmp_path / disgenet.FILE
  with gzip.open(path, "wt") as f:
    f.write("geneId\tdiseaseId\n1\tC1\n")
  with pytest.raises(dataset.DataError, match=f"{path}:1: header lacks"):
    disgenet.load_disgenet(tmp_path)
  with pytest.raises(dataset.DataError, match=disgenet.FILE):
    disgenet.load_disgenet(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="missing_year"):
    disgenet.load_disgenet(tmp_path, missing_year="first")


# --- the real file --------------------------------------------------------

N, K = 100, 9  # the split of experiments/configs/disgenet.py


@pytest.fixture(scope="module")
def real():
  data_dir = os.environ.get("EMERFLOW_DATA_DIR")
  if not data_dir:
    pytest.skip("EMERFLOW_DATA_DIR is not set: no real DisGeNET file")
  folder = pathlib.Path(data_dir, "disgenet-curated-v7")
  return folder, disgenet.load_disgenet(folder)


@pytest.fixture(scope="module")
def real_lines(real):
  """The real file's gene, disease and year per line, read independently."""
  folder, _ = real
  with gzip.open(folder / disgenet.FILE, "rt", encoding="utf-8") as f:
    header, *lines = [line.rstrip("\n").split("\t") for line in f]
  cols = [header.index(c) for c in ("geneId", "diseaseId", "YearInitial")]
  return [dict(zip(("geneId", "diseaseId", "YearInitial"),
                   (parts[j].strip() for j in cols))) for parts in lines]


def test_real_counts(real):
  _, ds = real
  ds.validate()
  assert (ds.n_users, ds.n_items, ds.n_rows) == (9703, 10665, 159310)
  assert ds.info["dropped_missing_year"] == 4383
  assert ds.labels.sum() == 79655
  assert ds.times.min() >= 1924 and ds.times.max() <= 2020
  np.testing.assert_array_equal(ds.times, np.round(ds.times))


def test_real_years_match_file(real, real_lines):
  _, ds = real
  first = real_lines[0]  # gene 1 (A1BG) - Hepatomegaly, YearInitial 2017
  i = np.flatnonzero(ds.item_keys == first["diseaseId"])[0]
  hit = (ds.items == i) & (ds.users == 0) & (ds.labels == 1)
  assert hit.sum() == 1 and ds.times[hit][0] == int(first["YearInitial"])
  assert np.all(np.diff(ds.items) >= 0)
  starts = np.flatnonzero(np.diff(ds.items)) + 1
  steps = np.diff(ds.times)
  steps[starts - 1] = 0  # item boundaries
  assert steps.min() >= 0


def test_real_negatives_are_not_known_positives(real, real_lines):
  _, ds = real
  known = {(int(r["geneId"]), r["diseaseId"]) for r in real_lines}
  gene_of = np.asarray(sorted({g for g, _ in known}))
  neg = ds.labels == 0
  pairs = zip(gene_of[ds.users[neg]], ds.item_keys[ds.items[neg]])
  assert not any((int(g), d) in known for g, d in pairs)
  per_item_pos = np.bincount(ds.items[~neg], minlength=ds.n_items)
  np.testing.assert_array_equal(
      np.bincount(ds.items[neg], minlength=ds.n_items), per_item_pos)


def test_real_split_counts(real):
  _, ds = real
  sizes = np.bincount(ds.items, minlength=ds.n_items)
  old = sizes > N
  emerging = (sizes >= 3 * K) & (sizes <= N)
  assert old.sum() == 313 and emerging.sum() == 651
  assert sizes[old].sum() == 81960
  test = sizes[emerging] - 3 * K
  assert test.sum() == 15845 and test.min() >= 1  # K odd, rows come in pairs
  protocol = pytest.importorskip("emerflow_jax.protocol")
  split = protocol.split_emerging_items(ds, N, K)
  assert split.counts() == {
      "old_items": 313, "emerging_items": 651, "base_rows": 81960,
      "test_rows": 15845, "warm_a_rows": 5859, "warm_b_rows": 5859,
      "warm_c_rows": 5859}
  # Phases follow years: warm_a never comes after warm_b, nor warm_c after test.
  for a, b in (("warm_a", "warm_b"), ("warm_b", "warm_c")):
    assert np.all(ds.times[split.warm_rows[a]].max(1)
                  <= ds.times[split.warm_rows[b]].min(1))


def test_real_degree_sampling_matches_gene_popularity(real):
  folder, _ = real
  ds = disgenet.load_disgenet(folder, neg_sampling="degree")
  assert ds.n_rows == 159310 and ds.info["neg_sampling"] == "degree"
  neg = ds.labels == 0
  np.testing.assert_array_equal(np.bincount(ds.items[neg], minlength=ds.n_items),
                                np.bincount(ds.items[~neg], minlength=ds.n_items))
  # Genes are drawn as negatives about as often as they are positives, so gene
  # popularity alone no longer separates the labels.
  pos_count = np.bincount(ds.users[~neg], minlength=ds.n_users)
  neg_count = np.bincount(ds.users[neg], minlength=ds.n_users)
  assert np.corrcoef(pos_count, neg_count)[0, 1] > 0.9
