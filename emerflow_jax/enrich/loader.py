"""``load_item_vectors``: the one call training code makes for text vectors r_i.

Sources:
  * "llm": the SmolLM2 enrichment texts committed under ``precomputed/``
    (``<dataset>-smollm2.jsonl.gz``), encoded on first use;
  * "agent4rec" / "galkars": public LLM movie text imported from the data
    directory (``sources``), encoded on first use;
  * "raw": the serialization of the raw features only (the no-LLM ablation);
  * "dataset": ``ds.item_vectors`` as shipped with the dataset (synthetic).

Encoded vectors are cached as a store (see ``store``) under
``<cache_dir>/<dataset>-<source>-<encoder>-<texts sha>``, so a change of texts
or encoder weights gives a new store instead of a stale one. Items without a
text fall back to their raw serialization, counted in the manifest.

This module imports without torch: encoders load lazily, and only when a
cache store is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from emerflow_jax.data import dataset
from emerflow_jax.enrich import common, encode, pipeline, store

SOURCES = ("llm", "agent4rec", "galkars", "raw", "dataset")
STORE_SOURCES = ("llm", "agent4rec", "galkars", "raw")
PRECOMPUTED_DIR = pathlib.Path(__file__).resolve().parent / "precomputed"
DEFAULT_LLM_NAME = "smollm2"


def items_of(ds: dataset.Dataset) -> list[pipeline.Item]:
  """(key, raw features) per item, in item-index order."""
  return [(str(k), dict(r)) for k, r in zip(ds.item_keys.tolist(), ds.item_raw)]


def default_cache_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/emerflow_jax/enrich``, else ``~/.cache/emerflow_jax/enrich``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return pathlib.Path(base, "emerflow_jax", "enrich")


def precomputed_paths(dataset_name: str, llm_name: str = DEFAULT_LLM_NAME
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """(texts .jsonl.gz, manifest .json) of a committed precomputed set.

  Args:
    dataset_name: the dataset's name, e.g. "movielens1m".
    llm_name: the LLM's short name in the file names.

  Returns:
    (``<dataset>-<llm>.jsonl.gz``, ``<dataset>-<llm>.json``) under
    ``PRECOMPUTED_DIR``; they may not exist.
  """
  stem = f"{dataset_name}-{llm_name}"
  return PRECOMPUTED_DIR / f"{stem}.jsonl.gz", PRECOMPUTED_DIR / f"{stem}.json"


def read_precomputed(dataset_name: str, llm_name: str = DEFAULT_LLM_NAME
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Reads committed LLM texts and their manifest.

  Args:
    dataset_name: the dataset's name.
    llm_name: the LLM's short name in the file names.

  Returns:
    (records in file order, each with a unique "key", the manifest or {} if
    its file is missing).

  Raises:
    store.StoreError: nothing is committed for this dataset, or a line is bad.
  """
  texts_path, manifest_path = precomputed_paths(dataset_name, llm_name)
  if not texts_path.is_file():
    have = sorted(p.name for p in PRECOMPUTED_DIR.glob("*.jsonl.gz"))
    raise store.StoreError(
        f"no precomputed LLM texts for {dataset_name!r} ({texts_path.name} not "
        f"in {PRECOMPUTED_DIR}; have {have}). Generate them with "
        "`python -m experiments.enrich --source=llm`.")
  records, seen = [], set()
  with gzip.open(texts_path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise store.StoreError(f"{texts_path}:{lineno}: not valid JSON ({e})"
                               ) from None
      if record.get("key") in seen or "key" not in record:
        raise store.StoreError(f"{texts_path}:{lineno}: missing or duplicate "
                               f"item {record.get('key')!r}")
      seen.add(record["key"])
      records.append(record)
  manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
  return records, manifest


def source_records(ds: dataset.Dataset, source: str,
                   data_dir: str | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Text records and manifest fields of a non-generating source.

  Args:
    ds: the dataset.
    source: "llm" (committed texts), "agent4rec", "galkars" or "raw".
    data_dir: data directory for the importers (None: DESIGN §1 rule).

  Returns:
    (records with "key" and "text", fields for the store manifest).

  Raises:
    dataset.DataError: an unknown source.
  """
  if source == "llm":
    records, meta = read_precomputed(ds.name)
    fields = {k: meta.get(k) for k in ("model_id", "model_sha256",
                                       "prompt_version", "parser_version",
                                       "type_features", "max_new_tokens")}
    return records, dict(fields, source="llm", precomputed=f"{ds.name}-"
                         f"{DEFAULT_LLM_NAME}")
  if source in ("agent4rec", "galkars"):
    from emerflow_jax.enrich import sources  # pylint: disable=g-import-not-at-top
    return sources.import_texts(ds, source, data_dir)
  if source == "raw":
    return ([{"key": k, "features": {}, "text": common.serialize(raw, {})}
             for k, raw in items_of(ds)], {"source": "raw"})
  raise dataset.DataError(f"unknown enrichment source {source!r}; known: "
                          f"{SOURCES}")


def build_store(data_config: Any, source: str, out: str, encoder: str | None,
                llm: str | None = None, limit: int | None = None,
                threads: int | None = 1, batch_size: int = 16,
                max_new_tokens: int = 96, encode_vectors: bool = True,
                export_texts: str | None = None, device: str = "cpu"
                ) -> dict[str, Any]:
  """Writes the store of one dataset and source into ``out`` (the binary's job).

  For "llm" the texts are generated (resumably) with the local model
  ``llm``; other sources write their texts at once. Then all items are
  encoded unless ``encode_vectors`` is False.

  Args:
    data_config: the ``data`` config section (``data.load_dataset``).
    source: "llm", "agent4rec", "galkars" or "raw".
    out: the store directory.
    encoder: encoder spec for ``encode.resolve_encoder`` (None: MiniLM).
    llm: model spec for "llm" (``generate.resolve_model_path``).
    limit: generate at most this many new items (None: all).
    threads: torch threads for generation and encoding.
    batch_size: answers per ``generate`` call.
    max_new_tokens: cap per answer.
    encode_vectors: encode the texts into vectors after writing them.
    export_texts: if set, also write the texts in the committed compact form
      to this ``.jsonl.gz`` path (``pipeline.export_texts``).
    device: torch device for the LLM.

  Returns:
    The store manifest.
  """
  from emerflow_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.load_dataset(data_config)
  items = items_of(ds)
  if source == "llm":
    manifest = pipeline.generate_texts(
        items, ds.item_type, out, llm=llm, threads=threads,
        max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
        dataset_name=ds.name, device=device)
  else:
    records, fields = source_records(ds, source, data_config.get("dir"))
    pipeline.write_texts(out, records, dict(fields, dataset=ds.name))
    manifest = store.read_manifest(out)
  if export_texts:
    n = pipeline.export_texts(out, export_texts, items)
    logging.info("exported %d texts to %s", n, export_texts)
  if encode_vectors:
    manifest = pipeline.encode_store(out, items, encoder, threads=threads)
  return manifest


def texts_digest(items: list[pipeline.Item], texts: list[str]) -> str:
  """sha256 over (key, text) pairs in item order: it names a store's texts.

  Args:
    items: (key, raw features) per item.
    texts: [n] texts s_i, in the order of ``items``.

  Returns:
    The hex digest.
  """
  h = hashlib.sha256()
  for (key, _), text in zip(items, texts):
    h.update(f"{key}\t{text}\n".encode("utf-8"))
  return h.hexdigest()


def load_item_vectors(ds: dataset.Dataset, source: str,
                      encoder: str | None = encode.DEFAULT_ENCODER,
                      cache_dir: str | None = None, *,
                      data_dir: str | None = None) -> np.ndarray:
  """Text vectors r_i for every item of ``ds``.

  Args:
    ds: the dataset; row i of the result belongs to ``ds.item_keys[i]``.
    source: "llm", "agent4rec", "galkars", "raw" or "dataset".
    encoder: "minilm" or a local encoder path (ignored for "dataset").
    cache_dir: where encoded stores are cached (default ``default_cache_dir``).
    data_dir: data directory for the importers (default: DESIGN §1 rule).

  Returns:
    [ds.n_items, D] float32.

  Raises:
    dataset.DataError / store.StoreError: unknown source, no committed texts,
      or a cached store that fails validation (the message names the store and
      the item).
  """
  if source == "dataset":
    if ds.item_vectors is None:
      raise dataset.DataError(f"{ds.name}: source 'dataset' needs item_vectors, "
                              "which this dataset does not ship")
    vectors = np.asarray(ds.item_vectors, np.float32)
    store.validate_vectors(pathlib.Path(f"<{ds.name} item_vectors>"),
                           np.asarray([str(k) for k in ds.item_keys]), vectors)
    return vectors
  records, fields = source_records(ds, source, data_dir)
  items = items_of(ds)
  texts, _ = pipeline.item_texts(records, items)
  digest = texts_digest(items, texts)
  spec = encode.resolve_encoder(encoder)
  root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  store_dir = root / f"{ds.name}-{source}-{encode.slug(spec.encoder_id)}-{digest[:12]}"
  manifest = store.read_manifest(store_dir)
  if not (manifest and manifest.get("texts_sha256") == digest
          and (store_dir / store.VECTORS).is_file()):
    store_dir.mkdir(parents=True, exist_ok=True)
    by_key = {r["key"]: r for r in records}
    kept = [dict(by_key.get(k, {"key": k, "features": {}, "fallback": "raw"}),
                 text=t) for (k, _), t in zip(items, texts)]
    pipeline.write_texts(store_dir, kept, dict(fields, dataset=ds.name,
                                               texts_sha256=digest))
    pipeline.encode_store(store_dir, items, spec, records=records)
  return store.load_vectors(store_dir, [k for k, _ in items],
                            encoder=spec.encoder_id)
