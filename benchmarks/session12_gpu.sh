#!/usr/bin/env bash
# Session 12 (carry [".whl", ".diag"]): two changes to the norms around the residual stream, A/B in the training
# main, interleaved, with the torch.compile peer in the same call. MODEL=gpt2 (default) or llama.
# (1) layer_norm.MULTI_DY: the block's input norm hands q, k and v their own outputs and its backward kernel sums
#     their three gradients (no XLA add of three [tokens, d] arrays before it);
# (2) layer_norm.DEFER_RESIDUAL: unrolled blocks leave their MLP output (GPT-2: and its proj bias) for the next
#     block's input norm to add in its kernel (no XLA residual add per block, no proj-bias gradient reduction).
# (3) GPT-2 only, models.layers.Q_BIAS_2D: the q projection as a 2-D GEMM + [d] bias, the form XLA's GEMM rewriter
#     folds into a cuBLASLt BIAS epilogue (no [tokens, d] bias-add pass).
# Rows: $OUT/rows.jsonl; logs $OUT/*.log.
# (models.layers.Q_BIAS_2D, the OFF3 switch below, was removed after these calls: re-running this needs the
# commit they ran at, BENCHMARKS.md "Session 12".)
set -u
source benchmarks/gpu_env.sh
MODEL=${MODEL:-gpt2}
OFF1=--kernel-tile=layer_norm.MULTI_DY=0
OFF2=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
OFF3=--kernel-tile=models.layers.Q_BIAS_2D=0
if [ $MODEL = gpt2 ]; then
  G="--config configs/gpt2_124m.yaml --steps 10 --main"; P=gpt_torch.py
else
  G="--config configs/llama_1b.yaml --steps 5 --main"; P=llama_torch.py
fi
for r in 1 2 3; do
  row $MODEL-new-r$r $G
  [ $MODEL = gpt2 ] && row $MODEL-old-r$r $G $OFF1 $OFF2 $OFF3 || row $MODEL-old-r$r $G $OFF1 $OFF2
  [ $MODEL = gpt2 ] && row $MODEL-noq2d-r$r $G $OFF3
  [ $MODEL = gpt2 ] && row $MODEL-nomultidy-r$r $G $OFF1
  [ $r = 1 ] && peer $P
  echo "at ${SECONDS}s"
  [ $SECONDS -gt ${BUDGET_S:-400} ] && break
done
medians
echo "wall ${SECONDS}s"
