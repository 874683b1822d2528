"""DisGeNET v7 curated gene–disease associations as an emerging-disease dataset.

Items are diseases (UMLS CUIs), users are genes (NCBI Entrez ids).  Every curated
gene–disease association is a positive row whose time is its ``YearInitial``,
the year of the first publication that reported it.  The file has no negatives,
so for each positive the reader samples ``neg_ratio`` genes that are NOT
associated with that disease (anywhere in the file, dated or not).  Sampling
happens once, here, from ``np.random.default_rng(neg_seed)``, so every method
sees the same rows and comparisons are paired.

Row order (the protocol orders rows by time, then by row index):
  * time = YearInitial (float); a negative copies the time of its positive so
    it falls into the same phase;
  * rows are stored sorted by (disease, year, file line), each positive
    immediately followed by its negatives, so equal years keep file order
    (ascending gene id) and a phase never separates a positive from its
    negatives except at a phase boundary.
Rows without a YearInitial (4,383) are dropped by default
(``missing_year="drop"``); ``"last"`` keeps them as the newest rows, at one year
after the latest dated row.

Features:
  * genes: ``user_id``, ``dsi`` and ``dpi`` (Disease Specificity / Pleiotropy
    Index) in ``n_buckets`` quantile buckets, missing -> 0;
  * diseases: ``item_id``, ``name`` (word tokens, words in < 2 names dropped),
    ``type`` (disease / phenotype / group), ``classes`` (MeSH disease classes,
    multi-hot padded sequence), ``semantic_type`` (UMLS);
  * ``item_raw`` (what an LLM is shown): name, type, classes (code and MeSH
    heading, e.g. "C04 Neoplasms"), semantic type.

The split (chosen from the degree distribution; experiments/configs/disgenet.py):
N = 100, K = 9.  With the defaults (drop undated rows, neg_ratio 1) every
disease has 2 x (its dated genes) rows, an even number, so with K odd an
emerging disease has at least 3K + 1 = 28 rows and never an empty test set.

| what | count |
|---|---|
| genes (users) | 9,703 |
| diseases (items) with a dated association | 10,665 |
| rows | 159,310 (79,655 positives + 79,655 negatives) |
| old diseases (> 100 rows, > 50 genes) | 313, 81,960 rows |
| emerging diseases (27..100 rows) | 651 |
| warm_a / warm_b / warm_c rows | 5,859 each (651 x 9) |
| test rows | 15,845 (per disease 1..73, median 21) |

These counts hold for neg_ratio = 1 only; another ratio changes every row count
and the K-parity argument above.

Negative-sampling caveat: with uniform negatives (the default) a gene's
popularity alone separates the labels (AUC 0.82 for "number of diseases of the
gene" as the score).  ``neg_sampling="degree"`` draws negatives in proportion to
each gene's number of positive rows, which brings that shortcut to 0.52, so the
item embedding has to carry the signal (base + DeepFM test AUC drops from
.72 -> .74 to .56 -> .60, cold -> warm_c).
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from emerflow_jax.data import dataset, paths

FILE = "curated_gene_disease_associations.tsv.gz"
COLUMNS = ("geneId", "geneSymbol", "DSI", "DPI", "diseaseId", "diseaseName",
           "diseaseType", "diseaseClass", "diseaseSemanticType", "score", "EI",
           "YearInitial", "YearFinal", "NofPmids", "NofSnps", "source")
NAME_LEN = 8
CLASS_LEN = 12
MIN_TOKEN_COUNT = 2
# Top-level MeSH disease categories as of the 2019-2020 MeSH trees that
# DisGeNET v7 used (C02/C03 had been folded into C01 by then).
MESH_CLASSES = {
    "C01": "Infections", "C04": "Neoplasms",
    "C05": "Musculoskeletal Diseases", "C06": "Digestive System Diseases",
    "C07": "Stomatognathic Diseases", "C08": "Respiratory Tract Diseases",
    "C09": "Otorhinolaryngologic Diseases", "C10": "Nervous System Diseases",
    "C11": "Eye Diseases", "C12": "Male Urogenital Diseases",
    "C13": "Female Urogenital Diseases and Pregnancy Complications",
    "C14": "Cardiovascular Diseases", "C15": "Hemic and Lymphatic Diseases",
    "C16": "Congenital, Hereditary, and Neonatal Diseases and Abnormalities",
    "C17": "Skin and Connective Tissue Diseases",
    "C18": "Nutritional and Metabolic Diseases",
    "C19": "Endocrine System Diseases", "C20": "Immune System Diseases",
    "C21": "Disorders of Environmental Origin", "C22": "Animal Diseases",
    "C23": "Pathological Conditions, Signs and Symptoms",
    "C24": "Occupational Diseases", "C25": "Chemically-Induced Disorders",
    "C26": "Wounds and Injuries", "F01": "Behavior and Behavior Mechanisms",
    "F03": "Mental Disorders",
}
# The columns the reader uses (the others are checked for count only).
USED = ("geneId", "DSI", "DPI", "diseaseId", "diseaseName", "diseaseType",
        "diseaseClass", "diseaseSemanticType", "YearInitial")
MISSING_YEAR = ("drop", "last")
NEG_SAMPLING = ("uniform", "degree")


def describe_classes(codes: str) -> str:
  """'C04;C06' -> 'C04 Neoplasms; C06 Digestive System Diseases'."""
  out = []
  for code in filter(None, (c.strip() for c in codes.split(";"))):
    name = MESH_CLASSES.get(code)
    out.append(f"{code} {name}" if name else code)
  return "; ".join(out)


def _error(path: pathlib.Path, lineno: int, what: str) -> dataset.DataError:
  return dataset.DataError(f"{path}:{lineno}: {what}")


def _number(path: pathlib.Path, lineno: int, text: str, what: str,
            kind: type = int) -> int | float | None:
  """Parses a (space-padded) number; empty stays None."""
  text = text.strip()
  if not text:
    return None
  try:
    return kind(text)
  except ValueError:
    raise _error(path, lineno, f"{what} {text!r} is not "
                 f"{'an integer' if kind is int else 'a number'}") from None


def _read_rows(path: pathlib.Path) -> list[tuple[int, dict[str, str]]]:
  """Returns (line number, {used column: stripped text}) for every data line."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  if not lines:
    raise _error(path, 1, "empty file, expected a header line")
  header = [h.strip() for h in lines[0].split("\t")]
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise _error(path, 1, f"header lacks columns {missing}")
  cols = [(c, header.index(c)) for c in USED]
  out = []
  for lineno, line in enumerate(lines[1:], 2):
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) != len(header):
      raise _error(path, lineno, f"expected {len(header)} tab-separated fields, "
                   f"got {len(parts)}: {line[:80]!r}")
    out.append((lineno, {c: parts[j].strip() for c, j in cols}))
  return out


