#!/usr/bin/env bash
# Session 9 (carry [".whl"]): Llama-1B's step traced with this session's two changes (weight copies, residual_norm)
# and with both off, each trace's kernels summed by name (benchmarks/trace_top.py) into $OUT/llama-{on,off}-top.txt.
set -u
source benchmarks/gpu_env.sh
prof() { name=$1; shift; timeout 300 python3 -m benchmarks.bench --name "llama-$name" --json "$OUT/rows.jsonl" \
  --config configs/llama_1b.yaml --steps 5 --profile /tmp/prof_$name > "$OUT/llama-$name.log" 2>&1 || tail -3 "$OUT/llama-$name.log"
  tail -1 "$OUT/llama-$name.log"; python3 -m benchmarks.trace_top /tmp/prof_$name 400 > "$OUT/llama-$name-top.txt" 2>&1; }
prof on
JZERO_WEIGHT_COPIES=0 JZERO_KERNELS=layer_norm,rms_norm,cross_entropy,gelu_gemm,swiglu prof off
