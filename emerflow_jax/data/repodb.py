"""repoDB drug–indication pairs as a new-drug (emerging-drug) dataset.

Items are drugs (DrugBank ids), users are indications (UMLS CUIs).  A pair is
positive (1) when the drug is approved for the indication (DrugCentral) and
negative (0) when a clinical trial of it failed: status Terminated, Withdrawn
or Suspended (ClinicalTrials.gov).  Any other status is an error.

Duplicate (drug, indication) pairs (863 extra lines: several failed trials of
one pair, or a failed trial of a pair that is also approved) become one row;
the label is 1 if any line is Approved, since approval is the final outcome of
the pair and an earlier failed trial does not undo it (21 such pairs).

There is no time axis: the file has no dates, and the NCT number orders only
the failed pairs.  Each drug's rows are therefore ordered by a fixed-seed
shuffle: ``times`` is a random permutation of 0..rows-1 drawn from
``np.random.default_rng(order_seed)``.  Warm phases and the test set are thus
random subsets of a drug's pairs, not a forecast of the future.

Features:
  * indications: ``user_id``, ``name`` (word tokens), ``semantic_type``;
  * drugs: ``item_id``, ``name`` (word tokens); ``item_raw`` = name, DrugBank
    id.  53 drug ids carry more than one name in the file (failed combination
    trials list a partner drug's name, some names are empty): a drug's name is
    its most frequent non-empty name, ties to the first seen.
Name words used by fewer than 2 drugs (indications) are dropped: a one-off word
is no better than an ID for an emerging drug.

The split (chosen from the degree distribution; experiments/configs/repodb.py):
N = 12, K = 2.  repoDB is small (median 2 indications per drug), so it cannot
give both ~300 old and ~200 emerging drugs; N = 12 keeps 260 emerging drugs,
of which 209 have test rows, at the cost of only 159 old drugs.  An emerging
drug with exactly 3K = 6 rows (51 drugs) has an empty test set; no K avoids
that here, because rows are not paired as in DisGeNET.

| what | count |
|---|---|
| indications (users) | 2,051 |
| drugs (items) | 1,571 |
| rows (unique pairs) | 9,937 (6,677 approved, 3,260 failed) |
| old drugs (> 12 rows) | 159, 5,396 rows |
| emerging drugs (6..12 rows) | 260 |
| warm_a / warm_b / warm_c rows | 520 each (260 x 2) |
| test rows | 650 (per drug 0..6, median 2) |

The labels lean on the indication: its approval rate among old drugs alone
scores 0.92 AUC on those test rows, so the item side has little room here.
"""

from __future__ import annotations

import collections
import csv
import pathlib

import numpy as np

from emerflow_jax.data import dataset, paths

FILE = "derived_repodb_full.csv"
COLUMNS = ("drug_name", "drug_id", "ind_name", "ind_id", "sem_type", "status",
           "phase", "DetailedStatus", "NCT")
LABELS = {"Approved": 1, "Terminated": 0, "Withdrawn": 0, "Suspended": 0}
DRUG_NAME_LEN = 4
IND_NAME_LEN = 8
MIN_TOKEN_COUNT = 2


def _error(path: pathlib.Path, lineno: int, what: str) -> dataset.DataError:
  return dataset.DataError(f"{path}:{lineno}: {what}")


