#!/usr/bin/env bash
# The reviewer-grade comparison (DESIGN §10): every method, tuned with the
# same Optuna budget on the validation holdout of old items, on every split a
# dataset's config declares (get_splits()), 5 test seeds, paired bootstrap
# intervals of EmerFlow minus each baseline, wins/ties/losses over splits.
# Each setting writes its own RESULTS.md section.
#
#   scripts/grid.sh [WORKDIR] [SETTING ...]
#
# WORKDIR defaults to runs/grid; SETTINGs (default: all, smallest first) are
# clinical_trials repodb movielens100k disgenet disgenet_degree.  On 2 CPU
# cores it is longer than two hours: run as four settings side by side (one
# process each, load 5-10), repoDB took 74 min, each DisGeNET setting about
# 2 h and ML-100K (two backbones) about 2 h; clinical trials alone 37 min.
# Alone on an idle machine it is far quicker: five of the methods (no EmerG,
# the slowest) took 959 s on ML-100K (both backbones, 2 splits) and 657 s on
# repoDB (3 splits).
# Everything is resumable: a killed grid rerun with the same arguments reads
# back finished trials, runs and seeds (a trial killed mid-run is retried).
# TRIALS (default 4), TRIAL_SEEDS (validation seeds per trial, default 2)
# and SEEDS (test seeds, default 5) override the budget; RESULTS_MD
# (default RESULTS.md) is the file the sections go to, so that two grids
# running side by side write separate files. On a GPU machine it runs unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/grid}
shift || true
SETTINGS=${*:-clinical_trials repodb movielens100k disgenet disgenet_degree}
export EMERFLOW_DATA_DIR=${EMERFLOW_DATA_DIR:-../shared/data}
TRIALS=${TRIALS:-4}
# Two validation seeds per trial: with one, on repoDB N=15 the tuner took
# EmerFlow's trial 3 over its trial 0 by .002 on seed 0, while seeds 1 and 2
# reversed the order by .009 and .002 (a choice made on noise).
TRIAL_SEEDS=${TRIAL_SEEDS:-2}
SEEDS=${SEEDS:-5}
RESULTS_MD=${RESULTS_MD:-RESULTS.md}
METHODS=base,dropoutnet,metaemb,mwuf,cvar,gme,emerg,emerflow,emerflow_no_llm

for s in $SETTINGS; do
  extra=() backbones=deepfm config=$s name=$s
  case $s in
    movielens100k) backbones=deepfm,widedeep ;;
    disgenet_degree) config=disgenet name="disgenet (degree negatives)"
                     extra=(--config.data.options.neg_sampling=degree) ;;
  esac
  start=$(date +%s)
  "$PY" -m experiments.compare --config="experiments/configs/$config.py" \
    --workdir="$OUT/$s" --methods=$METHODS --backbones=$backbones \
    --seeds="$SEEDS" --splits=config --tune="$TRIALS" --trial_seeds="$TRIAL_SEEDS" \
    --results_md="$RESULTS_MD" \
    --section="$name, tuning from each method's config (9 methods)" "${extra[@]}"
  echo "grid: $s took $(( $(date +%s) - start )) s"
done
