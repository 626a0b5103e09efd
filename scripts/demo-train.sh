#!/usr/bin/env bash
# `make demo-train`: the training package end to end on the tiny model, on transformers/TRL:
# pretrain -> SFT (WICEL, ALR) -> DPO-P -> GRPO, then a table of each stage's loss and reward.
# Reuses `make demo`'s pretrained runs/tiny/base when it is there. A rerun skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
ORLIK=${ORLIK:-.venv/bin/orlik}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
base="$RUNS/${MODEL:-tiny}/base"  # the pretrained model; make demo tunes it into fp16/
dir="$RUNS/${MODEL:-tiny}-train"
mkdir -p "$dir"
start=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1 pretrain the tiny model (Trainer)"
if [ ! -f "$base/training.json" ]; then
  # PRETRAIN_ARGS (e.g. "--steps 60 --batch-size 8 --seq-len 128"), SFT_ARGS, DPO_ARGS and GRPO_ARGS
  # add options to a stage, e.g. to shorten the run on a busy machine.
  $ORLIK train pretrain --out "$base" ${PRETRAIN_ARGS:-} >/dev/null
fi
step "2 SFT on the built-in Polish chats (assistant tokens only, WICEL, ALR)"
[ -f "$dir/sft/training.json" ] || $ORLIK train sft "$base" --out "$dir/sft" ${SFT_ARGS:-} >/dev/null
step "3 DPO-Positive on the built-in preference pairs (TRL DPOTrainer)"
[ -f "$dir/dpo/training.json" ] || $ORLIK train dpo "$dir/sft" --out "$dir/dpo" ${DPO_ARGS:-} >/dev/null
step "4 GRPO on the one-word Polish task (TRL GRPOTrainer, verifiable reward)"
[ -f "$dir/grpo/training.json" ] || $ORLIK train grpo "$dir/dpo" --out "$dir/grpo" ${GRPO_ARGS:-} >/dev/null

step "stages"
$PY -m orlik.training.report "$base" "$dir/sft" "$dir/dpo" "$dir/grpo"
echo
echo "demo-train finished in $(( $(date +%s) - start )) s; chat with the result: $ORLIK chat $dir/grpo"
