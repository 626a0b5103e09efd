#!/usr/bin/env bash
# run.sh MODEL_DIR OUT_DIR: stock Q4_K_M/Q3_K_M/Q2_K-imat and auto-like-* (defaults) on MODEL_DIR
# (fp16/, calib/ and variants/F16 as build-real-model.sh leaves them), scored per chunk on the
# held-out Polish text (paired.py) and reported stock against auto (report.py).
set -euo pipefail
M=$1; O=$2; V=$M/variants; mkdir -p "$O"
cd "$(dirname "$0")/../.."
S=scripts/auto-eval
.venv/bin/orlik quantize "$M/fp16" --recipe Q4_K_M-imat --recipe Q3_K_M-imat --recipe Q2_K-imat --calib "$M/calib"
.venv/bin/orlik quantize "$M/fp16" --recipe auto-like-Q4_K_M --recipe auto-like-Q3_K_M --recipe auto-like-Q2_K --calib "$M/calib"
F=()
for r in Q4_K_M-imat Q3_K_M-imat Q2_K-imat auto-like-Q4_K_M auto-like-Q3_K_M auto-like-Q2_K; do F+=("$r=$V/$r/model.gguf"); done
.venv/bin/python $S/paired.py "$V/F16/model.gguf" "$O/paired512.json" "${F[@]}"
.venv/bin/python $S/report.py "$O/paired512.json" Q4_K_M-imat:auto-like-Q4_K_M Q3_K_M-imat:auto-like-Q3_K_M Q2_K-imat:auto-like-Q2_K | tee "$O/report.txt"
