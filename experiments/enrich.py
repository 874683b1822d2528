r"""Stage 1: writes the enrichment store of one dataset (DESIGN §2).

  python -m experiments.enrich --dataset=movielens100k --source=llm \
      --encoder=minilm --out=/tmp/enrich/ml100k-llm-minilm \
      [--llm=<hf dir or .gguf>] [--limit=N]

``--source`` is llm (generate with a local LM, default SmolLM2-135M-Instruct),
agent4rec or galkars (import public LLM text for MovieLens movies) or raw (the
raw features only). The llm source is resumable: kill it and run the same
command again to continue; ``--device=cuda`` runs the LLM on a GPU (greedy, so
the texts match a CPU run up to kernel rounding). ``--export_texts=<file.jsonl.gz>``
also writes the texts in the compact form committed under
emerflow_jax/enrich/precomputed/ (plus its manifest beside it).

Training code does not need this binary: ``loader.load_item_vectors`` encodes
the committed texts (or the imported ones) on first use and caches them.
"""

from absl import app, flags, logging

from emerflow_jax.enrich import loader

_DATASET = flags.DEFINE_enum(
    "dataset", None, ["movielens100k", "movielens1m", "disgenet", "repodb",
                      "synthetic"], "Dataset to enrich.")
_SOURCE = flags.DEFINE_enum("source", "llm", list(loader.STORE_SOURCES),
                            "Where the item texts come from.")
_ENCODER = flags.DEFINE_string("encoder", "minilm", "'minilm', or a local "
                               "sentence-transformers/LM directory or .gguf.")
_OUT = flags.DEFINE_string("out", None, "Store directory to write.")
_LLM = flags.DEFINE_string("llm", None, "Local HF directory or .gguf for "
                           "--source=llm (default: SmolLM2-135M-Instruct).")
_LIMIT = flags.DEFINE_integer("limit", None, "Generate at most N new items.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: "
                                "$EMERFLOW_DATA_DIR, then the user cache).")
_THREADS = flags.DEFINE_integer("threads", 1, "torch threads.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device for the LLM.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Answers per generate call.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "Tokens per answer.")
_EXPORT = flags.DEFINE_string("export_texts", None, "Also write the texts as "
                              "gzipped JSON lines to this file.")
_NO_ENCODE = flags.DEFINE_bool("skip_encode", False, "Only write the texts.")
flags.mark_flags_as_required(["dataset", "out"])


def main(argv):
  del argv
  manifest = loader.build_store(
      {"name": _DATASET.value, "dir": _DATA_DIR.value, "download": False},
      source=_SOURCE.value, out=_OUT.value, encoder=_ENCODER.value,
      llm=_LLM.value, limit=_LIMIT.value, threads=_THREADS.value,
      batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value,
      device=_DEVICE.value,
      encode_vectors=not _NO_ENCODE.value, export_texts=_EXPORT.value)
  logging.info("store %s: %s", _OUT.value,
               {k: manifest.get(k) for k in ("source", "n_texts", "n_items",
                                             "dim", "n_fallback_raw")})


if __name__ == "__main__":
  app.run(main)
