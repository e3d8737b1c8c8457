#!/usr/bin/env bash
# Session 9 on the lent GPU (carry [".whl", ".diag"]): for each model in $MODELS (gpt2, llama), the training main
# on the byte corpus beside its torch.compile peer (../shared/peers, copied unchanged into .diag/peers) in this
# one call, then the step alone with each of this session's changes turned off in turn (the A/B rows):
# JZERO_WEIGHT_COPIES=0 (the model casts the fp32 masters each step) and JZERO_KERNELS without residual_norm
# (the residual add and its skip gradient as XLA passes). Rows: $OUT/rows.jsonl; logs: $OUT/<row>.log.
set -u
source benchmarks/gpu_env.sh
NO_RES=layer_norm,rms_norm,cross_entropy,gelu_gemm,swiglu
for model in ${MODELS:-gpt2 llama}; do
  if [ $model = gpt2 ]; then cfg=configs/gpt2_124m.yaml; peer=gpt_torch.py; n=10; else cfg=configs/llama_1b.yaml; peer=llama_torch.py; n=5; fi
  [ -z "${NO_MAIN:-}" ] && row $model-main-bytes --config $cfg --steps $n --main
  [ -z "${NO_MAIN:-}" ] && (cd .diag/peers && timeout 240 python3 $peer --mode compile) 2>&1 | tail -1
  [ -z "${NO_AB:-}" ] && row $model-step --config $cfg --steps $n
  [ -z "${NO_AB:-}" ] && JZERO_WEIGHT_COPIES=0 row $model-step-no-copies --config $cfg --steps $n
  [ -z "${NO_AB:-}" ] && JZERO_KERNELS=$NO_RES row $model-step-no-residual-norm --config $cfg --steps $n
  [ -n "${PROFILE:-}" ] && row $model-prof --config $cfg --steps $n --profile /tmp/prof_$model && \
    python3 -m benchmarks.trace_top /tmp/prof_$model 400 > $OUT/$model-top.txt 2>&1 && head -45 $OUT/$model-top.txt | cut -c1-150
done
