#!/usr/bin/env bash
# Session 13, call 2 (carry [".whl", ".diag"]). GPT-2 main, 50-step windows: the old program, the deferred residual
# (layer_norm.DEFER_RESIDUAL=1; -0.11 ms in call 1's H100), and that with the GELU-GEMM FFI handlers inside XLA's
# CUDA graphs (JZERO_LT_GRAPH=1; call 1: command buffers off cost +0.74 ms, so graphs are in effect and the 24 FFI
# calls a step split them). Llama-1B main, 30-step windows: the old program against all three candidates at once
# (deferred residual, q/k/v gradients summed in ln_1's kernel (MULTI_DY), XLA's dot merger off: session 9's profile
# had ~1.5 ms of q/k/v concatenates). EXTRA=1 adds a GPT-2 row with every command-buffer type XLA can capture
# named and graphs of any size. Rounds interleaved while the budget lasts (BUDGET_S, seconds of this script).
set -u
source benchmarks/gpu_env.sh
OFF=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
ON=--kernel-tile=layer_norm.DEFER_RESIDUAL=1
G="--config configs/gpt2_124m.yaml --steps 50 --main"
L="--config configs/llama_1b.yaml --steps 30 --main"
B=${BUDGET_S:-420}
for r in 1 2; do
  [ $SECONDS -gt $B ] && break
  row gpt2-old-r$r $G $OFF
  row gpt2-defer-r$r $G $ON
  JZERO_LT_GRAPH=1 row gpt2-defergraph-r$r $G $ON
  # XLA's graphs with every command type it can capture named, and no minimum graph size
  [ ${EXTRA:-0} = 1 ] && JZERO_LT_GRAPH=1 XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" \
    row gpt2-allgraph-r$r $G $ON
  echo "at ${SECONDS}s"
  [ $SECONDS -gt $B ] || [ ${LLAMA:-1} = 0 ] && continue
  row llama-old-r$r $L $OFF
  XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=0 row llama-all3-r$r $L $ON --kernel-tile=layer_norm.MULTI_DY=1
  echo "at ${SECONDS}s"
done
grep -h "lt_gemm\|Error" $OUT/gpt2-defergraph-r1.log | head -5
medians
echo "wall ${SECONDS}s"
