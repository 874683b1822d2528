#!/usr/bin/env bash
# Meta-learning speed benchmark on a GPU machine, in about 5 minutes.
#
#   bash benchmarks/run_gpu.sh OUT_DIR        # e.g. benchmarks/gpu-h100
#
# Needs python with jax (CUDA build), flax, optax, absl, matplotlib and
# ml_collections (or this checkout's .venv, from which the script borrows the
# pure-Python ml_collections and yaml only); torch (CUDA) is optional: without
# it the torch cases are skipped and bench.md says so.  Nothing is installed or
# downloaded.  Set PYTHON to choose the interpreter.  Writes OUT_DIR/bench.json,
# bench.md, bench.png and OUT_DIR/log.txt.  On an H200 the run took 2.5 minutes
# (benchmarks/gpu-h200).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT"

"$PY" -c 'import jax; print(jax.devices())'

# ml_collections and yaml are pure Python.  If the GPU machine's python lacks
# them but this checkout's CPU .venv came along, borrow just those two packages
# (the rest of that venv, its CPU jax above all, must not shadow the CUDA one).
if ! "$PY" -c 'import ml_collections, yaml' 2>/dev/null; then
  SITE=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -n 1 || true)
  if [ -n "$SITE" ] && [ -d "$SITE/ml_collections" ] && [ -d "$SITE/yaml" ]; then
    BORROW=$(mktemp -d)
    cp -r "$SITE/ml_collections" "$SITE/yaml" "$BORROW/"
    export PYTHONPATH="$BORROW${PYTHONPATH:+:$PYTHONPATH}"
    echo "borrowed ml_collections and yaml from $SITE"
  else
    echo "ml_collections is missing: pip install ml_collections (pure Python)" >&2
    exit 1
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "ml_collections", "absl", "matplotlib",
             "orbax.checkpoint", "torch"):
  try:
    mod = importlib.import_module(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
  except Exception as e:  # report, do not stop: torch is optional
    print(f"{name} MISSING ({type(e).__name__}: {e})")
try:
  import torch
  print("torch cuda:", torch.cuda.is_available())
except Exception:
  pass
EOF

# JAX would otherwise take 75% of GPU memory up front and starve torch.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Forced-CPU-device scaling is a CPU measurement: skipped here (--devices=).
# Python-loop implementations launch hundreds of kernels per task: they are
# timed on 32 tasks per step (per-task throughput, marked * in bench.md).
timeout 420 "$PY" -m experiments.bench_meta --workdir="$OUT" \
  --tasks=256,1024,4096,16384 --repeats=5 \
  --loop_cap=32 --devices= --adapt_items=972,4096 --alsologtostderr \
  2>&1 | grep -v -e "Some donated buffers" -e "warnings.warn" | tee "$OUT/log.txt"
echo "wrote $OUT/bench.json, bench.md, bench.png"
