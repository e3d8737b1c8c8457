#!/usr/bin/env bash
# Session 8 side by side on the lent GPU (carry [".whl", ".diag"]): the kernel tile sweep at Llama-1B's shapes, then
# for GPT-2 124M and Llama-1B the training main on the byte corpus and the torch.compile peer (../shared/peers,
# copied unchanged into .diag/peers), all in this one call; Llama's step alone last. Rows: $OUT/rows.jsonl.
set -u
source benchmarks/gpu_env.sh
[ -z "${NO_SWEEP:-}" ] && timeout 120 python3 -m benchmarks.kernel_bench --ops rms_norm,swiglu --d-model 2048 --d-ff 8192 --sweep 2>&1 | tail -19
for model in ${MODELS:-gpt2 llama}; do
  if [ $model = gpt2 ]; then
    row gpt2-main-bytes --config configs/gpt2_124m.yaml --steps 10 --main
    (cd .diag/peers && timeout 240 python3 gpt_torch.py --mode compile) 2>&1 | tail -1
  else
    row llama-main-bytes --config configs/llama_1b.yaml --steps 5 --main
    (cd .diag/peers && timeout 240 python3 llama_torch.py --mode compile) 2>&1 | tail -1
  fi
done
[ -n "${STEP_ROWS:-}" ] && row llama-step --config configs/llama_1b.yaml --steps 5
