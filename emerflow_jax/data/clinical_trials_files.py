"""The clinical-trials files: one strict reader per file, and the label join.

Every reader checks its file's header, field count and id formats and raises
``dataset.DataError`` at ``path:line`` on the first bad record.  The files
(``FILES``) and what each holds:

- ``MAPPING`` (``DrugBank-DO-slim.tsv``): (trial, drug, disease) rows;
- ``TRIALBENCH``: the TrialBench outcome (0/1) of a trial, one file per
  phase and part;
- ``IQVIA`` with ``OUTCOME_MAP``: IQVIA's trialOutcome strings, mapped to
  1 / 0 / -1 (unknown);
- ``DATES``: each trial's start month.

``join_labels`` gives one label per trial (TrialBench first); the Dataset is
assembled in ``clinical_trials``.
"""

from __future__ import annotations

import collections
import csv
import pathlib
import re
from typing import Any

from emerflow_jax.data import dataset

MAPPING = "DrugBank-DO-slim.tsv"
MAPPING_COLUMNS = ("nct_id", "compound_id", "compound_name", "disease_id",
                   "disease_name")
DATES = "nctid_date.txt"
IQVIA = "trial_outcomes_v1.csv"
OUTCOME_MAP = "outcome2label.txt"
TRIALBENCH = tuple(f"trialbench/Phase{p}/{s}_y.csv" for p in (1, 2, 3, 4)
                   for s in ("train", "test"))
FILES = (MAPPING, DATES, IQVIA, OUTCOME_MAP) + TRIALBENCH

_NCT = re.compile(r"^NCT\d{8}$")
_DRUG = re.compile(r"^DB\d{5}$")
_DOID = re.compile(r"^DOID:\d+$")
_MONTHS = {m: i for i, m in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august",
     "september", "october", "november", "december"))}
# "March 1999" or "July 15, 1994"
_DATE = re.compile(r"^([A-Za-z]+)\s+(?:\d{1,2},\s*)?(\d{4})$")


def _error(path: pathlib.Path, lineno: int, what: str) -> dataset.DataError:
  return dataset.DataError(f"{path}:{lineno}: {what}")