def _read_rows(path: pathlib.Path) -> list[tuple[int, dict[str, str]]]:
  """Returns (line number, {column: text}) for every CSV record."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration:
      raise _error(path, 1, "empty file, expected a header line") from None
    except csv.Error as e:
      raise _error(path, 1, f"bad CSV: {e}") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
      raise _error(path, 1, f"header lacks columns {missing}")
    out = []
    try:
      for parts in reader:
        # line_num is the line where the record ends (quoted fields may span
        # lines), the line a person should look at.
        lineno = reader.line_num
        if not any(p.strip() for p in parts):
          continue
        if len(parts) != len(header):
          raise _error(path, lineno, f"expected {len(header)} comma-separated "
                       f"fields, got {len(parts)}: {','.join(parts)[:80]!r}")
        out.append((lineno, dict(zip(header, (p.strip() for p in parts)))))
    except csv.Error as e:
      raise _error(path, reader.line_num, f"bad CSV: {e}") from None
  return out


def _pick_name(names: collections.Counter) -> str:
  """Most frequent non-empty name; Counter keeps first-seen order for ties."""
  names = collections.Counter({n: c for n, c in names.items() if n})
  return names.most_common(1)[0][0] if names else ""


def load_repodb(folder: pathlib.Path, order_seed: int = 0) -> dataset.Dataset:
  """Reads ``derived_repodb_full.csv`` and builds the drug-as-item Dataset.

  Args:
    folder: directory holding ``derived_repodb_full.csv``.
    order_seed: seed of the shuffle that orders each drug's rows (there is no
      real time axis).

  Returns:
    The validated Dataset (see the module docstring for the counts).
  """
  folder = pathlib.Path(folder)
  paths.require_files(folder, [FILE], hint=(
      "Get repoDB (see third_party/README.md) and put the derived CSV there."))
  path = folder / FILE
  drug_names: dict[str, collections.Counter] = {}
  inds: dict[str, dict[str, str]] = {}
  pairs: dict[tuple[str, str], set[int]] = {}  # insertion order = first line
  lines = 0
  for lineno, r in _read_rows(path):
    lines += 1
    status = r["status"]
    if status not in LABELS:
      raise _error(path, lineno, f"status {status!r} is not one of "
                   f"{sorted(LABELS)}")
    drug, ind = r["drug_id"], r["ind_id"]
    if not drug or not ind:
      raise _error(path, lineno, "empty drug_id or ind_id")
    drug_names.setdefault(drug, collections.Counter())[r["drug_name"]] += 1
    inds.setdefault(ind, {"name": r["ind_name"], "sem_type": r["sem_type"]})
    pairs.setdefault((drug, ind), set()).add(LABELS[status])

  drug_ids = sorted(drug_names)
  ind_ids = sorted(inds)
  didx = {d: i for i, d in enumerate(drug_ids)}
  uidx = {u: i for i, u in enumerate(ind_ids)}
  keys = list(pairs)
  items = np.asarray([didx[d] for d, _ in keys], np.int32)
  users = np.asarray([uidx[u] for _, u in keys], np.int32)
  labels = np.asarray([max(pairs[k]) for k in keys], np.float32)
  # No dates exist: a seeded permutation is the only "time", and it orders
  # each drug's rows uniformly at random (and without ties).
  times = np.random.default_rng(order_seed).permutation(len(keys)).astype(np.float64)

  uf = {"user_id": np.arange(1, len(ind_ids) + 1, dtype=np.int32)}
  vocab = {"user/user_id": len(ind_ids) + 1}
  uf["name"], v = dataset.encode_sequences(
      [dataset.tokenize(inds[u]["name"]) for u in ind_ids], IND_NAME_LEN,
      MIN_TOKEN_COUNT)
  vocab["user/name"] = len(v) + 1
  uf["semantic_type"], v = dataset.encode_categorical(
      [inds[u]["sem_type"] for u in ind_ids])
  vocab["user/semantic_type"] = len(v) + 1

  names = [_pick_name(drug_names[d]) for d in drug_ids]
  itf = {"item_id": np.arange(1, len(drug_ids) + 1, dtype=np.int32)}
  vocab["item/item_id"] = len(drug_ids) + 1
  itf["name"], v = dataset.encode_sequences(
      [dataset.tokenize(n) for n in names], DRUG_NAME_LEN, MIN_TOKEN_COUNT)
  vocab["item/name"] = len(v) + 1
  raw = [{"name": n, "drugbank id": d} for n, d in zip(names, drug_ids)]

  info = {
      "file": FILE, "lines": lines, "pairs": len(keys),
      "duplicate_lines_merged": lines - len(keys),
      "approved_and_failed_pairs": sum(len(s) == 2 for s in pairs.values()),
      "drugs": len(drug_ids), "indications": len(ind_ids),
      "drugs_with_several_names": sum(len(c) > 1 for c in drug_names.values()),
      "order_seed": order_seed,
      "order": "no time axis: times are a seeded random permutation of rows",
      "duplicates": "one row per (drug, indication); label 1 if any line is "
                    "Approved",
  }
  return dataset.Dataset(
      name="repodb", item_type="drug", users=users, items=items, labels=labels,
      times=times, user_fields=uf, item_fields=itf, vocab_sizes=vocab,
      item_keys=np.asarray(drug_ids, dtype=str), item_raw=raw,
      info=info).validate()
