#!/usr/bin/env bash
# One command for a lent GPU box (no network; torch, torchvision, triton, rich, nvidia-ml-py preinstalled):
#
#   bash bench/device_suite.sh [ARCHIVE]        ARCHIVE default: data/archive/cifar10-jpeg.tar.gz
#
# installs this checkout (pip --no-deps -e .), prepares the real store from the carried archive into
# data/cifar10-suite (a no-op when already prepared from it), runs the loader bench and the model matrix under
# one global budget, and writes bench/results/<date>-<gpu>.json and .md. It ends within 9 minutes: the suite gets
# what is left of BENCH_TOTAL_S (default 520 s) after install and prepare, and a hard `timeout` backs that up
# (results are written after every stage, so a cut-short run keeps what it measured).
#
# Environment: BENCH_QUICK=1   a tiny dry run (CPU is fine; ~1 minute)
#              BENCH_STORE     store directory (default data/cifar10-suite)
#              BENCH_OUT       results directory (default bench/results)
#              BENCH_TOTAL_S   the whole script's wall-clock budget in seconds
#              PYTHON          interpreter (default: python3, or .venv/bin/python when present)
set -euo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ARCHIVE="${1:-data/archive/cifar10-jpeg.tar.gz}"
STORE="${BENCH_STORE:-data/cifar10-suite}"
OUT="${BENCH_OUT:-bench/results}"
if [[ -n "${BENCH_QUICK:-}" ]]; then
  TOTAL="${BENCH_TOTAL_S:-90}"; QUICK=(--quick)
else
  TOTAL="${BENCH_TOTAL_S:-520}"; QUICK=()
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
say() { echo "[device_suite $(( $(date +%s) - START ))s] $*"; }

# 1. Install, unless this interpreter already imports fastcifar (and fastcifar.kernels, which only an install
#    maps) from this checkout. -I: the current directory must not count as an install.
HERE="import fastcifar.kernels, fastcifar, os, sys
sys.exit(0 if os.path.realpath(fastcifar.__file__).startswith('$ROOT/') else 1)"
if "$PYTHON" -I -c "$HERE" 2>/dev/null; then
  say "fastcifar already installed from $ROOT"
else
  say "pip install --no-deps -e ."
  # No network on the box: no build isolation (it would fetch setuptools); the preinstalled one builds it.
  "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e . \
    || {
      # Fallback: run from the checkout. kernels/ installs as fastcifar.kernels, so link it there (this is the
      # box's copy of the tree; nothing is committed from it).
      say "pip install failed; running from the checkout via PYTHONPATH"
      [[ -e fastcifar/kernels ]] || ln -s ../kernels fastcifar/kernels
      export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    }
fi

# 2. The real store, from the carried archive (prepare is a no-op when the store is up to date).
if [[ -f "$ARCHIVE" ]]; then
  say "prepare $ARCHIVE -> $STORE"
  "$PYTHON" -m fastcifar prepare --source "$ARCHIVE" --out "$STORE"
elif [[ -f "$STORE/meta.json" ]]; then
  say "no archive at $ARCHIVE; using the existing store $STORE"
else
  echo "device_suite: error: no archive at $ARCHIVE and no prepared store at $STORE (pass the archive path)" >&2
  exit 2
fi

# 3. The suite, with what is left of the budget (10 s kept for the final write).
LEFT=$(( TOTAL - ($(date +%s) - START) - 10 ))
if (( LEFT < 20 )); then
  echo "device_suite: error: only ${LEFT}s of the ${TOTAL}s budget left after setup" >&2
  exit 2
fi
say "bench suite, budget ${LEFT}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv 2>/dev/null || true
timeout -k 5 $(( LEFT + 5 )) \
  "$PYTHON" -m fastcifar.bench.suite --data "$STORE" --out "$OUT" --budget "$LEFT" ${QUICK[@]+"${QUICK[@]}"}
say "done"
