#!/usr/bin/env bash
# timing.sh MODEL_DIR NAME [orlik options]: one round of stock Q4_K_M-imat, auto-like-Q4_K_M with its
# sensitivity pass uncached (a seed derived from NAME), and stock Q4_K_M-imat again, into
# /tmp/timing-NAME (times.txt: wall/user/sys). MODEL_DIR holds fp16/ and calib/ (build-real-model.sh).
# CLEAR_KLD=1 deletes the cached F16 reference logits first, so the auto run computes them too.
# Processes named `orlik train pretrain` are paused meanwhile (SIGSTOP/SIGCONT).
set -u
M=$1; NAME=$2; shift 2
cd "$(dirname "$0")/../.."
O=/tmp/timing-$NAME; rm -rf "$O"; mkdir -p "$O"
SEED=$(( $(echo "$NAME" | cksum | cut -d' ' -f1) % 100000 + 1000 ))
PIDS=$(pgrep -f 'orlik train pretrain' || true)
[ -n "$PIDS" ] && kill -STOP $PIDS
sleep 2
t() { local n=$1; shift; /usr/bin/time -f "$n wall %e user %U sys %S" -a -o "$O/times.txt" "$@" > "$O/$n.log" 2>&1; }
t stock1 .venv/bin/orlik quantize "$M/fp16" --recipe Q4_K_M-imat --calib "$M/calib" --out "$O/v" --force
[ -n "${CLEAR_KLD:-}" ] && rm -rf "${ORLIK_CACHE:-$HOME/.cache/orlik}"/sensitivity/kld-*
t auto .venv/bin/orlik quantize "$M/fp16" --recipe auto-like-Q4_K_M --calib "$M/calib" --out "$O/v" --force --option seed=$SEED "$@"
t stock2 .venv/bin/orlik quantize "$M/fp16" --recipe Q4_K_M-imat --calib "$M/calib" --out "$O/v" --force
[ -n "$PIDS" ] && kill -CONT $PIDS
cat "$O/times.txt"
python3 -c "
import json; a = json.load(open('$O/v/auto-like-Q4_K_M/variant.json'))['extra']['auto']
print(json.dumps(a['seconds']), 'cached' if a['sensitivity_cached'] else 'uncached')"
