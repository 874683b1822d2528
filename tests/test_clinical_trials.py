"""Tests for the clinical-trials reader: label join, time order, split guard,
counts and errors.

The hand-made folder tests always run; the real-file tests need
$EMERFLOW_DATA_DIR with a clinical-trials/ folder and skip otherwise.
"""

import collections
import os
import pathlib

import numpy as np
import pytest

from emerflow_jax import protocol
from emerflow_jax.data import clinical_trials as ct
from emerflow_jax.data import clinical_trials_files as ct_files
from emerflow_jax.data import dataset
from experiments.configs import clinical_trials as ct_config

POS = "Completed, Positive outcome/primary endpoint(s) met"
NEG = "Completed, Negative outcome/primary endpoint(s) not met"
EFFICACY = "Terminated, Lack of efficacy"
UNKNOWN = "Completed, Outcome unknown"
OTHER = "Terminated, Other"
OUTCOMES = {POS: 1, NEG: 0, EFFICACY: 0, UNKNOWN: -1, OTHER: -1}


def _nct(i: int) -> str:
  return f"NCT{i:08d}"


# (trial, drug, disease) rows of the mapping; trial 7 has no label anywhere.
MAPPING_ROWS = [(1, "DB00001", "DOID:1"), (1, "DB00001", "DOID:2"),
                (2, "DB00002", "DOID:1"), (3, "DB00001", "DOID:2"),
                (4, "DB00002", "DOID:2"), (5, "DB00001", "DOID:1"),
                (6, "DB00002", "DOID:1"), (7, "DB00001", "DOID:1"),
                (8, "DB00002", "DOID:2")]
TRIALBENCH = {"trialbench/Phase1/train_y.csv": [(1, 1)],
              "trialbench/Phase2/test_y.csv": [(6, 0), (8, 1)]}
IQVIA_ROWS = [(1, NEG),                   # conflicts with TrialBench's 1
              (2, POS),                   # IQVIA only -> 1
              (3, UNKNOWN),               # unknown -> dropped
              (4, POS), (4, EFFICACY),    # both 0 and 1 -> dropped
              (5, EFFICACY), (5, OTHER),  # one known label -> 0
              (8, POS)]                   # agrees with TrialBench
DATES = {1: "March 1999", 2: "", 5: "July 15, 1994", 6: "January 2000",
         7: "February 2001"}               # 8 is not listed at all


def _write(folder: pathlib.Path, edits: dict[str, list[str]] | None = None):
  """Writes the hand-made folder; ``edits`` appends raw lines to a file."""
  files = {ct_files.MAPPING: ["\t".join(ct_files.MAPPING_COLUMNS)] + [
      f"{_nct(n)}\t{d}\tDrug {d[-1]} hydrochloride\t{u}\tDisease {u[-1]} "
      "syndrome" for n, d, u in MAPPING_ROWS]}
  for rel in ct_files.TRIALBENCH:
    files[rel] = [",outcome"] + [f"{_nct(n)},{y}"
                                 for n, y in TRIALBENCH.get(rel, [])]
  files[ct_files.IQVIA] = ["studyid,trialOutcome"] + [f'{_nct(n)},"{o}"'
                                               for n, o in IQVIA_ROWS]
  files[ct_files.OUTCOME_MAP] = [f"{o}\t{y}" for o, y in OUTCOMES.items()]
  files[ct_files.DATES] = [f"{_nct(n)}\t{d}\t{'June 2004' if d else ''}"
                     for n, d in DATES.items()]
  for rel, lines in (edits or {}).items():
    files[rel] = files[rel] + lines
  for rel, lines in files.items():
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    newline = "\r\n" if rel == ct_files.IQVIA else "\n"  # the real IQVIA file is CRLF
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
  return folder


def _month(year: int, month: int) -> float:
  return 12.0 * year + month - 1


# --- hand-made folder -----------------------------------------------------


