#!/usr/bin/env bash
# The end-to-end demo on the embedded corpus: train the tiny model, then `orlik pipeline` with
# scripts/demo.toml (calibrate, quantize, benchmark, print the table). A rerun skips finished work.
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

step "1 tokenizer (SentencePiece BPE, 8k vocab, byte fallback)"
if [ ! -f "$dir/tokenizer/tokenizer.model" ]; then
  $ORLIK train tokenizer --out "$dir/tokenizer" >/dev/null
fi
cat "$dir/tokenizer/report.md"

step "2 pretrain the tiny $ARCH model on CPU"
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

step "3-6 calibration set, importance matrix, GGUF variants (Bielik Table 8 + IQ2_XXS + auto), Table 8 with speed"
# orlik pipeline runs calibrate -> imatrix -> quantize -> bench from scripts/demo.toml; each step whose
# outputs still verify is skipped, so a rerun resumes. make demo-all adds GPTQ, AWQ, HQQ and MLX.
extra=()
if [ "${ALL:-0}" = 1 ]; then extra=(--set 'quantize.recipes=["bielik-table8", "auto-like-Q3_K_M", "bielik-other"]'); fi
$ORLIK pipeline scripts/demo.toml --set model="$dir/fp16" ${extra[@]+"${extra[@]}"}
echo "recommendation for a 32 MiB memory budget at 2k context:"
$ORLIK recommend --memory 32MiB --ctx 2048 --reports "$dir/reports" || true

if [ "${ALL:-0}" = 1 ]; then
  step "7 Polish task accuracy through the endpoint (lm-eval): FP16, Q4_K_M and HQQ 4-bit"
  # Each is served by orlik serve in turn; the accuracy columns join table.md (docs/eval.md).
  $ORLIK eval "$dir/fp16" Q4_K_M hqq-4bit-g64 --out "$dir/reports"
fi

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $dir/"

# How to use what the demo built (kept last, so it is what the terminal shows at the end).
serve_target="$dir/fp16"
for v in "$dir"/variants/*/; do
  if [ -f "$v/variant.json" ] && grep -q '"format": "gguf"' "$v/variant.json"; then serve_target="${v%/}"; break; fi
done
printf '\n\033[1m== try it\033[0m\n'
echo "serve it (OpenAI-compatible API at http://127.0.0.1:8080/v1, web chat at http://127.0.0.1:8080/):"
echo "  $ORLIK serve demo=$serve_target"
echo "then, from another terminal:"
echo "  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "    -d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"Cześć!\"}], \"max_tokens\": 32}'"
echo "or chat in the terminal:"
echo "  $ORLIK chat $serve_target"
