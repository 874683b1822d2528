"""The on-disk enrichment store: one directory per (dataset, source, encoder).

Layout (DESIGN §2):
  manifest.json   source, model id + sha256, prompt version, encoder, dim,
                  item count, n_fallback_raw, created, ...
  texts.jsonl     one JSON record per item: {"key", "features", "text", ...}
  vectors.npy     [n_items, D] float32 encoded texts
  item_keys.npy   [n_items] str, row i of vectors.npy belongs to item_keys[i]

Crash safety: texts.jsonl only grows, one fsync'd record at a time, so a run
killed at any point leaves every finished record intact plus at most one torn
last line, which ``read_records`` detects (no trailing newline) and drops. All
other files are written to a temporary name, fsync'd and renamed, so they are
either the old or the new version, never half of one.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from emerflow_jax.data import dataset

MANIFEST = "manifest.json"
TEXTS = "texts.jsonl"
VECTORS = "vectors.npy"
KEYS = "item_keys.npy"


class StoreError(dataset.DataError):
  """An enrichment store is missing, inconsistent or made with other settings."""


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(folder: pathlib.Path) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a fsync'd temporary file and a rename.

  Args:
    path: the file to write; its folder is created if missing.
    data: the file's bytes.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # A per-process temporary name: two runs filling the same cache store at
  # once must not write into each other's half-written file.
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


def read_manifest(store_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
  """The store's manifest, or None when the store has none yet."""
  path = pathlib.Path(store_dir, MANIFEST)
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise StoreError(f"{path}: not valid JSON ({e})") from None