def test_label_join_conflicts_and_unknowns(tmp_path):
  ds = ct.load_clinical_trials(_write(tmp_path))
  join = ds.info["label_join"]
  assert join["conflict_ids"] == [_nct(1)] and join["conflicts"] == 1
  assert join["iqvia_both_ids"] == [_nct(4)] and join["iqvia_unknown"] == 1
  assert join["trialbench"] == 3 and join["iqvia_only"] == 2
  assert join["both_sources_agree"] == 1
  label = dict(zip(ds.info["row_trials"].tolist(), ds.labels.tolist()))
  # TrialBench wins the conflict; a single known IQVIA label survives an
  # unknown one; unknown, contradictory and unlabelled trials are dropped.
  assert label == {_nct(1): 1, _nct(2): 1, _nct(5): 0, _nct(6): 0, _nct(8): 1}
  assert ds.info["rows_by_label_source"] == {"trialbench": 4, "iqvia": 2}
  assert ds.info["rows_by_trialbench_phase"] == {"phase1": 2, "phase2": 2}
  assert (ds.n_rows, ds.n_items, ds.n_users) == (6, 2, 2)
  assert ds.item_raw[0] == {"name": "Drug 1 hydrochloride",
                            "drugbank id": "DB00001"}
  # "hydrochloride" and "drug" are shared by both drugs; the digit is not.
  assert (ds.item_fields["name"] > 0).sum(1).tolist() == [2, 2]
  assert (ds.user_fields["name"] > 0).sum(1).tolist() == [2, 2]


def test_join_labels_alone():
  labels, stats = ct_files.join_labels({"A": 1, "B": 0}, {
      "A": {0}, "B": {0, -1}, "C": {1, 1}, "D": {-1}, "E": {0, 1}})
  assert labels == {"A": (1, "trialbench"), "B": (0, "trialbench"),
                    "C": (1, "iqvia")}
  assert stats["conflict_ids"] == ["A"] and stats["both_sources_agree"] == 1
  assert stats["iqvia_both_ids"] == ["E"] and stats["iqvia_unknown"] == 1


def test_time_order_and_undated_trials(tmp_path):
  ds = ct.load_clinical_trials(_write(tmp_path))
  trials = ds.info["row_trials"].tolist()
  # 2 has a blank start and inherits 1's month (the nearest dated smaller
  # NCT number), after 1; 8 is not in the dates file and inherits 7's month,
  # though 7 itself has no label.
  assert trials == [_nct(5), _nct(1), _nct(1), _nct(2), _nct(6), _nct(8)]
  np.testing.assert_array_equal(ds.times, [
      _month(1994, 7), _month(1999, 3), _month(1999, 3), _month(1999, 3),
      _month(2000, 1), _month(2001, 2)])
  assert ds.info["undated_trials"] == 2 and ds.info["undated_rows"] == 2
  # The protocol orders a drug's rows by (time, row index): NCT order here.
  groups = protocol.rows_by_item(ds.items, ds.times, ds.n_items)
  assert [trials[i] for i in groups[0]] == [_nct(5), _nct(1), _nct(1)]
  dropped = ct.load_clinical_trials(tmp_path, undated="drop")
  assert dropped.info["row_trials"].tolist() == [_nct(5), _nct(1), _nct(1),
                                                 _nct(6)]
  assert dropped.info["undated_rows_dropped"] == 2
  with pytest.raises(ValueError, match="undated='last'"):
    ct.load_clinical_trials(tmp_path, undated="last")


def _rows(spec: dict[str, list[str]]) -> list[tuple]:
  """(month, nct, drug, disease) rows in reader order from drug -> trials."""
  rows = []
  for drug, trials in spec.items():
    for j, nct in enumerate(trials):
      rows.append((int(nct[1:]), nct, drug, f"D{j}"))
  return sorted(rows)


