"""MovieLens-1M, N=200, K=20 (DESIGN §1, the canonical setting).

Usage::

  python -m experiments.run --config=experiments/configs/movielens1m.py \
      --config.method=emerflow --config.backbone=deepfm --config.seeds=3 \
      --workdir=/tmp/ml1m

The split: 972 emerging movies (between 60 and 200 ratings); rows: base
854,530, each warm phase 19,440, test 58,409.  ``ratings.dat`` is downloaded
from GroupLens on first use (md5-checked; it may not be redistributed).  The
enrichment source defaults to GAL-KARS's LLaMA-3 attributes, written for
exactly these movies (``ml1m-llm-attributes-galkars/``; the best source on
validation for ML-100K, whose movies it covers through their ML-1M ids).

Pretraining is scaled to the dataset as DESIGN §9 asks: with ~15x the rows of
ML-100K, 2 epochs of batch 1,024 give ~1,700 Adam steps, the order of
ML-100K's ~2,300.  ``:smoke`` is a seconds-long run.
"""

from experiments.configs import common


def get_config(arg=None):
  c = common.base_config("movielens1m", n_max=200, k=20)
  c.enrich.source = "galkars"
  c.optim.epochs = 2
  c.optim.batch_size = 1024
  if arg == "smoke":
    common.smoke(c)
  return c