def _records(path: pathlib.Path, delimiter: str):
  """Yields (line number, stripped fields) of non-blank records."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      for parts in reader:
        if any(p.strip() for p in parts):
          yield reader.line_num, [p.strip() for p in parts]
    except csv.Error as e:
      raise _error(path, reader.line_num, f"bad CSV: {e}") from None


def _check_nct(path: pathlib.Path, lineno: int, nct: str) -> str:
  if not _NCT.match(nct):
    raise _error(path, lineno, f"{nct!r} is not an NCT id (NCT + 8 digits)")
  return nct


def _nct_values(path: pathlib.Path, header_ok, header: str):
  """Yields (line number, NCT id, value) of a two-column CSV with a header.

  Args:
    path: the file.
    header_ok: fields of line 1 -> whether they are the expected header.
    header: the expected header, for the error message.
  """
  for lineno, parts in _records(path, ","):
    if lineno == 1:
      if len(parts) != 2 or not header_ok(parts):
        raise _error(path, 1, f"header {parts} is not {header}")
      continue
    if len(parts) != 2:
      raise _error(path, lineno, f"expected 2 comma-separated fields, got "
                   f"{len(parts)}: {','.join(parts)[:80]!r}")
    yield lineno, _check_nct(path, lineno, parts[0]), parts[1]


def read_mapping(path: pathlib.Path) -> list[tuple[str, str, str, str, str]]:
  """(nct, drug id, drug name, disease id, disease name) per mapping row."""
  rows = []
  for lineno, parts in _records(path, "\t"):
    if lineno == 1:
      if tuple(parts) != MAPPING_COLUMNS:
        raise _error(path, 1, f"header {parts} is not {list(MAPPING_COLUMNS)}")
      continue
    if len(parts) != len(MAPPING_COLUMNS):
      raise _error(path, lineno, f"expected {len(MAPPING_COLUMNS)} tab-separated"
                   f" fields, got {len(parts)}: {chr(9).join(parts)[:80]!r}")
    nct, drug, drug_name, disease, disease_name = parts
    _check_nct(path, lineno, nct)
    if not _DRUG.match(drug):
      raise _error(path, lineno, f"{drug!r} is not a DrugBank id (DB + 5 digits)")
    if not _DOID.match(disease):
      raise _error(path, lineno, f"{disease!r} is not a Disease Ontology id "
                   "(DOID:<digits>)")
    rows.append((nct, drug, drug_name, disease, disease_name))
  if not rows:
    raise _error(path, 1, "no data rows")
  return rows


def read_trialbench(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  """NCT id -> (TrialBench outcome 0/1, phase 1..4) over the 8 files."""
  out: dict[str, tuple[int, int]] = {}
  where: dict[str, str] = {}
  for rel in TRIALBENCH:
    path = folder / rel
    phase = int(rel.split("/")[1][len("Phase"):])
    for lineno, nct, value in _nct_values(path, lambda h: h[1:] == ["outcome"],
                                          "['', 'outcome']"):
      if value not in ("0", "1"):
        raise _error(path, lineno, f"outcome {value!r} is not 0 or 1")
      if nct in out:
        raise _error(path, lineno, f"{nct} is already labelled at {where[nct]}")
      out[nct], where[nct] = (int(value), phase), f"{path}:{lineno}"
  return out


def read_outcome_map(path: pathlib.Path) -> dict[str, int]:
  """IQVIA trialOutcome string -> 1, 0 or -1 (unknown)."""
  out = {}
  for lineno, parts in _records(path, "\t"):
    if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
      raise _error(path, lineno, "expected 'outcome<TAB>label' with label 1, 0 "
                   f"or -1, got {chr(9).join(parts)[:80]!r}")
    out[parts[0]] = int(parts[1])
  return out


def read_iqvia(path: pathlib.Path, outcome_map: dict[str, int]
               ) -> dict[str, set[int]]:
  """NCT id -> the set of its IQVIA labels (1, 0, -1) over all its rows.

  Args:
    path: the IQVIA outcomes file.
    outcome_map: IQVIA outcome text -> label (1, 0 or -1 for unknown).

  Returns:
    NCT id -> the set of its labels.
  """
  out: dict[str, set[int]] = collections.defaultdict(set)
  for lineno, nct, value in _nct_values(path, lambda h: h == ["studyid", "trialOutcome"],
                                        "['studyid', 'trialOutcome']"):
    if value not in outcome_map:
      raise _error(path, lineno, f"trialOutcome {value!r} is not in {OUTCOME_MAP}")
    out[nct].add(outcome_map[value])
  return dict(out)


def join_labels(trialbench: dict[str, int], iqvia: dict[str, set[int]]
                ) -> tuple[dict[str, tuple[int, str]], dict[str, Any]]:
  """One label per trial: TrialBench, else a single known IQVIA label.

  Args:
    trialbench: NCT id -> TrialBench outcome 0/1.
    iqvia: NCT id -> its IQVIA labels (1, 0 and -1 = unknown).

  Returns:
    (NCT id -> (label, "trialbench" | "iqvia"), stats): stats counts the
    trials labelled by each source, ``conflicts`` (both sources label the
    trial and disagree; TrialBench wins; with the NCT ids), ``iqvia_both``
    (IQVIA gives 0 and 1; dropped unless TrialBench labels it) and
    ``iqvia_unknown`` (IQVIA gives only -1; dropped likewise).
  """
  labels = {n: (y, "trialbench") for n, y in trialbench.items()}
  conflicts, both, unknown, agree = [], [], [], 0
  for nct in sorted(iqvia):
    known = iqvia[nct] - {-1}
    if nct in labels:
      if len(known) == 1:
        if known == {labels[nct][0]}:
          agree += 1
        else:
          conflicts.append(nct)
      continue
    if len(known) == 1:
      labels[nct] = (known.pop(), "iqvia")
    elif known:
      both.append(nct)
    else:
      unknown.append(nct)
  stats = {"trialbench": len(trialbench),
           "iqvia_only": sum(s == "iqvia" for _, s in labels.values()),
           "both_sources_agree": agree, "conflicts": len(conflicts),
           "conflict_ids": conflicts, "iqvia_both": len(both),
           "iqvia_both_ids": both, "iqvia_unknown": len(unknown)}
  return labels, stats


def read_dates(path: pathlib.Path) -> dict[str, int | None]:
  """NCT id -> start month index (12 * year + month - 1), None when blank."""
  out: dict[str, int | None] = {}
  for lineno, parts in _records(path, "\t"):
    if len(parts) not in (2, 3):
      raise _error(path, lineno, "expected 'nct<TAB>start<TAB>completion', got "
                   f"{len(parts)} fields: {chr(9).join(parts)[:80]!r}")
    nct = _check_nct(path, lineno, parts[0])
    if nct in out:
      raise _error(path, lineno, f"{nct} has a second line")
    if not parts[1]:
      out[nct] = None
      continue
    m = _DATE.match(parts[1])
    if not m or m.group(1).lower() not in _MONTHS:
      raise _error(path, lineno, f"start date {parts[1]!r} is not 'Month YYYY' "
                   "or 'Month D, YYYY'")
    out[nct] = 12 * int(m.group(2)) + _MONTHS[m.group(1).lower()]
  return out