def _test_row_leaks(rows: list[tuple], n_max: int, k: int) -> list[tuple]:
  """Test rows whose trial has a warm row of the drug or an old drug's row."""
  by_drug = collections.defaultdict(list)
  for r in rows:
    by_drug[r[2]].append(r)
  old = {r[1] for rs in by_drug.values() if len(rs) > n_max for r in rs}
  leaks = []
  for rs in by_drug.values():
    if 3 * k <= len(rs) <= n_max:
      warm = {r[1] for r in rs[:3 * k]}
      leaks += [r for r in rs[3 * k:] if r[1] in warm or r[1] in old]
  return leaks


def test_guard_drops_straddling_and_combination_rows():
  # N=6, K=1.  Emerging A's trial T3 has two diseases across its 3K=3
  # boundary (so has old C's T12), and A's test trial T4 is also run with old
  # drug B; B then has 6 rows and becomes emerging, so old C loses its row of
  # B's test trial T9.
  rows = _rows({"A": ["T1", "T2", "T3", "T3", "T4"],
                "B": ["T4", "T5", "T6", "T7", "T8", "T9", "T10"],
                "C": ["T9", "T11", "T12", "T12", "T14", "T15", "T16", "T17",
                      "T18"]})
  assert _test_row_leaks(rows, 6, 1)
  kept, stats = ct.guard_trials(rows, 6, 1)
  assert _test_row_leaks(kept, 6, 1) == []
  assert stats == {"straddling_rows_dropped": 2,
                   "combination_rows_dropped": 2, "passes": 3}
  assert sorted(set(rows) - set(kept)) == [
      (3, "T3", "A", "D3"), (4, "T4", "B", "D0"), (9, "T9", "C", "D0"),
      (12, "T12", "C", "D3")]
  assert ct.guard_trials(rows, 0, 1) == (rows, {
      "straddling_rows_dropped": 0, "combination_rows_dropped": 0,
      "passes": 0})


@pytest.mark.parametrize("rel, bad, lineno, message", [
    (ct_files.MAPPING, f"{_nct(9)}\tDB1\tX\tDOID:1\tY", 11, "'DB1' is not a DrugBank"),
    (ct_files.MAPPING, f"{_nct(9)}\tDB00001\tX\t1\tY", 11, "'1' is not a Disease Ont"),
    (ct_files.MAPPING, f"{_nct(9)}\tDB00001\tX", 11, "expected 5 tab-separated"),
    (ct_files.MAPPING, "NCT9\tDB00001\tX\tDOID:1\tY", 11, "'NCT9' is not an NCT id"),
    ("trialbench/Phase3/train_y.csv", f"{_nct(9)},2", 2, "outcome '2' is not"),
    ("trialbench/Phase4/test_y.csv", f"{_nct(1)},0", 2, "already labelled at"),
    (ct_files.IQVIA, f'{_nct(9)},"Completed, Maybe"', 10, "'Completed, Maybe' is not"),
    (ct_files.IQVIA, f"{_nct(9)},a,b", 10, "expected 2 comma-separated"),
    (ct_files.DATES, f"{_nct(9)}\tSpring 2001\t", 6, "'Spring 2001' is not"),
    (ct_files.DATES, f"{_nct(1)}\tMay 2001\t", 6, "has a second line"),
    (ct_files.OUTCOME_MAP, "Completed, Maybe\t2", 6, "with label 1, 0 or -1"),
])
def test_malformed_rows_name_file_and_line(tmp_path, rel, bad, lineno, message):
  _write(tmp_path, {rel: [bad]})
  with pytest.raises(dataset.DataError) as e:
    ct.load_clinical_trials(tmp_path)
  assert f"{tmp_path / rel}:{lineno}:" in str(e.value)
  assert message in str(e.value)


def test_bad_header_and_missing_files(tmp_path):
  _write(tmp_path)
  path = tmp_path / ct_files.MAPPING
  path.write_text("nct_id\tcompound_id\nNCT00000001\tDB00001\n")
  with pytest.raises(dataset.DataError, match=f"{path}:1: header"):
    ct.load_clinical_trials(tmp_path)
  (tmp_path / ct_files.DATES).unlink()
  with pytest.raises(dataset.DataError, match=ct_files.DATES):
    ct.load_clinical_trials(tmp_path)


