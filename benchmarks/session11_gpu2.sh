#!/usr/bin/env bash
# Session 11, call 2 (carry [".whl", ".diag"]): two changes to GPT-2's bias handling, A/B in the training main.
# (1) gelu_gemm.WGRAD_BGRAD: the MLP's bias gradients summed inside the weight-gradient GEMMs (cuBLASLt BGRADB)
# instead of XLA reductions over [tokens, 3072] and [tokens, 768]; (2) layer_norm.RESIDUAL_BIAS: the attention's
# output bias added inside ln_2's residual_norm kernel (and its gradient summed in the backward kernel) instead of
# an XLA add pass and a reduction. First the BGRADB handler against its formula and the MLP alone
# (gelu_gemm_check), then the main in 4 variants x 2 rounds, interleaved, the torch.compile peer between rounds.
# Rows: $OUT/rows.jsonl; logs $OUT/*.log.
set -u
source benchmarks/gpu_env.sh
NOB=--kernel-tile=gelu_gemm.WGRAD_BGRAD=0
NOR=--kernel-tile=layer_norm.RESIDUAL_BIAS=0
JZERO_LT_VERBOSE=1 timeout 150 python3 -m benchmarks.gelu_gemm_check > "$OUT/gelu_gemm_check.log" 2>&1
grep -v "^jzero lt_gemm" "$OUT/gelu_gemm_check.log" | tail -40; grep "^jzero lt_gemm" "$OUT/gelu_gemm_check.log" | sort -u | head
G="--config configs/gpt2_124m.yaml --steps 10 --main"
for r in 1 2; do
  row gpt2-both-r$r $G
  row gpt2-nobgradb-r$r $G $NOB
  row gpt2-norbias-r$r $G $NOR
  row gpt2-neither-r$r $G $NOB $NOR
  [ $r = 1 ] && peer gpt_torch.py
  echo "at ${SECONDS}s"
  [ $SECONDS -gt ${BUDGET_S:-330} ] && break
done
medians
echo "wall ${SECONDS}s"
