#!/usr/bin/env bash
# Session 14, call 1 (carry [".whl", ".diag"]): the acceptance pair for issue 18 part 4 in one call, with the
# session-13 candidates beside the shipped program. Llama-1B main (30-step windows): shipped vs "all3" (deferred
# residual + q/k/v gradients summed in ln_1's kernel (MULTI_DY) + XLA's dot merger off: session 9's profile had
# ~1.5 ms of q/k/v concatenates, and 1.2x needs ~0.6%), then its torch.compile peer; GPT-2 main (50-step windows):
# shipped vs deferred residual + GELU-GEMM FFI handlers in XLA's CUDA graphs (JZERO_LT_GRAPH=1), then its peer.
# First, benchmarks.gemm_probe: the attention projections' GEMMs alone in three weight layouts.
set -u
source benchmarks/gpu_env.sh
OFF=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
ON=--kernel-tile=layer_norm.DEFER_RESIDUAL=1
G="--config configs/gpt2_124m.yaml --steps 50 --main"
L="--config configs/llama_1b.yaml --steps 30 --main"
timeout 60 python3 -m benchmarks.gemm_probe > $OUT/gemm_probe.txt 2>&1; tail -12 $OUT/gemm_probe.txt
row llama-old-r1 $L $OFF
XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=0 row llama-all3-r1 $L $ON --kernel-tile=layer_norm.MULTI_DY=1
echo "at ${SECONDS}s"
PEER_S=200 peer llama_torch.py
echo "at ${SECONDS}s"
row gpt2-old-r1 $G $OFF
JZERO_LT_GRAPH=1 row gpt2-defergraph-r1 $G $ON
echo "at ${SECONDS}s"
[ $SECONDS -lt ${PEER_BY:-480} ] && PEER_S=110 peer gpt_torch.py
grep -h "lt_gemm\|Error" $OUT/gpt2-defergraph-r1.log | head -5
medians
echo "wall ${SECONDS}s"
