"""ClinicalTrials.gov trial outcomes as a new-drug dataset with a real time axis.

Items are drugs (DrugBank ids), users are diseases (Disease Ontology ids), one
row per (trial, drug, disease) of ``DrugBank-DO-slim.tsv`` whose trial has an
outcome label.  Unlike repoDB, a drug's first rows here are its first trials.

Label of a trial (NCT id): the TrialBench ``outcome`` when the trial is in any
``trialbench/PhaseN/{train,test}_y.csv``, else the IQVIA ``trialOutcome``
mapped through ``outcome2label.txt`` (1 / 0; -1 = unknown is dropped; an id
with several IQVIA rows keeps its single 0/1 label and is dropped when it has
both).  Where both sources label a trial and disagree, TrialBench wins; the
conflicts are logged and returned in ``info["label_join"]``.

Time is the trial's start month (``nctid_date.txt``).  NCT numbers are issued
in registration order (Spearman 0.935 with the start month), so a trial
without a start date takes its place in NCT-number order by default
(``undated="nct_order"``): it inherits the start month of the nearest trial
of ``nctid_date.txt`` that is dated and has a smaller NCT number.  ``undated="drop"`` drops it instead.  Ties
within a month are broken by NCT number: rows are stored in (month, NCT,
drug, disease) order and the protocol breaks equal times by row index.

Rows of one trial share one label (the trial's outcome).  The protocol cuts
by row position and knows nothing of trials, so given the split's N and K
(``guard_n_max``, ``guard_k``; the configs pass theirs) the reader drops the
rows through which a test row's own outcome would reach a model:
  * a trial with several diseases that straddles a drug's warm_c/test
    boundary (position 3K) loses its test-side rows: the warm row would hand
    the test row its label (old drugs are cut there too, by flow meta-tasks
    and the validation holdout);
  * a combination trial with a test row and rows of an old drug loses the old
    drug's rows: pretraining would see the test row's outcome through the
    disease (measured: the disease's pretraining positive rate scores .591
    test AUC with those rows, .584 without).
Rows of one trial with another *emerging* drug stay: the frozen backbone
never trains on warm rows, and warm-up refines each drug's own embedding
(CVAR also refits its shared CVAE on all warm rows: a weak channel, left
open).  The validation holdout is
drawn from old drugs at training time, so its combination trials are not
guarded (it only chooses).

A (drug, disease) pair tested again in a later trial stays a new row: it is a
new experiment with its own outcome, and an earlier outcome of the pair is
past information at that time (the measured evidence is in
experiments/configs/clinical_trials.py).

Features:
  * diseases: ``user_id`` (one per DOID), ``name`` (word tokens);
  * drugs: ``item_id`` (one per DrugBank id), ``name`` (word tokens);
    ``item_raw`` = name, DrugBank id (the repoDB prompt fields);
  name words used by fewer than 2 drugs (diseases) are dropped.
Trial phase is not a feature.  It is known when a trial starts (it is part of
the design a trial registers), so it would be fair row context, but the
Dataset holds only per-user and per-item tables and the backbones read only
those; a per-row field needs changes in dataset, tasks and models.  Its only
source here is the TrialBench folder, so "phase unknown" would also reveal an
IQVIA label.  Rows per TrialBench phase are counted in ``info``.

The files are read, checked and label-joined by ``clinical_trials_files``;
this module orders, guards and assembles the rows.  Counts are in
experiments/configs/clinical_trials.py and tested in
tests/test_clinical_trials.py.
"""

from __future__ import annotations

import bisect
import collections
import logging
import pathlib

import numpy as np

from emerflow_jax.data import clinical_trials_files as ct_files
from emerflow_jax.data import dataset, paths

UNDATED = ("nct_order", "drop")
DRUG_NAME_LEN = 4
DISEASE_NAME_LEN = 8
MIN_TOKEN_COUNT = 2


