#!/usr/bin/env bash
# One device session's work in two prepared calls, after `bash scripts/device_inputs.sh pack` here:
#
#   device run, carry [".device_in/1"], timeout_s SECONDS + 30:   bash scripts/device_session.sh 1 SECONDS
#   device run at once, carry [".device_in/2"], likewise:          bash scripts/device_session.sh 2 SECONDS
#
# Call 1 keeps the first half of the embedded model and measures the paper-scale runs (device_measure.sh
# STEPS=paper: random weights, no embedded model needed). Call 2 joins the model, runs the 100-edit benchmark
# (STEPS=bench, at most BENCH_S seconds) and then the sequential runs (sequential_runs.sh) in the time left,
# and packs their run folders, without the resumable state, into $OUT/sequential_runs.tgz. Each call ends
# within SECONDS and leaves its results in OUT ($OUT on a device machine): at most 8 files, as a device sends
# back. The device's 15 minutes held three calls and a 30 s machine start on 2026-12-04 (docs/RESULTS.md); for
# 15 minutes: `1 300` (timeout_s 330), then `2 440` (timeout_s 470), and give the machine back.
#
#   SCALE=tiny DEVICE=cpu EDITS=4 ROUND=2 bash scripts/device_session.sh 2 300   # the same on a CPU, tiny
#
# Settings (environment): OUT (/tmp/out), DEVICE (cuda), BENCH_S (240), RESERVE_S (40: kept for ending the
# sequential runs and packing them), RESULTS (results), METHODS, EDITS, ROUND, DOWNSTREAM_STEPS
# (sequential_runs.sh's; METHODS defaults to the runs the 2,000-edit table still needs: MEMIT_seq ECE_GA), and
# what device_measure.sh and device_inputs.sh read (SCALE, BENCH_METHODS, STASH, DEVICE_IN, ...).
set -u -o pipefail
cd "$(dirname "$0")/.."
PART=${1:-}
SECONDS_GIVEN=${2:-}
if [[ ! "$PART" =~ ^[12]$ || ! "$SECONDS_GIVEN" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 1|2 SECONDS (the call's own time, a little under its timeout_s)" >&2; exit 2
fi
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} DEVICE=${DEVICE:-cuda}
BENCH_S=${BENCH_S:-240}
RESERVE_S=${RESERVE_S:-40}
RESULTS=${RESULTS:-results}
STASH=${STASH:-${TMPDIR:-/tmp}/ece_device_in}
export STASH
mkdir -p "$OUT"
left() { echo $(( SECONDS_GIVEN - SECONDS )); }

if [ "$PART" = 1 ]; then
  bash scripts/device_inputs.sh receive 1 || exit 2
  STEPS=paper RANDOM_TOKENIZER="$STASH/1/tokenizer" TOTAL_S=$(left) bash scripts/device_measure.sh > /dev/null
  status=$?
  cat "$OUT/summary.txt"
  exit "$status"
fi

bash scripts/device_inputs.sh unpack > "$OUT/unpack.log" 2>&1 || { tail -5 "$OUT/unpack.log"; exit 2; }
export ECE_STATS_DIR=${ECE_STATS_DIR:-$STASH/stats}  # computed by the benchmark, read by the sequential runs
bench_s=$BENCH_S
if (( $(left) - RESERVE_S < bench_s )); then bench_s=$(( $(left) - RESERVE_S )); fi
STEPS=bench TOTAL_S=$bench_s bash scripts/device_measure.sh > /dev/null
bench_status=$?
cat "$OUT/summary.txt"
sequential_s=$(( $(left) - RESERVE_S ))
sequential_status=1
if (( sequential_s >= 30 )); then
  METHODS=${METHODS:-"MEMIT_seq ECE_GA"} TOTAL_S=$sequential_s EXTRA="--dtype float32" RESULTS=$RESULTS \
    bash scripts/sequential_runs.sh > "$OUT/sequential.log" 2>&1
  sequential_status=$?
  tr '\r' '\n' < "$OUT/sequential.log" | grep -a -E "^== |round [0-9]+/[0-9]+ done|stopped|no time left" | tail -25
  if [ -d "$RESULTS" ]; then
    tar czf "$OUT/sequential_runs.tgz" --exclude=sequential_state.pt -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  fi
else
  echo "sequential runs: skipped, ${sequential_s}s left after the benchmark"
fi
ls -l "$OUT"
(( bench_status == 0 && sequential_status == 0 ))
