#!/usr/bin/env bash
# Stage what the device call carries (the box has no network; a call carries at most 64 MiB), then print the
# exact `carry` list and command:
#
#   bash bench/stage_device.sh [ARCHIVE]      ARCHIVE default: ../shared/data/cifar10-jpeg.tar.gz
#   PEERS=DIR bash bench/stage_device.sh      the record scripts' folder (default ../shared/peers)
#
#   carry/data/cifar10-jpeg.tar.gz   the real data, checked against the .sha256 beside it
#   carry/peers/{airbench94_muon,hiverge_speedrun}/   the current records' scripts with their licences, copied
#                                    unchanged (bench/peer_records.py runs them from there on the box)
#   bench/wheels/airbench-0.1.8-py3-none-any.whl   the peer, built here from its sdist (pure Python)
#   bench/wheels/{pytest,pluggy,iniconfig}-*.whl   for the CUDA-test stage, in case the box has no pytest
# Both folders are git-ignored. Re-running is cheap: what is already staged and checked is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/data/cifar10-jpeg.tar.gz}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT=$(( 64 * 1024 * 1024 ))
AIRBENCH=0.1.8

mkdir -p carry/data bench/wheels
DEST=carry/data/cifar10-jpeg.tar.gz
if [[ ! -f "$SRC" ]]; then echo "stage_device: error: $SRC: no such archive" >&2; exit 2; fi
if [[ -f "$SRC.sha256" ]]; then
  want=$(cut -d' ' -f1 < "$SRC.sha256")
  got=$(sha256sum "$SRC" | cut -d' ' -f1)
  [[ "$got" == "$want" ]] || { echo "stage_device: error: $SRC: sha256 $got, expected $want" >&2; exit 2; }
fi
cmp -s "$SRC" "$DEST" 2>/dev/null || cp "$SRC" "$DEST"

PEERS="${PEERS:-../shared/peers}"
for f in airbench94_muon/airbench94_muon.py airbench94_muon/LICENSE hiverge_speedrun/cifar10_speedrun.py \
         hiverge_speedrun/LICENSE; do
  if [[ -f "$PEERS/$f" ]]; then
    mkdir -p "carry/peers/$(dirname "$f")"
    cmp -s "$PEERS/$f" "carry/peers/$f" 2>/dev/null || cp "$PEERS/$f" "carry/peers/$f"
  else
    echo "stage_device: warning: $PEERS/$f missing: the records stage will say that peer did not run" >&2
  fi
done

if ! ls bench/wheels/airbench-$AIRBENCH-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$PYTHON" -m pip download -q "airbench==$AIRBENCH" --no-deps --no-binary :all: -d "$tmp"
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "$tmp"/airbench-$AIRBENCH.tar.gz -w bench/wheels
  rm -rf "$tmp"
fi
for pkg in pytest pluggy iniconfig; do
  ls bench/wheels/$pkg-*.whl >/dev/null 2>&1 || "$PYTHON" -m pip download -q --no-deps --only-binary :all: \
    --python-version 3.12 -d bench/wheels "$pkg"
done

size=$(du -cb carry bench/wheels | tail -1 | cut -f1)
echo "staged ($(( size / 1024 )) KiB of the 64 MiB a call may carry):"
(cd carry && find . -type f -printf '  carry/%P  %s bytes\n'); find bench/wheels -type f -printf '  %p  %s bytes\n'
if (( size > LIMIT )); then echo "stage_device: error: $size bytes to carry, over the 64 MiB limit" >&2; exit 2; fi
echo
echo 'carry:   ["carry", "bench/wheels"]'
echo 'command: bash bench/device_suite.sh carry/data/cifar10-jpeg.tar.gz'
echo 'timeout: 540 s (the call budgets itself to 470 s; results land in $OUT as each stage ends)'
echo
echo 'then AT ONCE (the box goes back after 30 s idle), with S = budget_left_s from `status` minus 60:'
echo 'command: BENCH_ONLY=seed000_fast BENCH_TOTAL_S=S bash bench/device_suite.sh'
echo 'timeout: S + 20 s (seed 000'"'"'s 5 folds on the 96 % tier; folds not done resume in a later call on the same box)'
