"""Tests for the repoDB reader: labels, duplicates, shuffle order, counts, errors.

Tests on the real file need $EMERFLOW_DATA_DIR; the synthetic-file tests always
run.
"""

import os
import pathlib

import numpy as np
import pytest

from emerflow_jax.data import dataset, repodb

HEADER = ",".join(repodb.COLUMNS)


def _line(drug, ind, status="Approved", name=None, ind_name="Acute pain"):
  name = f"Drug {drug}" if name is None else name
  failed = status != "Approved"
  return ",".join([name, drug, f'"{ind_name}, severe"', ind,
                   "Sign or Symptom", status, "Phase 2" if failed else "",
                   "", "NCT00000001" if failed else ""])


def _write(folder: pathlib.Path, lines: list[str]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / repodb.FILE
  path.write_text("\n".join([HEADER] + lines) + "\n", encoding="utf-8")
  return path


def _toy(folder: pathlib.Path) -> pathlib.Path:
  lines = [_line("DB1", f"C{j}") for j in range(6)]
  lines += [_line("DB1", "C0", "Terminated", name="Other"),  # approved wins
            _line("DB2", "C1", "Withdrawn"), _line("DB2", "C1", "Suspended"),
            _line("DB2", "C2", "Terminated", name=""),
            _line("DB3", "C3"), _line("DB3", "C4", "Suspended")]
  return _write(folder, lines)


# --- synthetic files ------------------------------------------------------


def test_toy_labels_duplicates_and_names(tmp_path):
  _toy(tmp_path)
  ds = repodb.load_repodb(tmp_path)
  assert (ds.n_items, ds.n_users, ds.n_rows) == (3, 6, 10)
  assert ds.info["duplicate_lines_merged"] == 2
  assert ds.info["approved_and_failed_pairs"] == 1
  label = {(ds.item_keys[i], u): y
           for i, u, y in zip(ds.items, ds.users, ds.labels)}
  assert label[("DB1", 0)] == 1 and label[("DB2", 1)] == 0
  assert label[("DB2", 2)] == 0 and label[("DB3", 4)] == 0
  assert ds.labels.sum() == 7
  # Most frequent non-empty name wins; the quoted comma stays in the name.
  assert [r["name"] for r in ds.item_raw] == ["Drug DB1", "Drug DB2", "Drug DB3"]
  assert ds.item_raw[0]["drugbank id"] == "DB1"
  assert (ds.user_fields["name"] > 0).sum(1).tolist() == [3] * 6
  ds.validate()


def test_order_is_a_seeded_shuffle(tmp_path):
  _toy(tmp_path)
  a = repodb.load_repodb(tmp_path, order_seed=0)
  b = repodb.load_repodb(tmp_path, order_seed=0)
  np.testing.assert_array_equal(a.times, b.times)
  np.testing.assert_array_equal(np.sort(a.times), np.arange(a.n_rows))
  orders = {tuple(repodb.load_repodb(tmp_path, order_seed=s).times)
            for s in range(5)}
  assert len(orders) > 1
  assert a.info["order_seed"] == 0


@pytest.mark.parametrize("bad, message", [
    (_line("DB9", "C9", "Pending"), "status 'Pending' is not one of"),
    (_line("DB9", "C9") + ",extra", "expected 9 comma-separated fields"),
    (_line("", "C9"), "empty drug_id or ind_id"),
])
def test_malformed_rows_name_file_and_line(tmp_path, bad, message):
  path = _write(tmp_path, [_line("DB1", "C1"), _line("DB1", "C2"), bad])
  with pytest.raises(dataset.DataError) as e:
    repodb.load_repodb(tmp_path)
  assert f"{path}:4:" in str(e.value) and message in str(e.value)


def test_bad_header_and_missing_file(tmp_path):
  path = tmp_path / repodb.FILE
  path.write_text("drug_name,drug_id\nA,DB1\n")
  with pytest.raises(dataset.DataError, match=f"{path}:1: header lacks"):
    repodb.load_repodb(tmp_path)
  with pytest.raises(dataset.DataError, match=repodb.FILE):
    repodb.load_repodb(tmp_path / "nowhere")


# --- the real file --------------------------------------------------------

N, K = 12, 2  # the split of experiments/configs/repodb.py


@pytest.fixture(scope="module")
def real():
  data_dir = os.environ.get("EMERFLOW_DATA_DIR")
  if not data_dir:
    pytest.skip("EMERFLOW_DATA_DIR is not set: no real repoDB file")
  return repodb.load_repodb(pathlib.Path(data_dir, "repodb"))


def test_real_counts(real):
  ds = real
  ds.validate()
  assert (ds.n_users, ds.n_items, ds.n_rows) == (2051, 1571, 9937)
  assert ds.labels.sum() == 6677
  assert ds.info["lines"] == 10800 and ds.info["duplicate_lines_merged"] == 863
  assert ds.info["approved_and_failed_pairs"] == 21
  assert len(set(zip(ds.items.tolist(), ds.users.tolist()))) == ds.n_rows
  np.testing.assert_array_equal(np.sort(ds.times), np.arange(ds.n_rows))


def test_real_split_counts(real):
  ds = real
  sizes = np.bincount(ds.items, minlength=ds.n_items)
  old = sizes > N
  emerging = (sizes >= 3 * K) & (sizes <= N)
  assert old.sum() == 159 and emerging.sum() == 260
  assert sizes[old].sum() == 5396
  test = sizes[emerging] - 3 * K
  assert test.sum() == 650 and (test > 0).sum() == 209
  protocol = pytest.importorskip("emerflow_jax.protocol")
  split = protocol.split_emerging_items(ds, N, K)
  assert split.counts() == {
      "old_items": 159, "emerging_items": 260, "base_rows": 5396,
      "test_rows": 650, "warm_a_rows": 520, "warm_b_rows": 520,
      "warm_c_rows": 520}