def write_manifest(store_dir: str | os.PathLike[str],
                   manifest: dict[str, Any]) -> None:
  """Writes ``manifest`` as the store's manifest.json, atomically.

  Args:
    store_dir: the store directory (created if missing).
    manifest: the manifest, JSON-serialisable; keys are written sorted.
  """
  write_atomic(pathlib.Path(store_dir, MANIFEST),
               (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def check_manifest(store_dir: str | os.PathLike[str], manifest: dict[str, Any],
                   expected: dict[str, Any]) -> None:
  """Raises StoreError when a manifest field differs from ``expected``.

  Args:
    store_dir: the store directory (named in the error).
    manifest: the store's manifest.
    expected: field -> required value; a missing field counts as None.
  """
  for field, want in expected.items():
    got = manifest.get(field)
    if got != want:
      raise StoreError(
          f"store {store_dir}: manifest {field} is {got!r} but {want!r} was "
          "requested; use another --out directory or delete this store")


def append_records(path: str | os.PathLike[str],
                   records: Iterable[dict[str, Any]]) -> int:
  """Appends records as JSON lines, each flushed and fsync'd before the next.

  Args:
    path: the JSON-lines file (created if missing).
    records: the records, each written with sorted keys on one line.

  Returns:
    The number of records written.
  """
  n = 0
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
      n += 1
  return n


def read_records(path: str | os.PathLike[str], repair: bool = False
                 ) -> list[dict[str, Any]]:
  """Reads a JSON-lines record file written by ``append_records``.

  A last line without its newline is the torn write of a killed run: it is
  dropped, and with ``repair`` the file is truncated to its last full line so
  the next append starts clean. Any other bad line, a record without "key", or
  a key seen twice raises StoreError naming the file, line and item.

  Args:
    path: the JSON-lines file.
    repair: truncate a torn last line from the file, not only skip it.

  Returns:
    The records in file order ([] when the file does not exist).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  blob = path.read_bytes()
  end = blob.rfind(b"\n") + 1
  if end < len(blob) and repair:
    with open(path, "r+b") as f:
      f.truncate(end)
      f.flush()
      os.fsync(f.fileno())
  records, line_of = [], {}
  for lineno, line in enumerate(blob[:end].decode("utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise StoreError(f"{path}:{lineno}: not valid JSON ({e})") from None
    key = record.get("key") if isinstance(record, dict) else None
    if key is None:
      raise StoreError(f"{path}:{lineno}: record has no 'key'")
    if key in line_of:
      raise StoreError(f"{path}:{lineno}: duplicate item {key!r} (first at line "
                       f"{line_of[key]})")
    line_of[key] = lineno
    records.append(record)
  return records


def write_vectors(store_dir: str | os.PathLike[str], keys: Sequence[str],
                  vectors: np.ndarray) -> None:
  """Writes vectors.npy and item_keys.npy (validated first, then atomically).

  Args:
    store_dir: the store directory (must exist).
    keys: [n] item keys; row i of ``vectors`` belongs to keys[i].
    vectors: [n, D] vectors, stored as float32.
  """
  store_dir = pathlib.Path(store_dir)
  vectors = np.asarray(vectors, np.float32)
  keys_arr = np.asarray([str(k) for k in keys])
  validate_vectors(store_dir, keys_arr, vectors)
  for name, arr in ((VECTORS, vectors), (KEYS, keys_arr)):
    tmp = store_dir / f"{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, arr, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, store_dir / name)
  _fsync_dir(store_dir)


def validate_vectors(store_dir: pathlib.Path, keys: np.ndarray,
                     vectors: np.ndarray, dim: int | None = None) -> None:
  """Raises StoreError on shape, duplicate-key or NaN/inf problems.

  Args:
    store_dir: the store directory (named in the error).
    keys: [n] item keys.
    vectors: [n, D] vectors.
    dim: when given, the required D.
  """
  if vectors.ndim != 2 or vectors.shape[0] != len(keys):
    raise StoreError(f"store {store_dir}: vectors have shape {vectors.shape} for "
                     f"{len(keys)} item keys")
  if dim is not None and vectors.shape[1] != dim:
    raise StoreError(f"store {store_dir}: vectors have dimension "
                     f"{vectors.shape[1]}, want {dim}")
  _, first, counts = np.unique(keys, return_index=True, return_counts=True)
  if (counts > 1).any():
    dup = str(keys[first[np.argmax(counts > 1)]])
    raise StoreError(f"store {store_dir}: duplicate item {dup!r} in {KEYS}")
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    bad_key = str(keys[np.argmax(bad)])
    raise StoreError(f"store {store_dir}: item {bad_key!r} has NaN or inf in "
                     "its vector")


def load_vectors(store_dir: str | os.PathLike[str], keys: Sequence[str],
                 encoder: str | None = None, dim: int | None = None
                 ) -> np.ndarray:
  """Loads the store's vectors for ``keys``, validating everything.

  Args:
    store_dir: the store directory.
    keys: [n] item keys wanted, in the order of the returned rows.
    encoder: when given, the manifest's "encoder" must equal it.
    dim: when given, the vector dimension must equal it (and the manifest's).

  Returns:
    [n, D] float32, row i = vector of keys[i].

  Raises:
    StoreError: naming the store and, where it applies, the item.
  """
  store_dir = pathlib.Path(store_dir)
  manifest = read_manifest(store_dir)
  if manifest is None:
    raise StoreError(f"store {store_dir}: no {MANIFEST}")
  if encoder is not None:
    check_manifest(store_dir, manifest, {"encoder": encoder})
  for name in (VECTORS, KEYS):
    if not (store_dir / name).is_file():
      raise StoreError(f"store {store_dir}: no {name}; the texts were never "
                       "encoded")
  vectors = np.load(store_dir / VECTORS, allow_pickle=False)
  stored_keys = np.load(store_dir / KEYS, allow_pickle=False).astype(str)
  if dim is None:
    dim = manifest.get("dim")
  elif manifest.get("dim") not in (None, dim):
    raise StoreError(f"store {store_dir}: manifest dim {manifest.get('dim')}, "
                     f"want {dim}")
  validate_vectors(store_dir, stored_keys, vectors, dim)
  row = {k: i for i, k in enumerate(stored_keys.tolist())}
  missing = [str(k) for k in keys if str(k) not in row]
  if missing:
    raise StoreError(f"store {store_dir}: item {missing[0]!r} is missing "
                     f"({len(missing)} of {len(keys)} items missing)")
  return vectors[[row[str(k)] for k in keys]].astype(np.float32)
