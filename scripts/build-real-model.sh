#!/usr/bin/env bash
# Build the measurement model of docs/real-model.md with orlik's own verbs: a 32k SentencePiece
# tokenizer, a ~112M-parameter llama ("--size base") pretrained on the built-in corpus, its F16
# GGUF, calibration set, imatrix and a Q4_K_M-imat variant. Then write OUT/READY.
#
#   scripts/build-real-model.sh [OUT] [STAGE]     STAGE: all (default) | train | derive
#
# Environment: ORLIK (the orlik command, default .venv/bin/orlik), STEPS, BATCH, SEQ, LR, THREADS,
# EVERY (steps between resumable states), STOP_AFTER (see train below). Training resumes from
# OUT/fp16.work if it is interrupted with the same settings. docs/real-model.md has the figures of
# the builds at /work/models/real-100m (STOP_AFTER=40) and real-100m-v2 (STEPS=200 LR=1.5e-3
# STOP_AFTER=100), both on a 2-core machine shared with other jobs.
set -euo pipefail

OUT=${1:-/work/models/real-100m}
STAGE=${2:-all}
ORLIK=${ORLIK:-.venv/bin/orlik}
VOCAB=${VOCAB:-32000}
STEPS=${STEPS:-120}
BATCH=${BATCH:-4}
SEQ=${SEQ:-128}
LR=${LR:-2e-3}
THREADS=${THREADS:-2}
EVERY=${EVERY:-20}
STOP_AFTER=${STOP_AFTER:-}
mkdir -p "$OUT"

pretrain() {  # $1: --steps
  $ORLIK train pretrain --out "$OUT/fp16" --arch llama --size base --tokenizer "$OUT/tokenizer" \
    --steps "$1" --batch-size "$BATCH" --seq-len "$SEQ" --lr "$LR" --threads "$THREADS" \
    --checkpoint-every "$EVERY"
}

state_step() {  # the newest complete engine checkpoint (transformers' checkpoint-N) in fp16.work
  local n=0 d
  for d in "$OUT"/fp16.work/checkpoint-*; do
    [ -f "$d/trainer_state.json" ] || continue
    d=${d##*-}
    [ "$d" -gt "$n" ] && n=$d
  done
  echo "$n"
}

train() {
  if [ ! -f "$OUT/tokenizer/tokenizer.model" ]; then
    $ORLIK train tokenizer --out "$OUT/tokenizer" --vocab-size "$VOCAB"
  fi
  if [ -z "$STOP_AFTER" ]; then
    pretrain "$STEPS"
    return
  fi
  # STOP_AFTER=N: stop the STEPS-step schedule at its resumable state of step N (a multiple of
  # EVERY), then let orlik resume that state as a finished N-step run: it evaluates and exports.
  pretrain "$STEPS" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(state_step)" -lt "$STOP_AFTER" ]; do sleep 10; done
  sleep 20  # the checkpoint's last files
  kill $(pgrep -P "$pid") "$pid" 2>/dev/null || true  # the background function's shell and its orlik
  wait "$pid" || true
  local done_steps
  done_steps=$(state_step)
  python3 - "$OUT/fp16.work/orlik-run.json" "$done_steps" <<'PY'
import json, sys
path, steps = sys.argv[1], int(sys.argv[2])
run = json.load(open(path))
run["steps"] = steps  # the resumed run's settings must match the checkpoint's, or orlik starts afresh
json.dump(run, open(path, "w"), indent=1)
PY
  pretrain "$done_steps"
}

derive() {  # calib/, variants/ and reports/ go beside fp16/ (orlik's layout for a folder named fp16)
  local ck="$OUT/fp16"
  $ORLIK calibrate build "$ck" --tokens 50000
  $ORLIK calibrate imatrix "$ck"
  $ORLIK quantize "$ck" --recipe F16 --recipe Q4_K_M-imat
}

case "$STAGE" in
  train) train ;;
  derive) derive ;;
  all) train; derive ;;
  *) echo "unknown stage $STAGE (all | train | derive)" >&2; exit 2 ;;
esac
