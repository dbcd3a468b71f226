#!/usr/bin/env bash
# The sequential-editing table (AlphaEdit's Table 1 protocol) on one model: each method edits EDITS records
# in rounds of ROUND with a downstream check and a curve point every DOWNSTREAM_STEPS rounds, then
# summarize.py --compare prints the table and draws the curves.
#
#   bash scripts/sequential_runs.sh                       # the five 2,000-edit runs on the embedded model
#   METHODS="ECE_WI MEMIT" EDITS=500 bash scripts/sequential_runs.sh
#   TOTAL_S=540 DEVICE=cuda bash scripts/sequential_runs.sh   # stop cleanly after 9 minutes; run it again to go on
#
# Runs one method after another. Every run lives in RESULTS/<method folder>/run_000 and is resumed where it
# stopped (evaluate.py --continue_from_run), so the script can be stopped at any time and started again, on
# this machine or on one with a GPU, with nothing lost or repeated.
#
# Methods (the settings are the shipped hparams; loops of 20 requests for MEMIT and MEMIT_seq give the values of
# MEMIT's one loop per request, faster, as the shipped AlphaEdit file already does):
#   ECE_WI, ECE_GA   ECE with weight importance / gradient attribution
#   AlphaEdit        null-space projected MEMIT
#   MEMIT            MEMIT --sequential without C_prev (AlphaEdit's MEMIT row)
#   MEMIT_seq        MEMIT keeping C_prev (the moments of earlier edits)
# Fluency and consistency come from the generation tests after the last round (AlphaEdit's protocol) and, as the
# baseline, on the unedited model ('pre'), on every GENERATION_INTERVAL-th case id (MEMIT's
# --generation_test_interval): the default 10 scores 200 of 2,000 records, about 2 minutes per stage and run on a
# 2-core CPU; 1 scores all of them (about 18 minutes per stage there, one on a GPU). A finished run made before
# it had them gets them when the script runs again.
# Settings (environment): METHODS, EDITS (2000), ROUND (100), DOWNSTREAM_STEPS (5), DS (cf_easyedit), MODEL
# (smollm2-135m), RESULTS (ECE_RESULTS_DIR, else results), DEVICE (auto), TOTAL_S (0: no limit),
# GENERATION_INTERVAL (10), EXTRA (more evaluate.py arguments, the same for every method), OVERRIDES
# (key=value hparams overrides for every method), PYTHON (python3).
# The exit status is 0 when every run asked for is complete.
set -u -o pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-"ECE_WI MEMIT AlphaEdit MEMIT_seq ECE_GA"}
EDITS=${EDITS:-2000}
ROUND=${ROUND:-100}
DOWNSTREAM_STEPS=${DOWNSTREAM_STEPS:-5}
DS=${DS:-cf_easyedit}
MODEL=${MODEL:-smollm2-135m}
RESULTS=${RESULTS:-${ECE_RESULTS_DIR:-results}}
DEVICE=${DEVICE:-}
TOTAL_S=${TOTAL_S:-0}
GENERATION_INTERVAL=${GENERATION_INTERVAL:-10}
EXTRA=${EXTRA:-}
OVERRIDES=${OVERRIDES:-}
PYTHON=${PYTHON:-python3}
START=$SECONDS

method_arguments() {
  local overrides=$OVERRIDES
  case "$1" in
    ECE_WI|ECE_GA|AlphaEdit) echo -n "--alg_name $1" ;;
    MEMIT) echo -n "--alg_name MEMIT --sequential"; overrides="z_requests_per_loop=20 $overrides" ;;
    MEMIT_seq) echo -n "--alg_name MEMIT_seq"; overrides="z_requests_per_loop=20 $overrides" ;;
    *) echo "unknown method '$1': use ECE_WI, ECE_GA, AlphaEdit, MEMIT or MEMIT_seq" >&2; return 2 ;;
  esac
  if [ -n "${overrides// /}" ]; then echo -n " --hparams $overrides"; fi
  echo
}

complete=1
compared=()
for method in $METHODS; do
  arguments=$(method_arguments "$method") || exit 2
  run_dir="$RESULTS/$method/run_000"
  resume=()
  if [ -f "$run_dir/params.json" ]; then resume=(--continue_from_run run_000); fi
  limit=()
  if [ "$TOTAL_S" -gt 0 ]; then
    left=$((TOTAL_S - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then echo "$method: no time left (TOTAL_S=$TOTAL_S)"; complete=0; break; fi
    limit=(timeout -s INT "$left")   # evaluate.py ends an interrupted run cleanly; rerun to resume
  fi
  echo "== $method: $run_dir ${resume[*]:+(resumed)}"
  # shellcheck disable=SC2086  # the method's and EXTRA's arguments are word lists
  "${limit[@]}" "$PYTHON" experiments/evaluate.py $arguments --model_name "$MODEL" \
      --hparams_fname "$MODEL.json" --ds_name "$DS" --dataset_size_limit "$EDITS" --num_edits "$ROUND" \
      --downstream_eval_steps "$DOWNSTREAM_STEPS" --results_dir "$RESULTS" ${DEVICE:+--device "$DEVICE"} \
      --generation_stages pre,final --generation_test_interval "$GENERATION_INTERVAL" "${resume[@]}" $EXTRA
  status=$?
  if [ -d "$run_dir" ]; then compared+=("$method/run_000"); fi
  if [ "$status" -ne 0 ]; then echo "$method: stopped (status $status); run the script again to resume"; complete=0; break; fi
done

if [ "${#compared[@]}" -gt 0 ]; then
  "$PYTHON" summarize.py --compare "${compared[@]}" --results_dir "$RESULTS" --plot
fi
[ "$complete" -eq 1 ]
