#!/usr/bin/env bash
# Session 14, call 3 (carry [".whl", ".diag"]): issue 18 part 4's acceptance pair with the shipped defaults (Llama:
# deferred residual + MULTI_DY + dot merger off, adopted from calls 1-2 on an H100), side by side in one call:
# Llama-1B main (30-step windows) twice around its torch.compile peer, then the GPT-2 main (50-step windows) and
# its peer. No flags or kernel tiles given: what `python -m train.pretrain` runs.
set -u
source benchmarks/gpu_env.sh
row llama-main-r1 --config configs/llama_1b.yaml --steps 30 --main
PEER_S=200 peer llama_torch.py
row llama-main-r2 --config configs/llama_1b.yaml --steps 30 --main
echo "at ${SECONDS}s"
row gpt2-main-r1 --config configs/gpt2_124m.yaml --steps 50 --main
[ $SECONDS -lt ${PEER_BY:-440} ] && PEER_S=110 peer gpt_torch.py
[ $SECONDS -lt ${PEER_BY:-440} ] && row llama-main-r3 --config configs/llama_1b.yaml --steps 30 --main
medians
echo "wall ${SECONDS}s"
