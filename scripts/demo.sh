#!/usr/bin/env bash
# The end-to-end demo on the embedded corpus: pretrain the tiny model (runs/<m>/base), tune it to chat
# with SFT (runs/<m>/fp16, the model every variant comes from, as the Bielik releases ship their
# instruction-tuned models), then `orlik pipeline` with scripts/demo.toml (calibrate, quantize,
# benchmark, print the table). A rerun skips finished work. PRETRAIN_ARGS and SFT_ARGS add options to
# those stages; PIPELINE_ARGS to `orlik pipeline` (e.g. PIPELINE_ARGS='--set bench.speed=false').
set -euo pipefail
cd "$(dirname "$0")/.."
ORLIK=${ORLIK:-.venv/bin/orlik}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
MODEL=${MODEL:-tiny}
ARCH=${ARCH:-llama}
dir="$RUNS/$MODEL"
mkdir -p "$dir"
start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
verb() { [ -f "$1/training.json" ] && $PY -c 'import json, sys; print(json.load(open(sys.argv[1])).get("args", {}).get("verb", "pretrain"))' "$1/training.json"; }
is_pretrained() { [ "$(verb "$1" || true)" = pretrain ]; }
is_sft() { [ "$(verb "$1" || true)" = sft ]; }

step "1 tokenizer (SentencePiece BPE, 8k vocab, byte fallback)"
if [ ! -f "$dir/tokenizer/tokenizer.model" ]; then
  $ORLIK train tokenizer --out "$dir/tokenizer" >/dev/null
fi
cat "$dir/tokenizer/report.md"

step "2 pretrain the tiny $ARCH model on CPU"
if [ ! -f "$dir/base/model.safetensors" ] && is_pretrained "$dir/fp16"; then
  mv "$dir/fp16" "$dir/base"  # an earlier demo's pretrained model (it lived in fp16/ before the SFT step)
fi
if [ ! -f "$dir/base/model.safetensors" ]; then
  $ORLIK train pretrain --arch "$ARCH" --size tiny --tokenizer "$dir/tokenizer" --out "$dir/base" \
    ${PRETRAIN_ARGS:-} >/dev/null
fi
$PY - "$dir/base/training.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"{t['arch']}-{t['size']}: {t['parameters']/1e6:.1f}M parameters, {t['steps']} steps, "
      f"{t['tokens_trained']:,} tokens in {t['train_seconds']:.0f} s ({t['tokens_per_second']:,.0f} tok/s), final loss {t['final_loss']:.3f}")
PY
cat "$dir/base/eval.md"

step "3 SFT on the built-in Polish chats (loss on assistant tokens only, WICEL, ALR): the chat model to quantize"
if ! is_sft "$dir/fp16"; then
  $ORLIK train sft "$dir/base" --out "$dir/fp16" --epochs 2 ${SFT_ARGS:-} >/dev/null
fi
$PY -m orlik.training.report "$dir/base" "$dir/fp16"

step "4-7 calibration set, importance matrix, GGUF variants (Bielik Table 8 + IQ2_XXS + auto), Table 8 with speed"
# orlik pipeline runs calibrate -> imatrix -> quantize -> bench from scripts/demo.toml; each step whose
# outputs still verify is skipped, so a rerun resumes. make demo-all adds GPTQ, AWQ, HQQ and MLX.
extra=()
if [ "${ALL:-0}" = 1 ]; then extra=(--set 'quantize.recipes=["bielik-table8", "auto-like-Q3_K_M", "bielik-other"]'); fi
read -r -a more <<< "${PIPELINE_ARGS:-}"  # split on spaces, no globbing of [...] values
$ORLIK pipeline scripts/demo.toml --set model="$dir/fp16" ${extra[@]+"${extra[@]}"} ${more[@]+"${more[@]}"}
echo "recommendation for a 32 MiB memory budget at 2k context:"
pick=$($ORLIK --json recommend --memory 32MiB --ctx 2048 --reports "$dir/reports" 2>/dev/null \
  | $PY -c 'import json, sys; r = json.load(sys.stdin); print(r["why"]); print(r["pick"] or "")' || true)
printf '%s\n' "$pick" | head -n 1
pick=$(printf '%s\n' "$pick" | sed -n 2p)

if [ "${ALL:-0}" = 1 ]; then
  step "8 Polish task accuracy through the endpoint (lm-eval): FP16, Q4_K_M and HQQ 4-bit"
  # Each is served by orlik serve in turn; the accuracy columns join table.md (docs/eval.md).
  $ORLIK eval "$dir/fp16" Q4_K_M hqq-4bit-g64 --out "$dir/reports"
fi

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $dir/"

# How to use what the demo built (kept last, so it is what the terminal shows at the end).
# the recommended variant when there is one (a GGUF, served by llama-server), else the FP16 model
serve_target="$dir/fp16"
if [ -n "${pick:-}" ] && [ "$pick" != FP16 ] && [ -f "$dir/variants/$pick/variant.json" ]; then
  serve_target="$dir/variants/$pick"
fi
printf '\n\033[1m== try it\033[0m\n'
echo "serve it (OpenAI-compatible API at http://127.0.0.1:8080/v1, web chat at http://127.0.0.1:8080/):"
echo "  $ORLIK serve demo=$serve_target"
echo "then, from another terminal:"
echo "  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "    -d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"Cześć!\"}], \"max_tokens\": 32}'"
echo "or chat in the terminal:"
echo "  $ORLIK chat $serve_target"
