"""Tests for emerflow_jax.enrich.pipeline: resumable generation and export.

The LLM is replaced by a stub (the real model is tested in
test_enrich_generate.py), so these tests exercise the store logic with a real
SIGKILL in a few seconds.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from emerflow_jax.enrich import pipeline, prompts, store

N_ITEMS = 60
STUB = r'''
import sys, time
from emerflow_jax.enrich import generate, pipeline

class StubLM:
  model_id, sha256 = "stub", "0"

def stub_batch(lm, chats, max_new_tokens=96, **kwargs):
  time.sleep(0.03)
  out = []
  for chat in chats:
    q = chat[-1]["content"]
    title = q.split("title: ")[1].split(";")[0] if "title: " in q else ""
    out.append(generate.Completion(
        f"plot: the story of {title}\nmood: calm" if title else "plot\nmood", 5))
  return out

generate.load_lm = lambda spec, threads=None, device="cpu": StubLM()
generate.generate_batch = stub_batch
generate.runtime_versions = lambda: "stub"
items = [(str(i), {"title": f"T{i}", "year": "2000"}) for i in range(%d)]
pipeline.generate_texts(items, "movie", sys.argv[1], llm=sys.argv[2],
                        batch_size=2, threads=None,
                        max_new_tokens=int(sys.argv[3]), log=lambda m: None)
''' % N_ITEMS


def _run(tmp_path, store_dir, max_new_tokens=16):
  script = tmp_path / "stub_run.py"
  script.write_text(STUB)
  model = tmp_path / "stub.gguf"
  model.write_bytes(b"GGUF stub weights")
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.Popen([sys.executable, str(script), str(store_dir),
                           str(model), str(max_new_tokens)], env=env,
                          stderr=subprocess.PIPE, text=True)


def _lines(path):
  return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_generation_resumes_without_loss_or_duplicates(tmp_path):
  store_dir = tmp_path / "store"
  texts = store_dir / store.TEXTS
  proc = _run(tmp_path, store_dir)
  deadline = time.time() + 60
  while _lines(texts) < 10 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  before = store.read_records(texts)
  assert 10 <= len(before) < N_ITEMS, "the kill must land mid-run"

  proc = _run(tmp_path, store_dir)
  assert proc.wait(timeout=60) == 0, proc.stderr.read()
  after = store.read_records(texts)
  keys = [r["key"] for r in after]
  assert sorted(keys, key=int) == [str(i) for i in range(N_ITEMS)]
  assert after[:len(before)] == before  # finished records are never rewritten
  assert after[5]["text"] == "title: T5; year: 2000; plot: the story of T5; mood: calm"
  manifest = store.read_manifest(store_dir)
  assert manifest["n_texts"] == N_ITEMS
  assert manifest["prompt_version"] == prompts.PROMPT_VERSION
  assert manifest["type_features"][:2] == ["plot", "mood"]


def test_torn_line_is_repaired_on_resume(tmp_path):
  store_dir = tmp_path / "store"
  proc = _run(tmp_path, store_dir)
  assert proc.wait(timeout=60) == 0, proc.stderr.read()
  texts = store_dir / store.TEXTS
  records = store.read_records(texts)
  # Cut the file inside the last record, as a kill during write() would.
  blob = texts.read_bytes()
  texts.write_bytes(blob[:len(blob) - 7])
  proc = _run(tmp_path, store_dir)
  assert proc.wait(timeout=60) == 0, proc.stderr.read()
  assert store.read_records(texts) == records


def test_store_with_other_settings_is_refused(tmp_path):
  store_dir = tmp_path / "store"
  proc = _run(tmp_path, store_dir, max_new_tokens=16)
  assert proc.wait(timeout=60) == 0
  proc = _run(tmp_path, store_dir, max_new_tokens=32)
  assert proc.wait(timeout=60) != 0
  assert "manifest max_new_tokens is 16 but 32 was requested" in proc.stderr.read()


def test_item_texts_fall_back_to_raw():
  items = [("a", {"title": "A"}), ("b", {"title": "B"})]
  texts, n = pipeline.item_texts([{"key": "a", "text": "title: A; mood: x"},
                                  {"key": "z", "text": "other"}], items)
  assert texts == ["title: A; mood: x", "title: B"] and n == 1


def test_export_is_sorted_reparsed_and_byte_stable(tmp_path):
  store_dir = tmp_path / "store"
  features = ["plot", "mood"]
  store.write_manifest(store_dir, {"source": "llm", "item_type": "movie",
                                   "type_features": features, "dim": 3})
  store.append_records(store_dir / store.TEXTS, [
      {"key": "10", "answer": "plot: b\nmood: calm, calm", "text": "stale"},
      {"key": "9", "answer": "mood: hand-drawn", "text": "stale"}])
  items = [("9", {"title": "Nine"}), ("10", {"title": "Ten"})]
  out = tmp_path / "x-smollm2.jsonl.gz"
  assert pipeline.export_texts(store_dir, out, items) == 2
  first = out.read_bytes()
  pipeline.export_texts(store_dir, out, items)
  assert out.read_bytes() == first
  records = [json.loads(l) for l in gzip.decompress(first).decode().splitlines()]
  assert [r["key"] for r in records] == ["9", "10"]
  assert records[1]["text"] == "title: Ten; plot: b; mood: calm"
  manifest = json.loads((tmp_path / "x-smollm2.json").read_text())
  assert manifest["parser_version"] == prompts.PARSER_VERSION
  assert manifest["n_texts"] == 2 and "dim" not in manifest


@pytest.mark.parametrize("budget, want", [(None, N_ITEMS), (0.0, 2)])
def test_time_budget_stops_between_batches(tmp_path, monkeypatch, budget, want):
  from emerflow_jax.enrich import generate  # pylint: disable=g-import-not-at-top
  stub = generate.LocalLM(tokenizer=None, model=None, model_id="stub", path="",
                         sha256="0")
  monkeypatch.setattr(generate, "load_lm", lambda *a, **k: stub)
  monkeypatch.setattr(generate, "runtime_versions", lambda: "stub")
  monkeypatch.setattr(generate, "generate_batch", lambda lm, chats, **k: [
      generate.Completion("plot: x", 2) for _ in chats])
  model = tmp_path / "m.gguf"
  model.write_bytes(b"w")
  items = [(str(i), {"title": str(i)}) for i in range(N_ITEMS)]
  manifest = pipeline.generate_texts(
      items, "movie", tmp_path / "s", llm=str(model), batch_size=2,
      time_budget_s=budget, log=lambda m: None)
  assert manifest["n_texts"] == want