def trial_months(trials: list[str], dates: dict[str, int | None],
                 undated: str = "nct_order") -> dict[str, int]:
  """Start month per trial; undated trials by NCT order, or left out.

  Args:
    trials: NCT ids to date.
    dates: ``read_dates`` output; ids missing from it count as undated.
    undated: "nct_order" (inherit the month of the nearest dated trial of
      ``dates`` with a smaller NCT number, else of the first one) or "drop".

  Returns:
    NCT id -> month index, for the trials that keep a place in time.
  """
  if undated not in UNDATED:
    raise ValueError(f"undated={undated!r}, want one of {UNDATED}")
  out = {n: dates[n] for n in trials if dates.get(n) is not None}
  if undated == "drop":
    return out
  dated = sorted(n for n, m in dates.items() if m is not None)
  if not dated:
    raise dataset.DataError(f"{ct_files.DATES}: no trial has a start date")
  for n in trials:
    if n not in out:
      # Same-width ids ("NCT" + 8 digits) sort as their numbers do.
      i = bisect.bisect_left(dated, n)
      out[n] = dates[dated[max(i - 1, 0)]]
  return out


def guard_trials(rows: list[tuple], n_max: int, k: int
                 ) -> tuple[list[tuple], dict[str, int]]:
  """Drops rows until no test row shares its trial with a row a model learns.

  The protocol (DESIGN §1) cuts each drug's time order by position: drugs with
  more than N rows pretrain the backbone, and an emerging drug's rows from
  3K on are its test rows.  Rows of one trial share one label, so two leaks
  are possible, and both are removed here:
    * a trial straddling a drug's 3K boundary: its test-side rows are dropped
      (its warm rows stay: they were seen first).  This holds for old drugs
      too, whose 3K boundary flow meta-tasks and the validation holdout cut;
    * a trial with a test row and a row of an old drug (a combination trial):
      the old drug's rows of it are dropped, so pretraining never sees the
      outcome of a test row's own trial.
  Dropping rows can make an old drug emerging, so this repeats until nothing
  changes (it only drops, so it ends).

  Args:
    rows: (month, nct, drug, ...) tuples in (month, nct, drug, disease) order,
      so one drug's rows of one trial are contiguous.
    n_max: N of the split; 0 turns the guard off.
    k: K of the split.

  Returns:
    (kept rows in the same order, {"straddling_rows_dropped",
    "combination_rows_dropped", "passes"}).
  """
  stats = {"straddling_rows_dropped": 0, "combination_rows_dropped": 0,
           "passes": 0}
  if n_max <= 0:
    return rows, stats
  while True:
    stats["passes"] += 1
    by_drug: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(rows):
      by_drug[r[2]].append(i)
    straddle, test_trials = set(), set()
    for idx in by_drug.values():
      if len(idx) < 3 * k:
        continue
      # Old drugs too: their 3K boundary is where flow meta-tasks and the
      # validation holdout cut them.
      edge = rows[idx[3 * k - 1]][1]
      for i in idx[3 * k:]:
        if rows[i][1] == edge:
          straddle.add(i)
        elif len(idx) <= n_max:
          test_trials.add(rows[i][1])
    combo = {i for idx in by_drug.values() if len(idx) > n_max
             for i in idx if rows[i][1] in test_trials}
    if not straddle and not combo:
      return rows, stats
    stats["straddling_rows_dropped"] += len(straddle)
    stats["combination_rows_dropped"] += len(combo)
    rows = [r for i, r in enumerate(rows) if i not in straddle | combo]


