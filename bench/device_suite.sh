#!/usr/bin/env bash
# The one device call for a lent GPU box (no network; only files under $OUT come back; ~15 device-minutes a
# session, machine start included, 10 minutes a command):
#
#   bash bench/device_suite.sh [ARCHIVE]     ARCHIVE default: carry/data/cifar10-jpeg.tar.gz
#
# `bash bench/stage_device.sh` prepares what to carry and prints the exact call. Stages run in priority order,
# each under what is left of one budget (BENCH_TOTAL_S, default 470 s: under 8 minutes), and each writes its
# results under $OUT the moment it finishes, so a call cut short still brings back the most valuable figures:
#   1 install     pip install --no-deps --no-build-isolation --no-index . (offline), else PYTHONPATH
#   2 preflight   GPU, driver, versions, C compiler, Python headers, free disk -> preflight.json; stops in one
#                 line when something the GPU stages need is missing
#   3 prepare     the real store from the carried archive (in the tree: nothing needed from it comes back)
#   4 cuda tests  the CUDA-only tests at full size (pytest -m cuda) -> cuda-tests.xml
#   5 records     the current records (airbench94_muon.py, Hiverge's cifar10_speedrun.py, carried unchanged in
#                 carry/peers) and ours at their exact steps, alternating, their own timing -> *-records.json
#   5b peer       speedrun94 against airbench94, alternating, same process, same data -> *-speedrun.json
#   6 suite       seed workload (img/s, projected hours), loader table (HBM share), packed k-fold (k = 1, 5 for
#                 speedrun_net and seed000_fast's model), CIFAR-stem ResNets, compile cells -> <date>-<gpu>.json
#                 / .md (the stages in order: python -m fastcifar.bench.suite --list --device cuda)
#   7 fold        resnet34_onecycle fold 0 for whatever time is left (time to accuracy: fold0/metrics.csv)
# The second call, BENCH_ONLY=seed000_fast, runs stages 1-3 (install and prepare are no-ops on a warm box) and then
#   8 seed000_fast  seed 000's stratified 5 folds of the merged 60k on the 96 % tier, folds in sequence, for the
#                 whole budget -> $OUT/seed000_fast (summary.json, report.md, each fold's result, curves, figures);
#                 the run folder stays in the tree, so a later call on the same box resumes the folds not done
# $OUT/device_suite.log has everything printed, $OUT/stages.tsv one line a stage (name, exit code, seconds).
#
# Environment: OUT            where results go (set by the device tool; default bench/results)
#              BENCH_QUICK=1  the CPU rehearsal (tests/test_device_rehearsal.py): tiny sizes, no GPU needed
#              BENCH_TOTAL_S  the whole call's budget in seconds
#              BENCH_ONLY     seed000_fast: the second call (stages 1-3, then 8 only)
#              PYTHON         interpreter (default python3, or .venv/bin/python when present)
set -uo pipefail  # not -e: a failed stage is recorded and the next one still runs
START=$(date +%s)
ONLY="${BENCH_ONLY:-}"
if [[ -n "$ONLY" && "$ONLY" != seed000_fast ]]; then
  echo "device_suite: error: BENCH_ONLY=$ONLY: the only stage that runs alone is seed000_fast" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ARCHIVE="${1:-carry/data/cifar10-jpeg.tar.gz}"
STORE=data/cifar10-suite
if [[ -n "${BENCH_QUICK:-}" ]]; then QUICK=1; TOTAL="${BENCH_TOTAL_S:-150}"; else QUICK=; TOTAL="${BENCH_TOTAL_S:-470}"; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec > >(tee -a "$OUT/device_suite.log") 2>&1
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[device_suite $(( $(date +%s) - START ))s] $*"; }

# stage NAME CAP CMD...: run CMD under min(CAP, what is left - 5 s); record its exit code and time.
stage() {
  local name=$1 cap=$2; shift 2
  local room=$(( $(left) - 5 )); (( cap < room )) && room=$cap
  if (( room < 10 )); then say "skip $name: budget spent"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"; return 1; fi
  say "== $name (up to ${room}s)"
  local t0=$(date +%s) rc=0
  timeout -k 10 "$room" "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/stages.tsv"
  say "$name: exit $rc"
  return $rc
}

