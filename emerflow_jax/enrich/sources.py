"""Importers of public, already generated LLM item text (DESIGN §2, "Import").

Two sets of LLM text exist for MovieLens-1M movies, both keyed by ML-1M movie
id (see each folder's SOURCE.md in the data directory for origin and terms):
  * Agent4Rec (SIGIR 2024): one ChatGPT-3.5 summary per movie, all 3,883;
  * GAL-KARS: LLaMA-3 attribute values (genre, kind of plot, setting, ...)
    for 2,800 movies, already serialized as ``name: content`` pairs.

ML-1M items use the ids directly. ML-100K items are matched to ML-1M movies by
normalised title and year: articles moved back to the front ("Lion King,
The"), alternate titles in parentheses tried as well, accents folded; a year
off by one is accepted only when it gives a single candidate.
"""

from __future__ import annotations

import csv
import pathlib
import re
import unicodedata
from typing import Any

from emerflow_jax.data import dataset, paths
from emerflow_jax.enrich import common

AGENT4REC_FILE = "ml1m-llm-summaries-agent4rec/movies_augmentation.csv"
GALKARS_FILE = "ml1m-llm-attributes-galkars/derived_llm_item_text_by_ml_id.tsv"
ML1M_MOVIES = "movielens-1m/movies.dat"
SOURCE_FILES = {"agent4rec": AGENT4REC_FILE, "galkars": GALKARS_FILE}

_ARTICLES = ("the", "a", "an", "les", "la", "le", "l'", "il", "el", "der",
             "die", "das", "det", "den", "lo", "los", "las", "une", "un", "i")
_TRAILING_ARTICLE = re.compile(
    r"^(.*),\s*(" + "|".join(re.escape(a) for a in _ARTICLES) + r")$")
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _fold(text: str) -> str:
  text = unicodedata.normalize("NFKD", text)
  return "".join(c for c in text if not unicodedata.combining(c)).lower()


def _words(text: str) -> str:
  text = text.replace("&", " and ")
  return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _front_article(title: str) -> str:
  m = _TRAILING_ARTICLE.match(title.strip())
  if not m:
    return title.strip()
  article = m.group(2)
  return f"{article}{'' if article.endswith(chr(39)) else ' '}{m.group(1)}"


def title_keys(title: str, loose: bool = False) -> set[str]:
  """Normalised forms under which a title (without its year) can match.

  "Horseman on the Roof, The (Hussard sur le toit, Le)" gives
  {"the horseman on the roof", "le hussard sur le toit", ...}. ``loose`` adds
  the parts around ": " and " - " ("Star Wars: Episode V - The Empire Strikes
  Back" also gives "star wars" and "the empire strikes back") and the form
  without spaces ("Alien³" vs "Alien 3").

  Args:
    title: a movie title without its year.
    loose: add the part and space-free forms too.

  Returns:
    The keys: accent-folded, lower-case words joined by single spaces (and,
    with ``loose``, also without spaces).
  """
  title = _fold(title)
  main = title.split(" (", 1)[0]
  alts = [a for group in re.findall(r"\(([^()]*)\)", title)
          for a in re.split(r",?\s*a\.?k\.?a\.?\s+", group)]
  forms = [main, title] + alts
  if loose:
    forms += [p for f in forms for p in re.split(r":\s+|\s+-\s+", f)]
  keys = set()
  for t in forms:
    for form in (_front_article(t), t):
      w = _words(form)
      if not w:
        continue
      keys.add(w)
      first, _, rest = w.partition(" ")
      if rest and first in _ARTICLES:
        keys.add(rest)  # "the postman" also matches "postman"
      if loose:
        keys.add(w.replace(" ", ""))
  return keys


def read_ml1m_movies(data_dir: pathlib.Path) -> dict[str, tuple[str, str]]:
  """ML-1M movie id -> (title without year, year) from movies.dat (latin-1)."""
  path = data_dir / ML1M_MOVIES
  paths.require_files(path.parent, [path.name])
  movies = {}
  with open(path, encoding="latin-1") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line:
        continue
      parts = line.split("::")
      if len(parts) != 3:
        raise dataset.DataError(f"{path}:{lineno}: expected 3 '::' fields")
      m = _YEAR.search(parts[1])
      title = parts[1][:m.start()].strip() if m else parts[1].strip()
      movies[parts[0]] = (title, m.group(1) if m else "")
  return movies


def read_agent4rec(data_dir: pathlib.Path) -> dict[str, dict[str, str]]:
  """ML-1M id -> {"summary": text}.

  Only the summary is kept: the CSV's title has mojibake for 50 movies (the
  dataset's own title is used instead) and its 0-10 "rating" is an LLM guess
  with refusal texts in 20 rows.
  """
  path = data_dir / AGENT4REC_FILE
  paths.require_files(path.parent, [path.name])
  out = {}
  with open(path, encoding="utf-8", newline="") as f:
    for lineno, row in enumerate(csv.DictReader(f), 2):
      key, summary = (row.get("movie_id") or "").strip(), (row.get("summary") or "")
      if not key.isdigit():
        raise dataset.DataError(f"{path}:{lineno}: bad movie_id {key!r}")
      if summary.strip():
        out[key] = {"summary": " ".join(summary.split())}
  return out


