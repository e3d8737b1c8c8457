#!/usr/bin/env bash
# Session 10, call 1 (carry [".whl"]): where GPT-2 124M's and Llama-1B's steps leave the GPU idle. Each row is a
# `bench` step with a 3-step trace and its optimized HLO: kernels summed by name and the idle gaps between them
# (benchmarks/trace_top.py), and how many XLA command buffers (CUDA graphs) the compiled step holds. Variants: the
# GELU-GEMM FFI handlers outside the graphs (shipped) or inside (JZERO_LT_GRAPH=1), command buffers off, and
# XLA's smallest graph size 1. Output: $OUT/rows.jsonl, $OUT/top.txt (every trace_top), $OUT/logs.txt.
set -u
source benchmarks/gpu_env.sh
prof() {
  name=$1; cfg=$2; shift 2
  if [ $SECONDS -gt ${BUDGET_S:-330} ]; then echo "$name: skipped (${SECONDS}s used)"; return; fi
  timeout 240 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" --config "$cfg" --steps 10 \
    --profile /tmp/prof_$name --hlo /tmp/hlo_$name.txt "$@" > /tmp/log_$name.txt 2>&1 || tail -4 /tmp/log_$name.txt
  { echo "=== $name"; cat /tmp/log_$name.txt; } >> /tmp/logs.txt
  tail -1 /tmp/log_$name.txt
  python3 -m benchmarks.trace_top /tmp/prof_$name 80 > /tmp/top_$name.txt 2>&1
  { echo "=== $name"; cat /tmp/top_$name.txt; } >> "$OUT/top.txt"
  head -1 /tmp/top_$name.txt; tail -6 /tmp/top_$name.txt
  echo "$name: HLO lines naming command_buffer: $(grep -c command_buffer /tmp/hlo_$name.txt 2>/dev/null)," \
       "jzero_gemm calls: $(grep -c 'custom_call_target="jzero_gemm' /tmp/hlo_$name.txt 2>/dev/null)"
  grep -m3 -o 'xla_gpu_enable_command_buffer[^ ]*' /tmp/hlo_$name.txt 2>/dev/null
}
prof gpt2-shipped configs/gpt2_124m.yaml
JZERO_LT_GRAPH=1 prof gpt2-ffi-graph configs/gpt2_124m.yaml
prof llama-shipped configs/llama_1b.yaml --steps 5
XLA_FLAGS="--xla_gpu_enable_command_buffer=" prof gpt2-cmdbuf-off configs/gpt2_124m.yaml
XLA_FLAGS="--xla_gpu_enable_command_buffer=" prof llama-cmdbuf-off configs/llama_1b.yaml --steps 5
XLA_FLAGS="--xla_gpu_graph_min_graph_size=1" prof gpt2-mingraph1 configs/gpt2_124m.yaml
cp /tmp/logs.txt "$OUT/logs.txt"
cp /tmp/hlo_gpt2-shipped.txt "$OUT/hlo_gpt2.txt" 2>/dev/null
gzip -c /tmp/hlo_llama-shipped.txt > "$OUT/hlo_llama.txt.gz" 2>/dev/null