def load_clinical_trials(folder: pathlib.Path, undated: str = "nct_order",
                         guard_n_max: int = 0, guard_k: int = 0
                         ) -> dataset.Dataset:
  """Reads the clinical-trials folder and builds the drug-as-item Dataset.

  Args:
    folder: directory holding the files of ``FILES`` (see its SOURCE.md).
    undated: trials without a start date: "nct_order" or "drop".
    guard_n_max: N of the split the rows will be cut by; with ``guard_k``
      (K) it drops the rows that would share a trial with a test row
      (``guard_trials``); 0 keeps every row.
    guard_k: K of that split.

  Returns:
    The validated Dataset; ``info`` holds the join and ordering counts.
  """
  folder = pathlib.Path(folder)
  paths.require_files(folder, list(ct_files.FILES), hint=(
      "Get the clinical-trials files (see third_party/README.md); they are "
      "not redistributed."))
  mapping = ct_files.read_mapping(folder / ct_files.MAPPING)
  tb = ct_files.read_trialbench(folder)
  iqvia = ct_files.read_iqvia(folder / ct_files.IQVIA,
                              ct_files.read_outcome_map(folder / ct_files.OUTCOME_MAP))
  # The join counts only the trials the mapping has rows for.
  in_mapping = {r[0] for r in mapping}
  labels, join = ct_files.join_labels(
      {n: y for n, (y, _) in tb.items() if n in in_mapping},
      {n: s for n, s in iqvia.items() if n in in_mapping})
  dates = ct_files.read_dates(folder / ct_files.DATES)

  labelled = [r for r in mapping if r[0] in labels]
  trials = sorted({r[0] for r in labelled})
  months = trial_months(trials, dates, undated)
  n_undated = sum(dates.get(n) is None for n in trials)
  # (month, nct, drug, disease, drug name, disease name), in time order.
  rows = sorted((months[n], n, d, u, dn, un) for n, d, dn, u, un in labelled
                if n in months)
  rows, guard = guard_trials(rows, guard_n_max, guard_k)

  drug_names = {r[2]: r[4] for r in reversed(rows)}  # first-seen name
  disease_names = {r[3]: r[5] for r in reversed(rows)}
  drug_ids, disease_ids = sorted(drug_names), sorted(disease_names)
  didx = {d: i for i, d in enumerate(drug_ids)}
  uidx = {u: i for i, u in enumerate(disease_ids)}
  items = np.asarray([didx[r[2]] for r in rows], np.int32)
  users = np.asarray([uidx[r[3]] for r in rows], np.int32)
  ys = np.asarray([labels[r[1]][0] for r in rows], np.float32)
  times = np.asarray([r[0] for r in rows], np.float64)

  uf = {"user_id": np.arange(1, len(disease_ids) + 1, dtype=np.int32)}
  vocab = {"user/user_id": len(disease_ids) + 1}
  uf["name"], v = dataset.encode_sequences(
      [dataset.tokenize(disease_names[u]) for u in disease_ids],
      DISEASE_NAME_LEN, MIN_TOKEN_COUNT)
  vocab["user/name"] = len(v) + 1
  names = [drug_names[d] for d in drug_ids]
  itf = {"item_id": np.arange(1, len(drug_ids) + 1, dtype=np.int32)}
  vocab["item/item_id"] = len(drug_ids) + 1
  itf["name"], v = dataset.encode_sequences(
      [dataset.tokenize(n) for n in names], DRUG_NAME_LEN, MIN_TOKEN_COUNT)
  vocab["item/name"] = len(v) + 1
  raw = [{"name": n, "drugbank id": d} for n, d in zip(names, drug_ids)]

  kept_trials = {r[1] for r in rows}
  info = {
      "mapping_rows": len(mapping), "labelled_rows": len(labelled),
      "rows": len(rows), "trials": len(kept_trials),
      "label_join": join,
      "rows_by_label_source": dict(collections.Counter(
          labels[r[1]][1] for r in rows)),
      "rows_by_trialbench_phase": {f"phase{p}": c for p, c in sorted(
          collections.Counter(tb[r[1]][1] for r in rows if r[1] in tb).items())},
      "undated": undated, "undated_trials": n_undated,
      "undated_rows": sum(dates.get(r[1]) is None for r in rows),
      "undated_rows_dropped": len(labelled) - sum(r[0] in months for r in labelled),
      "guard": dict(guard, n_max=guard_n_max, k=guard_k),
      "order": "start month, then NCT number (undated: " + undated + ")",
      # [n_rows] NCT id of each row: the trial grouping the protocol lacks.
      "row_trials": np.asarray([r[1] for r in rows], dtype=str),
  }
  logging.info("clinical_trials: %d rows, %d trials, %d drugs, %d diseases; "
               "labels %d TrialBench + %d IQVIA-only trials, %d conflicts "
               "(TrialBench wins: %s), %d IQVIA 0-and-1 dropped, %d IQVIA "
               "unknown dropped; %d undated trials (%d rows, %s); split guard "
               "N=%d K=%d: %d straddling and %d combination-trial rows "
               "dropped", len(rows),
               len(kept_trials), len(drug_ids), len(disease_ids),
               join["trialbench"], join["iqvia_only"], join["conflicts"],
               ",".join(join["conflict_ids"][:5]) + ("..." if join["conflicts"]
                                                     > 5 else ""),
               join["iqvia_both"], join["iqvia_unknown"], n_undated,
               info["undated_rows"], undated, guard_n_max, guard_k,
               guard["straddling_rows_dropped"],
               guard["combination_rows_dropped"])
  return dataset.Dataset(
      name="clinical_trials", item_type="drug", users=users, items=items,
      labels=ys, times=times, user_fields=uf, item_fields=itf,
      vocab_sizes=vocab, item_keys=np.asarray(drug_ids, dtype=str),
      item_raw=raw, info=info).validate()