install() {
  # -I: the working directory must not count as an install; the check passes only for this tree's fastcifar.
  local here="import fastcifar.kernels, fastcifar, os, sys
sys.exit(0 if os.path.realpath(fastcifar.__file__).startswith(os.path.realpath('$ROOT') + '/') else 1)"
  if "$PYTHON" -I -c "$here" 2>/dev/null; then
    say "fastcifar already installed from this tree"
  elif ! "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -q -e .; then
    # Offline: no index, no build isolation (it would fetch setuptools). An old setuptools cannot build this
    # pyproject: run from the tree instead, with kernels/ linked where the install maps it (the box's copy).
    say "pip install failed; running from the tree via PYTHONPATH"
    [[ -e fastcifar/kernels ]] || ln -s ../kernels fastcifar/kernels
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # The CUDA-test stage needs pytest; stage_device.sh carries its wheels for a box without it.
  "$PYTHON" -c "import pytest" 2>/dev/null || "$PYTHON" -m pip install --no-deps --no-index -q bench/wheels/{pytest,pluggy,iniconfig}-*.whl \
    || say "no pytest: the CUDA tests will not run"
}

T0=$(date +%s); install; printf 'install\t%s\t%s\n' "$?" "$(( $(date +%s) - T0 ))" >> "$OUT/stages.tsv"
stage preflight 30 "$PYTHON" -m fastcifar.bench.device_check --out "$OUT/preflight.json" ${QUICK:+--quick} || {
  say "preflight failed: the GPU stages cannot run here (see $OUT/preflight.json)"; exit 2; }
if [[ -f "$STORE/meta.json" ]]; then
  say "store $STORE already prepared (an earlier call on this box)"
elif [[ -f "$ARCHIVE" ]]; then
  stage prepare 90 "$PYTHON" -m fastcifar prepare --source "$ARCHIVE" --out "$STORE" || exit 2
else
  echo "device_suite: error: no archive at $ARCHIVE and no store at $STORE (run bench/stage_device.sh)" >&2
  exit 2
fi

seed000_fast() {
  # In the tree (git-ignored runs/), not in $OUT: a warm box keeps it between calls, so a call cut short is
  # continued by the next (--resume skips finished folds). Everything but the checkpoints (~150 MB a fold: weights,
  # momentum, Lookahead's slow copy) is copied to $OUT, also after a timeout (the trainer checkpoints and exits 143).
  local run=runs/seed000_fast rc=0
  local args=(--set "data.store=\"$STORE\"" --out "$run")
  [[ -f "$run/recipe.toml" ]] && args+=(--resume)
  [[ -n "$QUICK" ]] && args+=(--set model.width=8 --set train.epochs=1 --set train.batch_size=16 \
    --set eval.batch_size=32 --set split.fold=0 --set train.compile=false)
  stage seed000_fast $(( $(left) - 10 )) "$PYTHON" -m fastcifar train recipes/seed000_fast.toml "${args[@]}" || rc=$?
  if [[ -d "$run" ]]; then
    mkdir -p "$OUT/seed000_fast"
    tar -C "$run" --exclude=checkpoints -cf - . | tar -C "$OUT/seed000_fast" -xf -
  fi
  return $rc
}
if [[ "$ONLY" == seed000_fast ]]; then
  seed000_fast
  say "done; results in $OUT:"
  ls -la "$OUT"
  exit 0
fi

mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)  # files without hypothesis / sklearn
stage "cuda tests" 90 "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" \
  "${CUDA_TESTS[@]}"
if [[ -n "$QUICK" ]]; then
  # one record on the CPU rehearses the mechanism (carried files, their main() under the shim, results in $OUT);
  # tests/test_peer_records.py runs both
  stage records 150 "$PYTHON" bench/peer_records.py --tiny --device cpu --peer hiverge --store "$STORE" \
    --out-dir "$OUT" --set model.width=8
  stage peer 60 "$PYTHON" bench/peer_airbench.py --tiny --device cpu --store "$STORE" --out-dir "$OUT" \
    --set model.width=8 --set data.train_subset=8
else
  # warm-ups (their max-autotune compile, ours) are outside the timed rounds; --budget stops starting rounds
  stage records 230 "$PYTHON" bench/peer_records.py --n 5 --budget 215 --store "$STORE" --out-dir "$OUT"
  stage peer 120 "$PYTHON" bench/peer_airbench.py --n 3 --budget 110 --store "$STORE" --out-dir "$OUT"
fi
SUITE=$(( $(left) - (QUICK ? 10 : 60) ))  # the fold stage gets the last minute, if any
stage suite $(( SUITE + 15 )) "$PYTHON" -m fastcifar.bench.suite --data "$STORE" --out "$OUT" --budget "$SUITE" \
  ${QUICK:+--quick}
if [[ -z "$QUICK" ]]; then
  # Stopped by timeout's SIGTERM, the trainer writes its checkpoint and metrics.csv (val accuracy and time per
  # epoch) and exits 143; the checkpoints are then removed (hundreds of MB; only metrics come back).
  stage fold 600 "$PYTHON" -m fastcifar train recipes/resnet34_onecycle.toml --set split.fold=0 --out "$OUT/fold0"
  rm -rf "$OUT/fold0/checkpoints" "$OUT"/fold0/fold*/checkpoints
fi
say "done; results in $OUT:"
ls -la "$OUT"