def sample_negatives(items: np.ndarray, known: list[np.ndarray], n_users: int,
                     ratio: int, rng: np.random.Generator,
                     weights: np.ndarray | None = None,
                     keys: np.ndarray | None = None) -> np.ndarray:
  """Draws ``ratio`` negative users per positive row, none a known positive.

  Each item's negatives are distinct users (drawn without replacement), so no
  (user, item) negative pair repeats.  Items are visited in index order and
  their positives in row order, so the result depends on the inputs and the
  generator state only.

  Args:
    items: [P] item index of each positive row.
    known: per item index, a sorted unique int array of users associated with
      it (the users a negative must avoid; a superset of the positive rows).
    n_users: number of users to draw from.
    ratio: negatives per positive.
    rng: the generator (consumed).
    weights: optional [n_users] non-negative sampling weights; None = uniform.
    keys: optional item names for error messages.

  Returns:
    [P, ratio] int64 negative user indices; row p belongs to positive p.
  """
  items = np.asarray(items)
  out = np.zeros((len(items), ratio), np.int64)
  if ratio == 0 or not len(items):
    return out
  order = np.argsort(items, kind="stable")
  bounds = np.searchsorted(items[order], np.arange(len(known) + 1))
  for i in np.flatnonzero(np.diff(bounds)):
    rows = order[bounds[i]:bounds[i + 1]]
    need = len(rows) * ratio
    pos = np.asarray(known[i], np.int64)
    name = f"item {keys[i] if keys is not None else i}"
    if weights is None:
      free = n_users - len(pos)
      if need > free:
        raise dataset.DataError(f"{name}: needs {need} negatives but only "
                                f"{free} users are not its positives")
      # The j-th user outside the sorted positives is j plus the number of
      # positives p_k with p_k - k <= j: a draw from the complement without
      # materialising it.
      idx = rng.choice(free, need, replace=False)
      draw = idx + np.searchsorted(pos - np.arange(len(pos)), idx, side="right")
    else:
      mask = np.ones(n_users, bool)
      mask[pos] = False
      cand = np.flatnonzero(mask & (weights > 0))
      if need > len(cand):
        raise dataset.DataError(f"{name}: needs {need} negatives but only "
                                f"{len(cand)} users with weight > 0 are free")
      # Efraimidis-Spirakis: the `need` largest log(u) / w are a weighted
      # draw without replacement, in O(users) instead of choice(p=...)'s loop.
      score = np.log(rng.random(len(cand))) / weights[cand]
      top = np.argpartition(-score, need - 1)[:need]
      draw = cand[top[np.argsort(-score[top], kind="stable")]]
    out[rows] = draw.reshape(len(rows), ratio)
  return out


