#!/usr/bin/env bash
# Session 13, call 2 (carry [".whl", ".diag"]): GPT-2 main, 50-step windows, 2 rounds interleaved: the old program,
# the deferred residual (layer_norm.DEFER_RESIDUAL=1; -0.11 ms in call 1's H100), and that with the GELU-GEMM FFI
# handlers inside XLA's CUDA graphs (JZERO_LT_GRAPH=1; call 1: command buffers off cost +0.74 ms, so graphs are in
# effect and the 24 FFI calls a step split them). Then, budget permitting, Llama-1B main old vs deferred residual.
set -u
source benchmarks/gpu_env.sh
OFF=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
ON=--kernel-tile=layer_norm.DEFER_RESIDUAL=1
G="--config configs/gpt2_124m.yaml --steps 50 --main"
for r in 1 2; do
  row gpt2-old-r$r $G $OFF
  row gpt2-defer-r$r $G $ON
  JZERO_LT_GRAPH=1 row gpt2-defergraph-r$r $G $ON
  echo "at ${SECONDS}s"
done
L="--config configs/llama_1b.yaml --steps 30 --main"
for r in 1 2; do
  [ $SECONDS -gt ${BUDGET_S:-330} ] && break
  row llama-old-r$r $L $OFF
  row llama-defer-r$r $L $ON
  echo "at ${SECONDS}s"
done
grep -h "lt_gemm\|Error\|error" $OUT/gpt2-defergraph-r1.log | head -5
medians
echo "wall ${SECONDS}s"
