#!/usr/bin/env bash
# Session 14, last call (carry [".whl", ".diag"]; ~300 s of device time left): session14_gpu2.sh cut to what fits:
# the Llama-1B main with the shipped defaults beside its torch.compile peer, then the GPT-2 main and (if time is
# left) its peer. No flags or kernel tiles given: what `python -m train.pretrain` runs.
set -u
source benchmarks/gpu_env.sh
row llama-main-r1 --config configs/llama_1b.yaml --steps 30 --main
PEER_S=150 peer llama_torch.py
echo "at ${SECONDS}s"
row gpt2-main-r1 --config configs/gpt2_124m.yaml --steps 50 --main
[ $SECONDS -lt ${PEER_BY:-170} ] && PEER_S=90 peer gpt_torch.py
echo "wall ${SECONDS}s"
