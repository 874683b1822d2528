#!/usr/bin/env bash
# Two sweep workers sharing one Optuna study on a real PostgreSQL server.
#
# The multi-machine check of docs/scaling.md ("Sweeps"), on one machine: it
# installs Debian's postgresql package if needed (root; apt-get), starts the
# server on localhost, creates a database, then runs two
# `python -m experiments.sweep` workers at once, each with its own workdir as
# on two machines, against one study in that database.  It ends by listing
# the study's trials and checking that every grid point ran exactly once.
# Not part of `make test` (it installs and starts a server).
#
#   scripts/postgres_sweep.sh [OUT_DIR]      (default OUT_DIR: a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-$(mktemp -d)}
export EMERFLOW_DATA_DIR=${EMERFLOW_DATA_DIR:-../shared/data}
DB=emerflow_sweep
URL="postgresql://emerflow:emerflow@localhost/$DB"
GRID='warmup.steps=1,2,3;warmup.lr=0.01,0.03'

if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi
VERSION=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$VERSION" main start 2>/dev/null || true   # already running is fine
pg_lsclusters
as_pg() { su postgres -c "$1"; }
as_pg "psql -qc \"DROP DATABASE IF EXISTS $DB\""
as_pg "psql -qc \"DROP ROLE IF EXISTS emerflow\""
as_pg "psql -qc \"CREATE ROLE emerflow LOGIN PASSWORD 'emerflow'\""
as_pg "createdb -O emerflow $DB"
echo "database: $URL"

mkdir -p "$OUT"
start=$(date +%s)
for w in 1 2; do
  "$PY" -m experiments.sweep --config=experiments/configs/synthetic.py:smoke \
    --config.method=base --config.seeds=1 --grid="$GRID" \
    --storage="$URL" --study=pg-check --workdir="$OUT/worker$w" \
    >"$OUT/worker$w.log" 2>&1 &
  pids[$w]=$!
done
for w in 1 2; do
  rc=0; wait "${pids[$w]}" || rc=$?
  echo "worker $w exited $rc"; tail -3 "$OUT/worker$w.log"
done
echo "wall time: $(( $(date +%s) - start )) s"

"$PY" - "$URL" <<'PY'
import collections, sys
import optuna
from emerflow_jax import study  # postgresql:// with the installed driver
st = optuna.load_study(study_name="pg-check", storage=study.driver_url(sys.argv[1]))
print(f"{'trial':>5}  {'state':8} {'val AUC':>8}  {'worker':24} params")
for t in st.trials:
  v = "" if t.value is None else f"{t.value:.4f}"
  print(f"{t.number:>5}  {t.state.name:8} {v:>8}  {t.user_attrs.get('worker', ''):24} {t.params}")
done = [t for t in st.trials if t.state.name == "COMPLETE"]
points = collections.Counter(tuple(sorted(t.params.items())) for t in done)
workers = collections.Counter(t.user_attrs["worker"] for t in done)
print(f"COMPLETE: {len(done)} trials, {len(points)} distinct grid points of 6; "
      f"trials per worker: {dict(workers)}")
assert len(points) == 6 and max(points.values()) == 1, "a point was lost or ran twice"
assert len(workers) == 2, "one worker did all the work"
print("OK: every grid point ran exactly once, shared by two workers")
PY
