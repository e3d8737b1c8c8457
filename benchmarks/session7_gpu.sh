#!/usr/bin/env bash
# Session 7's first GPU call (device tool; carry [".whl"]): the cuBLASLt algorithm choice's bits across processes
# and its speed in the GPT-2 124M step (issue 23), then overlap_comm in XLA:GPU's schedule for a mock 8-GPU
# topology (issue 21 item 4). Logs and the recorded choices land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader
timeout 240 python3 -m benchmarks.lt_algo_check > "$OUT/lt_check.log" 2>&1; echo "lt_check rc $?"; cat "$OUT/lt_check.log" | tail -12
grep -v '^#' "$OUT/lt_check.log" | grep -E '^NVIDIA|^[A-Za-z0-9_-]+_sm[0-9]+ ' > "$OUT/algos.txt"
C="--config configs/gpt2_124m.yaml --steps 10"
row() { name=$1; shift; timeout 200 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" "$@" > "$OUT/$name.log" 2>&1 || tail -4 "$OUT/$name.log"; tail -2 "$OUT/$name.log"; }
JZERO_LT_ALGOS=/tmp/none.txt row gpt2-step-heuristic0 $C
JZERO_LT_ALGOS="$OUT/algos.txt" row gpt2-step-recorded $C
timeout 330 python3 -m benchmarks.overlap_gpu --topology 1x8x1 --hlo "$OUT/hlo" --timeout 100 > "$OUT/overlap.log" 2>&1; echo "overlap rc $?"; grep -E "^\||error|timeout" "$OUT/overlap.log" | tail -12