# --- the real files -------------------------------------------------------

CONFIG = ct_config.get_config()
N, K = CONFIG.data.n_max, CONFIG.data.k


def _real_folder() -> pathlib.Path:
  data_dir = os.environ.get("EMERFLOW_DATA_DIR")
  folder = pathlib.Path(data_dir or "", "clinical-trials")
  if not data_dir or not folder.is_dir():
    pytest.skip("no clinical-trials/ folder in $EMERFLOW_DATA_DIR")
  return folder


@pytest.fixture(scope="module")
def unguarded():
  return ct.load_clinical_trials(_real_folder())


@pytest.fixture(scope="module")
def guarded():
  return ct.load_clinical_trials(_real_folder(), **CONFIG.data.options)


def test_real_join_counts(unguarded):
  ds = unguarded
  assert (ds.n_rows, ds.n_items, ds.n_users) == (16057, 582, 115)
  assert len(set(ds.info["row_trials"].tolist())) == 8423
  join = ds.info["label_join"]
  assert (join["trialbench"], join["iqvia_only"]) == (7411, 1012)
  assert (join["both_sources_agree"], join["conflicts"]) == (6015, 39)
  assert (join["iqvia_both"], join["iqvia_unknown"]) == (2, 3350)
  assert ds.info["rows_by_label_source"] == {"trialbench": 14113, "iqvia": 1944}
  assert ds.info["undated_trials"] == 2181 and ds.info["undated_rows"] == 3995
  assert round(float(ds.labels.mean()), 3) == 0.430
  assert np.all(np.diff(ds.times) >= 0)  # stored in time order
  years = ds.times // 12
  assert (years.min(), years.max()) == (1993, 2017)
  # One row per (trial, drug, disease).
  keys = set(zip(ds.info["row_trials"].tolist(), ds.items.tolist(),
                 ds.users.tolist()))
  assert len(keys) == ds.n_rows


def test_real_repeated_pairs(unguarded):
  # The config's evidence for keeping a repeated pair as a new row.
  ds = unguarded
  seen, last = set(), {}
  agree = repeats = 0
  for nct, d, u, y in zip(ds.info["row_trials"].tolist(), ds.items.tolist(),
                          ds.users.tolist(), ds.labels.tolist()):
    if (d, u) in last and last[(d, u)][0] != nct:
      repeats += 1
      agree += last[(d, u)][1] == y
    last[(d, u)] = (nct, y)
    seen.add((d, u))
  assert len(seen) == 2688 and repeats == 13369
  assert round(agree / repeats, 3) == 0.568


def test_real_split_counts_and_no_same_trial_leak(guarded):
  ds = guarded
  assert (ds.n_rows, ds.n_items, ds.n_users) == (15074, 582, 115)
  assert ds.info["guard"] == {"straddling_rows_dropped": 31,
                              "combination_rows_dropped": 952, "passes": 4,
                              "n_max": N, "k": K}
  split = protocol.split_emerging_items(ds, N, K)
  assert split.counts() == {
      "old_items": 73, "emerging_items": 159, "base_rows": 10921,
      "test_rows": 1711, "warm_a_rows": 477, "warm_b_rows": 477,
      "warm_c_rows": 477}
  assert len(set(split.test_owner.tolist())) == 139
  trials = ds.info["row_trials"]
  base = set(trials[split.base_rows].tolist())
  groups = protocol.rows_by_item(ds.items, ds.times, ds.n_items)
  for g in groups:  # no drug's trial straddles its 3K boundary
    if len(g) > 3 * K:
      assert not set(trials[g[:3 * K]]) & set(trials[g[3 * K:]])
  for j in range(len(split.emerging_items)):
    warm = {t for p in protocol.WARM_PHASES
            for t in trials[split.warm_rows[p][j]].tolist()}
    test = set(trials[split.test_rows[split.test_owner == j]].tolist())
    assert not test & warm and not test & base
