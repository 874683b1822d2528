"""Stage-1 runs that fill a store: LLM generation, imported texts, encoding.

``generate_texts`` is the resumable LLM loop (type prompt once, then items in
batches, each record fsync'd as soon as its batch is done). ``write_texts``
stores texts that come from elsewhere (imports, raw serialization).
``encode_store`` turns a store's texts into vectors.
"""

from __future__ import annotations

import gzip
import json
import logging
import pathlib
import time
from typing import Any, Callable, Sequence

from emerflow_jax.enrich import common, encode, prompts, store

Item = tuple[str, dict[str, str]]  # (item key, raw features F_i)


def _eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def generate_texts(items: Sequence[Item], item_type: str,
                   store_dir: str | pathlib.Path, llm: str | None = None,
                   threads: int | None = 1, max_new_tokens: int = 96,
                   batch_size: int = 16, limit: int | None = None,
                   dataset_name: str = "", device: str = "cpu",
                   time_budget_s: float | None = None,
                   log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Generates and appends enrichment texts for the items not yet in the store.

  Resumable: records already in texts.jsonl are skipped, a torn last line is
  repaired, and the type-level features are fixed by the first run (kept in
  the manifest) so a resumed run asks the same question. A store made with
  another model, prompt version or generation setting is refused.

  Args:
    items: (key, raw features) per item, in the order to generate.
    item_type: "movie", "disease", "drug", ...
    store_dir: the store directory (created if missing).
    llm: model spec for ``generate.resolve_model_path``.
    threads: torch threads (1 leaves the other cores free).
    max_new_tokens: cap per answer.
    batch_size: answers per ``generate`` call.
    limit: stop after this many new items (None: all).
    dataset_name: recorded in the manifest.
    device: torch device for the model.
    time_budget_s: start no new batch after this many seconds of generation
      (the store stays resumable).
    log: progress sink.

  Returns:
    The manifest after the run.
  """
  # The LM side (torch, transformers) loads only when texts are generated.
  from emerflow_jax.enrich import generate  # pylint: disable=g-import-not-at-top
  store_dir = pathlib.Path(store_dir)
  store_dir.mkdir(parents=True, exist_ok=True)
  folder, gguf_file = generate.resolve_model_path(llm)
  sha = common.model_fingerprint(folder, gguf_file)
  fixed = {"source": "llm", "prompt_version": prompts.PROMPT_VERSION,
           "item_type": item_type, "model_sha256": sha,
           "max_new_tokens": int(max_new_tokens), "do_sample": False}
  manifest = store.read_manifest(store_dir)
  if manifest is not None:
    store.check_manifest(store_dir, manifest, fixed)
  texts_path = store_dir / store.TEXTS
  done = {r["key"] for r in store.read_records(texts_path, repair=True)}
  todo = [(k, r) for k, r in items if k not in done]
  if limit is not None:
    todo = todo[:limit]
  if manifest is not None and not todo:
    log(f"{store_dir}: all {len(items)} items already have texts")
    return manifest

  t0 = time.time()
  lm = generate.load_lm(llm, threads=threads, device=device)
  log(f"loaded {lm.model_id} in {time.time() - t0:.1f}s")
  if manifest is None or "type_features" not in manifest:
    reserved = sorted({name for _, raw in items for name in raw})
    answer = generate.generate_batch(
        lm, [prompts.type_prompt(item_type)], max_new_tokens=48)[0].text
    features, n_model = prompts.choose_features(answer, item_type, reserved)
    manifest = dict(fixed, dataset=dataset_name, model_id=lm.model_id,
                    parser_version=prompts.PARSER_VERSION,
                    runtime=generate.runtime_versions(),
                    created=store.now(), type_answer=answer,
                    type_features=features, type_features_from_model=n_model,
                    n_texts=len(done), generated_tokens=0,
                    generation_seconds=0.0)
    store.write_manifest(store_dir, manifest)
    log(f"type features for {item_type!r}: {features} ({n_model} from the "
        f"model, answer {answer!r})")
  features = manifest["type_features"]

  t_start, tokens, n_new = time.time(), 0, 0
  log(f"{len(done)} items done, {len(todo)} to generate")
  for start in range(0, len(todo), batch_size):
    # At least one batch runs, so repeated short runs always make progress.
    if (start and time_budget_s is not None
        and time.time() - t_start > time_budget_s):
      log(f"time budget of {time_budget_s:.0f}s spent; rerun to continue")
      break
    batch = todo[start:start + batch_size]
    answers = generate.generate_batch(
        lm, [prompts.item_prompt(item_type, raw, features) for _, raw in batch],
        max_new_tokens=max_new_tokens)
    records = []
    for (key, raw), ans in zip(batch, answers):
      values = prompts.parse_feature_values(ans.text, features, item_type)
      records.append({"key": key, "features": values, "answer": ans.text,
                      "n_tokens": ans.n_tokens,
                      "text": common.serialize(raw, values)})
      tokens += ans.n_tokens
    store.append_records(texts_path, records)
    n_new += len(batch)
    elapsed = time.time() - t_start
    rate = n_new / max(elapsed, 1e-9)
    log(f"{len(done) + n_new}/{len(items)} items, {rate:.2f} items/s, "
        f"{tokens / max(elapsed, 1e-9):.1f} tokens/s, ETA "
        f"{_eta((len(todo) - n_new) / max(rate, 1e-9))}")
  manifest = store.read_manifest(store_dir) or manifest
  manifest["n_texts"] = len(done) + n_new
  manifest["generated_tokens"] = manifest.get("generated_tokens", 0) + tokens
  manifest["generation_seconds"] = round(
      manifest.get("generation_seconds", 0.0) + time.time() - t_start, 1)
  manifest["threads"] = threads
  manifest["batch_size"] = batch_size
  manifest.setdefault("devices", [])
  if device not in manifest["devices"]:
    manifest["devices"].append(device)
  store.write_manifest(store_dir, manifest)
  return manifest


def write_texts(store_dir: str | pathlib.Path, records: Sequence[dict[str, Any]],
                manifest: dict[str, Any]) -> None:
  """Replaces a store's texts and manifest with ``records`` (imports, raw).

  Args:
    store_dir: the store directory (created if missing).
    records: text records, each with "key" and "text".
    manifest: manifest fields; "n_texts" and "created" are added.
  """
  store_dir = pathlib.Path(store_dir)
  lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                  for r in records)
  store.write_atomic(store_dir / store.TEXTS, lines.encode("utf-8"))
  store.write_manifest(store_dir, dict(manifest, n_texts=len(records),
                                       created=store.now()))


def item_texts(records: Sequence[dict[str, Any]],
               items: Sequence[Item]) -> tuple[list[str], int]:
  """Texts s_i for ``items`` from records; raw serialization where none exists.

  Args:
    records: text records with "key" and "text" (extra or unknown keys are
      ignored).
    items: (key, raw features) per item, in the order wanted.

  Returns:
    ([n] texts in item order, number of items that fell back to raw).
  """
  by_key = {r["key"]: r.get("text", "") for r in records}
  texts, n_fallback = [], 0
  for key, raw in items:
    text = by_key.get(key, "")
    if not text:
      text, n_fallback = common.serialize(raw, {}), n_fallback + 1
    texts.append(text)
  return texts, n_fallback


def encode_store(store_dir: str | pathlib.Path, items: Sequence[Item],
                 encoder: str | None = None, threads: int | None = None,
                 records: Sequence[dict[str, Any]] | None = None,
                 log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Encodes the store's texts (or ``records``) for ``items`` into vectors.

  Args:
    store_dir: the store directory.
    items: (key, raw features) per item; the vectors follow this order.
    encoder: encoder spec for ``encode.load_encoder`` (None: MiniLM).
    threads: torch threads.
    records: text records to encode instead of the store's texts.jsonl.
    log: progress sink.

  Returns:
    The updated manifest (encoder, dim, item count, n_fallback_raw).
  """
  store_dir = pathlib.Path(store_dir)
  if records is None:
    records = store.read_records(store_dir / store.TEXTS, repair=True)
  texts, n_fallback = item_texts(records, items)
  t0 = time.time()
  enc = encode.load_encoder(encoder, threads=threads)
  vectors = encode.encode_texts(enc, texts)
  log(f"encoded {len(texts)} texts with {enc.spec.encoder_id} in "
      f"{time.time() - t0:.1f}s ({n_fallback} raw fallbacks)")
  store.write_vectors(store_dir, [k for k, _ in items], vectors)
  manifest = store.read_manifest(store_dir) or {}
  manifest.update(encoder=enc.spec.encoder_id, dim=int(vectors.shape[1]),
                  n_items=len(items), n_fallback_raw=n_fallback,
                  encoded=store.now())
  store.write_manifest(store_dir, manifest)
  return manifest


def reparse(records: Sequence[dict[str, Any]], items: Sequence[Item],
            item_type: str, features: Sequence[str]) -> list[dict[str, Any]]:
  """Re-derives features and texts of LLM records from their stored answers.

  Used when the parser changes (``prompts.PARSER_VERSION``): generation is the
  expensive step, parsing is not.

  Args:
    records: stored records; those without "answer" or of unknown items are
      copied unchanged.
    items: (key, raw features) per item.
    item_type: "movie", "disease", "drug", ...
    features: the store's type-level feature names.

  Returns:
    New records, in the order of ``records``.
  """
  raw_of = dict(items)
  out = []
  for r in records:
    if "answer" not in r or r["key"] not in raw_of:
      out.append(dict(r))
      continue
    values = prompts.parse_feature_values(r["answer"], features, item_type)
    out.append(dict(r, features=values,
                    text=common.serialize(raw_of[r["key"]], values)))
  return out


def export_texts(store_dir: str | pathlib.Path, out: str | pathlib.Path,
                 items: Sequence[Item] | None = None) -> int:
  """Writes a store's texts in the committed compact form.

  ``out`` (``<stem>.jsonl.gz``) holds the records sorted by key, re-parsed
  with the current parser when ``items`` are given; ``<stem>.json`` beside it
  holds the manifest. The gzip header carries no name or time, so the same
  texts always give the same bytes.

  Args:
    store_dir: the store to read.
    out: the ``.jsonl.gz`` file to write.
    items: (key, raw features) per item, to re-parse an LLM store's answers
      (None: records as stored).

  Returns:
    The number of records.
  """
  store_dir, out = pathlib.Path(store_dir), pathlib.Path(out)
  records = store.read_records(store_dir / store.TEXTS)
  manifest = dict(store.read_manifest(store_dir) or {})
  if items is not None and manifest.get("source") == "llm":
    records = reparse(records, items, manifest["item_type"],
                      manifest["type_features"])
    manifest["parser_version"] = prompts.PARSER_VERSION
  records = sorted(records, key=lambda r: (len(r["key"]), r["key"]))
  lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                  for r in records)
  blob = gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0)
  store.write_atomic(out, blob)
  manifest.update(n_texts=len(records),
                  n_empty=sum(not r.get("features") for r in records))
  for field in ("threads", "encoder", "dim", "n_items", "n_fallback_raw",
                "encoded"):
    manifest.pop(field, None)  # properties of one store, not of the texts
  stem = out.name[:-len(".jsonl.gz")] if out.name.endswith(".jsonl.gz") else out.stem
  store.write_atomic(out.with_name(stem + ".json"),
                     (json.dumps(manifest, indent=2, sort_keys=True) + "\n"
                      ).encode())
  return len(records)
