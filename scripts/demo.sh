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

step "3 calibration set (Polish-leaning Polish-English mix, counted with the model's tokenizer)"
# Reused when calibration.jsonl still has the hash its card recorded.
if ! python3 - "$dir/calib" <<'PY'
import hashlib, json, sys, pathlib
d = pathlib.Path(sys.argv[1])
try:
    ok = json.loads((d / "card.json").read_text())["calibration_sha256"] == hashlib.sha256((d / "calibration.jsonl").read_bytes()).hexdigest()
except (OSError, ValueError, KeyError):
    ok = False
sys.exit(0 if ok else 1)
PY
then
  $ORLIK calibrate build "$dir/fp16" --out "$dir/calib" >/dev/null
fi
python3 - "$dir/calib/card.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["result"]
print(f"{c['samples']} samples, {c['tokens']:,} tokens; by language {c['tokens_by_lang']}; by source {c['tokens_by_source']}")
PY

step "4 importance matrix (llama-imatrix on the F16 GGUF, Polish-English mix)"
# Reused when its card matches the calibration set, the checkpoint and the chunk size.
imatrix=$($ORLIK -q --json calibrate imatrix "$dir/fp16" --calib "$dir/calib" --lang mixed)
python3 - "$imatrix" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"{r['out']}: {r['chunks']} chunks x {r['chunk_size']} tokens, {r['entries']} weight matrices, "
      f"F16 perplexity on the set {r['perplexity_f16']:.1f}" + (" (reused)" if r["reused"] else ""))
PY

step "5 GGUF variants: Bielik Table 8 (Q8_0 .. Q2_K, each with and without imatrix) + IQ2_XXS"
# Variants whose variant.json hashes verify are skipped; a damaged one is rebuilt.
$ORLIK -q quantize "$dir/fp16" --recipe bielik-table8 --recipe auto-like-Q3_K_M --calib "$dir/calib" --out "$dir/variants" >/dev/null
python3 - "$dir/variants" <<'PY'
import json, sys, pathlib
rows = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*/variant.json")]
rows = [v for v in rows if v["format"] == "gguf"]
print(f"{'variant':<14} {'MiB':>7} {'bpw':>6} {'blocks bpw':>10}  imatrix")
for v in sorted(rows, key=lambda v: (-v["bpw"], v["name"])):
    print(f"{v['name']:<14} {v['bytes'] / 2**20:7.2f} {v['bpw']:6.2f} {v['extra']['blocks_bpw']:10.2f}  {'yes' if v['imatrix_hash'] else 'no'}")
PY

if [ "${ALL:-0}" = 1 ]; then
  step "5b GPTQ, AWQ, HQQ and MLX variants (make demo-all): gptq-w4g128, awq-w4g128, hqq-3bit/4bit-g64, mlx-q4/q3"
  # GPTQ and AWQ read the same calibration set; HQQ needs none; MLX runs on mlx-cpu here, Metal on a Mac.
  $ORLIK -q quantize "$dir/fp16" --recipe bielik-other --calib "$dir/calib" --out "$dir/variants" >/dev/null
  python3 - "$dir/variants" <<'PY'
import json, sys, pathlib
rows = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*/variant.json")]
for v in sorted((v for v in rows if v["format"] != "gguf"), key=lambda v: (v["format"], -v["bpw"])):
    print(f"{v['name']:<14} {v['bytes'] / 2**20:7.2f} MiB {v['bpw']:6.2f} bpw  {', '.join(f'{k} {x}' for k, x in v['tools'].items())}")
PY
fi

step "6 Table 8: every variant against FP16 on the held-out text (llama.cpp's method), speed and memory"
# The FP16 reference is cached under reports/reference/; pareto.png and speed.png sit beside table.md.
$ORLIK bench "$dir/fp16" --variants-dir "$dir/variants" --out "$dir/reports" --speed --license apache-2.0
echo "recommendation for a 32 MiB memory budget at 2k context:"
$ORLIK recommend --memory 32MiB --ctx 2048 --reports "$dir/reports" || true

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