def read_galkars(data_dir: pathlib.Path) -> dict[str, dict[str, str]]:
  """ML-1M id -> {attribute: values} parsed from the derived text file."""
  path = data_dir / GALKARS_FILE
  paths.require_files(path.parent, [path.name])
  out = {}
  with open(path, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    if header != ["ml_movie_id", "ml_title", "text"]:
      raise dataset.DataError(f"{path}:1: unexpected header {header}")
    for lineno, line in enumerate(f, 2):
      parts = line.rstrip("\n").split("\t")
      if len(parts) != 3 or not parts[0].isdigit():
        raise dataset.DataError(f"{path}:{lineno}: expected id, title, text")
      attrs = common.parse_serialized(parts[2])
      if attrs:
        out[parts[0]] = attrs
  return out


def match_ml1m(ds: dataset.Dataset, ml1m: dict[str, tuple[str, str]]
               ) -> tuple[dict[str, str], dict[str, int]]:
  """Maps the dataset's item keys to ML-1M movie ids.

  ML-1M itself matches by id; another movie dataset by title and year, in
  passes (exact title, loose title, year +-1) where the first with exactly
  one candidate decides.

  Args:
    ds: the dataset (movie items with "title" and "year" raw features).
    ml1m: ML-1M movie id -> (title, year), from ``read_ml1m_movies``.

  Returns:
    (item key -> ML-1M id, counts {"items", "exact", "loose", "year_pm1",
    "ambiguous", "unmatched"}).

  Raises:
    dataset.DataError: the dataset's items are not movies.
  """
  keys = [str(k) for k in ds.item_keys.tolist()]
  if ds.name == "movielens1m":
    matched = {k: k for k in keys if k in ml1m}
    return matched, {"items": len(keys), "exact": len(matched), "loose": 0,
                     "year_pm1": 0, "ambiguous": 0,
                     "unmatched": len(keys) - len(matched)}
  if ds.item_type != "movie":
    raise dataset.DataError(f"{ds.name}: ML-1M texts only cover movies, not "
                            f"{ds.item_type!r} items")
  indexes = ({}, {})  # strict, loose: (title key, year) -> ML-1M ids
  for mid, (title, year) in ml1m.items():
    for index, loose in zip(indexes, (False, True)):
      for t in title_keys(title, loose):
        index.setdefault((t, year), set()).add(mid)

  def lookup(title: str, years: list[str], loose: bool) -> set[str]:
    found: set[str] = set()
    for t in title_keys(title, loose):
      for y in years:
        found |= indexes[loose].get((t, y), set())
    return found

  # Strict before loose, exact year before +-1: the first pass with exactly
  # one candidate decides, so a loose key never overrides an exact title.
  passes = (("exact", False, 0), ("loose", True, 0), ("year_pm1", False, 1))
  matched: dict[str, str] = {}
  counts = {"items": len(keys), "exact": 0, "loose": 0, "year_pm1": 0,
            "ambiguous": 0, "unmatched": 0}
  for key, raw in zip(keys, ds.item_raw):
    title, year = raw.get("title", ""), raw.get("year", "")
    ambiguous = False
    for kind, loose, delta in passes if year.isdigit() else ():
      years = ([year] if not delta else
               [str(int(year) - delta), str(int(year) + delta)])
      found = lookup(title, years, loose)
      if len(found) == 1:
        matched[key] = found.pop()
        counts[kind] += 1
        break
      ambiguous |= len(found) > 1
    else:
      counts["ambiguous" if ambiguous else "unmatched"] += 1
  return matched, counts


def import_texts(ds: dataset.Dataset, source: str, data_dir: str | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Builds text records for ``ds`` items from an imported source.

  Each record's text is the dataset's own raw features followed by the
  imported LLM features, as ``name: content`` pairs. Items without a match
  get no record (the loader falls back to their raw serialization).

  Args:
    ds: a MovieLens dataset (movielens100k or movielens1m).
    source: "agent4rec" or "galkars".
    data_dir: data directory (default: the DESIGN §1 rule).

  Returns:
    (records, manifest fields with the match counts and rate).
  """
  if source not in SOURCE_FILES:
    raise dataset.DataError(f"unknown import source {source!r}; known: "
                            f"{sorted(SOURCE_FILES)}")
  root = paths.resolve_data_dir(data_dir)
  texts = read_agent4rec(root) if source == "agent4rec" else read_galkars(root)
  matched, counts = match_ml1m(ds, read_ml1m_movies(root))
  records = []
  for key, raw in zip([str(k) for k in ds.item_keys.tolist()], ds.item_raw):
    mid = matched.get(key)
    if mid is None or mid not in texts:
      continue
    records.append({"key": key, "ml1m_id": mid, "features": texts[mid],
                    "text": common.serialize(raw, texts[mid])})
  fields = {"source": source, "source_file": SOURCE_FILES[source],
            "source_sha256": common.file_sha256(root / SOURCE_FILES[source]),
            "ml1m_match": counts, "n_with_text": len(records),
            "match_rate": round(len(matched) / max(len(ds.item_raw), 1), 4),
            "text_rate": round(len(records) / max(len(ds.item_raw), 1), 4)}
  return records, fields
