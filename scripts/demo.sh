#!/usr/bin/env bash
# The end-to-end demo on the embedded corpus: train the tiny model, calibrate, quantize,
# benchmark and print the table. Every stage is resumable: a rerun skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
ORLIK=${ORLIK:-.venv/bin/orlik}
RUNS=${RUNS:-runs}
MODEL=${MODEL:-tiny}
ARCH=${ARCH:-llama}
dir="$RUNS/$MODEL"
mkdir -p "$dir"
start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/2 tokenizer (SentencePiece BPE, 8k vocab, byte fallback)"
if [ ! -f "$dir/tokenizer/tokenizer.model" ]; then
  $ORLIK train tokenizer --out "$dir/tokenizer" >/dev/null
fi
cat "$dir/tokenizer/report.md"

step "2/2 pretrain the tiny $ARCH model on CPU"
if [ ! -f "$dir/fp16/model.safetensors" ]; then
  $ORLIK train pretrain --arch "$ARCH" --size tiny --tokenizer "$dir/tokenizer" --out "$dir/fp16" >/dev/null
fi
python3 - "$dir/fp16/training.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"{t['arch']}-{t['size']}: {t['parameters']/1e6:.1f}M parameters, {t['steps']} steps, "
      f"{t['tokens_trained']:,} tokens in {t['train_seconds']:.0f} s ({t['tokens_per_second']:,.0f} tok/s), final loss {t['final_loss']:.3f}")
PY
cat "$dir/fp16/eval.md"

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $dir/"
