#!/usr/bin/env bash
# Session 6's one GPU call (device tool; carry [".whl", ".diag"]): overlap_comm in XLA:GPU's schedule for a mock
# 8-GPU topology (issue 21), the cuBLASLt algorithm choice's bits and speed (issue 23), and GPT-2 124M's step and
# main with the PyTorch peer (issue 18), in this order so the cheap rows come first.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader
python3 -m benchmarks.overlap_gpu --topology 1x8x1 --hlo "$OUT/hlo" --timeout 60 2>&1 | tee "$OUT/overlap.log" | grep "^|"
timeout 120 python3 -m benchmarks.lt_algo_check 2>&1 | tail -6
C="--config configs/gpt2_124m.yaml --steps 10"
row() { name=$1; shift; timeout 150 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" "$@" > "$OUT/$name.log" 2>&1 || tail -3 "$OUT/$name.log"; tail -1 "$OUT/$name.log"; }
row gpt2-step-heuristic0 $C
JZERO_LT_AUTOTUNE=1 JZERO_LT_ALGOS=/tmp/algos.txt row gpt2-step-autotune $C
JZERO_LT_ALGOS=/tmp/algos.txt row gpt2-main-bytes-recorded $C --main
(cd .diag/peers && timeout 200 python3 gpt_torch.py --mode compile) 2>&1 | tail -1
