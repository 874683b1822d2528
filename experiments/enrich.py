r"""Stage 1: writes the enrichment store of one dataset (DESIGN §2).

  python -m experiments.enrich --config=experiments/configs/movielens100k.py \
      --out=/tmp/enrich/ml100k-llm-minilm [--config.generate.llm=<hf dir or .gguf>]

or, naming the dataset instead of its config file (DESIGN §8)::

  python -m experiments.enrich --dataset=movielens100k --source=llm \
      --encoder=minilm --out=/tmp/enrich/ml100k-llm-minilm [--limit=N]

The config's ``data`` section says what to read, ``enrich.source`` /
``enrich.encoder`` what to write and ``generate`` how the LM runs; the flags
``--source``, ``--encoder``, ``--llm`` and ``--device`` override them when
given.  ``--source`` is llm (generate with a local LM, default
SmolLM2-135M-Instruct), agent4rec or galkars (import public LLM text for
MovieLens movies) or raw (the raw features only).  The llm source is
resumable: kill it and run the same command again to continue;
``--device=cuda`` runs the LLM on a GPU (greedy, so the texts match a CPU run
up to kernel rounding).  ``--export_texts=<file.jsonl.gz>`` also writes the
texts in the compact form committed under emerflow_jax/enrich/precomputed/
(plus its manifest beside it).

Training code does not need this binary: ``loader.load_item_vectors`` encodes
the committed texts (or the imported ones) on first use and caches them.
"""

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from emerflow_jax.enrich import loader

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config file "
                                          "(or give --dataset).", lock_config=True)
_DATASET = flags.DEFINE_string("dataset", None, "Dataset name: reads "
                               "experiments/configs/<dataset>.py.")
_OUT = flags.DEFINE_string("out", None, "Store directory to write.")
_SOURCE = flags.DEFINE_enum("source", None, list(loader.STORE_SOURCES),
                            "Override enrich.source.")
_ENCODER = flags.DEFINE_string("encoder", None, "Override enrich.encoder: "
                               "'minilm', or a local model directory or .gguf.")
_LLM = flags.DEFINE_string("llm", None, "Override generate.llm.")
_DEVICE = flags.DEFINE_string("device", None, "Override generate.device.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override data.dir.")
_LIMIT = flags.DEFINE_integer("limit", None, "Generate at most N new items.")
_EXPORT = flags.DEFINE_string("export_texts", None, "Also write the texts as "
                              "gzipped JSON lines to this file.")
_NO_ENCODE = flags.DEFINE_bool("skip_encode", False, "Only write the texts.")
flags.mark_flags_as_required(["out"])


def _config():
  if (_CONFIG.value is None) == (_DATASET.value is None):
    raise app.UsageError("give exactly one of --config and --dataset")
  if _CONFIG.value is not None:
    return _CONFIG.value
  try:
    module = importlib.import_module(f"experiments.configs.{_DATASET.value}")
  except ModuleNotFoundError as e:
    raise app.UsageError(f"--dataset={_DATASET.value}: no config file "
                         f"experiments/configs/{_DATASET.value}.py") from e
  return module.get_config()


def main(argv):
  del argv
  c = _config()
  gen = c.generate
  data = dict(c.data.to_dict(), download=False)
  if _DATA_DIR.value:
    data["dir"] = _DATA_DIR.value
  manifest = loader.build_store(
      data, source=_SOURCE.value or c.enrich.source, out=_OUT.value,
      encoder=_ENCODER.value or c.enrich.encoder, llm=_LLM.value or gen.llm,
      limit=_LIMIT.value, threads=gen.threads, batch_size=gen.batch_size,
      max_new_tokens=gen.max_new_tokens, device=_DEVICE.value or gen.device,
      encode_vectors=not _NO_ENCODE.value, export_texts=_EXPORT.value)
  logging.info("store %s: %s", _OUT.value,
               {k: manifest.get(k) for k in ("source", "n_texts", "n_items",
                                             "dim", "n_fallback_raw")})


if __name__ == "__main__":
  app.run(main)