def load_disgenet(folder: pathlib.Path, missing_year: str = "drop",
                  neg_ratio: int = 1, neg_seed: int = 0,
                  neg_sampling: str = "uniform",
                  n_buckets: int = 10) -> dataset.Dataset:
  """Reads the curated GDA file and builds the disease-as-item Dataset.

  Args:
    folder: directory holding ``curated_gene_disease_associations.tsv.gz``.
    missing_year: "drop" rows without YearInitial, or "last" = keep them as
      the newest rows (time = latest year + 1).
    neg_ratio: sampled negatives per positive.
    neg_seed: seed of the negative sampler.
    neg_sampling: "uniform" over non-associated genes, or "degree" =
      proportional to each gene's number of positive rows.
    n_buckets: quantile buckets for DSI and DPI.

  Returns:
    The validated Dataset (see the module docstring for the counts).
  """
  if missing_year not in MISSING_YEAR:
    raise ValueError(f"missing_year must be one of {MISSING_YEAR}, "
                     f"got {missing_year!r}")
  if neg_sampling not in NEG_SAMPLING:
    raise ValueError(f"neg_sampling must be one of {NEG_SAMPLING}, "
                     f"got {neg_sampling!r}")
  if neg_ratio < 0:
    raise ValueError(f"neg_ratio must be >= 0, got {neg_ratio}")
  folder = pathlib.Path(folder)
  paths.require_files(folder, [FILE], hint=(
      "Get the DisGeNET v7.0 curated gene-disease associations file "
      "(see third_party/README.md) and put it there."))
  path = folder / FILE
  genes: dict[int, dict[str, float | None]] = {}
  diseases: dict[str, dict[str, str]] = {}
  assoc = []  # (gene id, disease id, year or None, line)
  seen = set()
  duplicates = 0
  for lineno, r in _read_rows(path):
    gene = _number(path, lineno, r["geneId"], "geneId")
    if gene is None:
      raise _error(path, lineno, "empty geneId")
    year = _number(path, lineno, r["YearInitial"], "YearInitial")
    dsi = _number(path, lineno, r["DSI"], "DSI", float)
    dpi = _number(path, lineno, r["DPI"], "DPI", float)
    if not r["diseaseId"]:
      raise _error(path, lineno, "empty diseaseId")
    genes.setdefault(gene, {"dsi": dsi, "dpi": dpi})
    # Attributes are per disease in the file; the first line wins if not.
    diseases.setdefault(r["diseaseId"], {
        "name": r["diseaseName"], "type": r["diseaseType"],
        "classes": r["diseaseClass"], "semantic type": r["diseaseSemanticType"]})
    if (gene, r["diseaseId"]) in seen:
      duplicates += 1
      continue
    seen.add((gene, r["diseaseId"]))
    assoc.append((gene, r["diseaseId"], year, lineno))

  years = [a[2] for a in assoc if a[2] is not None]
  last_year = (max(years) if years else 0) + 1
  kept = [a for a in assoc if a[2] is not None or missing_year == "last"]
  gene_ids = sorted(genes)
  gidx = {g: i for i, g in enumerate(gene_ids)}
  disease_ids = sorted({a[1] for a in kept})
  didx = {d: i for i, d in enumerate(disease_ids)}
  # Known positives include undated and duplicate lines: a sampled negative
  # must never be a real association, dated or not.
  known_sets = [[] for _ in disease_ids]
  for gene, dis, _, _ in assoc:
    if dis in didx:
      known_sets[didx[dis]].append(gidx[gene])
  known = [np.unique(np.asarray(k, np.int64)) for k in known_sets]

  pos = np.asarray([(didx[d], gidx[g], last_year if y is None else y, n)
                    for g, d, y, n in kept], np.int64).reshape(-1, 4)
  pos = pos[np.lexsort((pos[:, 3], pos[:, 2], pos[:, 0]))]
  weights = None
  if neg_sampling == "degree":
    weights = np.bincount(pos[:, 1], minlength=len(gene_ids)).astype(np.float64)
  neg = sample_negatives(pos[:, 0], known, len(gene_ids), neg_ratio,
                         np.random.default_rng(neg_seed), weights,
                         keys=disease_ids)
  per = 1 + neg_ratio
  users = np.concatenate([pos[:, 1:2], neg], axis=1).reshape(-1)
  labels = np.zeros((len(pos), per), np.float32)
  labels[:, 0] = 1.0

  uf = {"user_id": np.arange(1, len(gene_ids) + 1, dtype=np.int32)}
  vocab = {"user/user_id": len(gene_ids) + 1}
  for f in ("dsi", "dpi"):
    vals = np.asarray([np.nan if genes[g][f] is None else genes[g][f]
                       for g in gene_ids])
    uf[f] = dataset.bucketize(vals, n_buckets)
    vocab[f"user/{f}"] = n_buckets + 1

  meta = [diseases[d] for d in disease_ids]
  itf = {"item_id": np.arange(1, len(disease_ids) + 1, dtype=np.int32)}
  vocab["item/item_id"] = len(disease_ids) + 1
  itf["name"], v = dataset.encode_sequences(
      [dataset.tokenize(m["name"]) for m in meta], NAME_LEN, MIN_TOKEN_COUNT)
  vocab["item/name"] = len(v) + 1
  itf["classes"], v = dataset.encode_sequences(
      [[c for c in m["classes"].split(";") if c] for m in meta], CLASS_LEN)
  vocab["item/classes"] = len(v) + 1
  for f, key in (("type", "type"), ("semantic_type", "semantic type")):
    itf[f], v = dataset.encode_categorical([m[key] for m in meta])
    vocab[f"item/{f}"] = len(v) + 1
  raw = [{"name": m["name"], "type": m["type"],
          "classes": describe_classes(m["classes"]),
          "semantic type": m["semantic type"]} for m in meta]

  info = {
      "file": FILE, "associations": len(assoc), "duplicate_lines": duplicates,
      "missing_year": missing_year,
      "missing_year_rows": len(assoc) - len(years),
      "dropped_missing_year": len(assoc) - len(kept),
      "missing_year_time": last_year if missing_year == "last" else None,
      "positives": int(len(pos)), "negatives": int(neg.size),
      "neg_ratio": neg_ratio, "neg_seed": neg_seed, "neg_sampling": neg_sampling,
      "genes": len(gene_ids), "diseases": len(disease_ids),
      "order": "time = YearInitial; ties by file line; each positive is "
               "followed by its negatives, which share its time",
  }
  return dataset.Dataset(
      name="disgenet", item_type="disease",
      users=users.astype(np.int32),
      items=np.repeat(pos[:, 0], per).astype(np.int32),
      labels=labels.reshape(-1),
      times=np.repeat(pos[:, 2], per).astype(np.float64),
      user_fields=uf, item_fields=itf, vocab_sizes=vocab,
      item_keys=np.asarray(disease_ids, dtype=str), item_raw=raw,
      info=info).validate()
