"""repoDB drug–indication pairs, N=12, K=2: 159 old drugs, 260 emerging.

Usage::

  python -m experiments.run --config=experiments/configs/repodb.py \
      --config.method=emerflow --config.backbone=deepfm --config.seeds=3 \
      --workdir=/tmp/repodb

Drugs are items, indications are users; approved = 1, failed trial = 0; one row
per (drug, indication) pair (approved wins): 9,937 rows (6,677 positive) over
2,051 indications and 1,571 drugs.  There is no time axis: each drug's rows are
ordered by a fixed-seed shuffle (``order_seed``), so the phases are random
subsets of a drug's pairs.

N and K come from the degree distribution (median 2 indications per drug):
repoDB cannot give both ~300 old and ~200 emerging drugs.  N = 12 keeps 159 old
drugs (5,396 rows) and 260 emerging ones, with 520 rows per warm phase and 650
test rows; 209 emerging drugs have test rows, the 51 with exactly 3K = 6 rows
have none (no K avoids such drugs here).  The test set is small and 78%
positive, so expect wide seed-to-seed spread.

Beware the user-side shortcut: an indication's approval rate among old drugs
alone scores 0.92 test AUC, so the item embedding has little room here.

``:smoke`` shrinks everything to a seconds-long run.  Pretraining runs 20 epochs
of batch 64 over the ~4.8k old-item rows left after the validation holdout
(about 1,500 Adam steps, the scale of MovieLens-100K).  The validation holdout
(16 old drugs) could not choose it: base + DeepFM, one seed, mean validation
AUC over the four phases .986 (5 epochs), .987 (20), .987 (60); the choice
ignores the test rows.
"""

from experiments.configs import common


def get_config(arg=None):
  c = common.base_config("repodb", n_max=12, k=2)
  c.data.download = False                   # no download: the file must be in the data dir
  c.data.options.order_seed = 0             # seed of the shuffle that orders each drug's rows
  c.enrich.source = "llm"
  # The rule learned on main's own old items, no auxiliary backbone: validation
  # AUC over warm_a/b/c vs rule_holdout=0.3, 3 seeds: N=10 -.002/+.000/-.000,
  # N=12 +.000/+.002/+.002, N=15 +.001/+.001/+.001 (and no second pretraining).
  c.meta.rule_holdout = 0.0
  c.optim.batch_size = 64                   # small data: smaller batches, more steps
  c.optim.epochs = 20                       # ~1,500 steps (validation cannot tell 5..60 apart)
  if arg == "smoke":
    common.smoke(c)
  return c


def get_splits(arg=None):
  """The protocol grid of the multi-split comparison (``--splits=config``)."""
  del arg
  return [{"data.n_max": n, "data.k": 2} for n in (10, 12, 15)]
