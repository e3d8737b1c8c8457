#!/usr/bin/env bash
# Session 10 (carry [".whl", ".diag"]): the training main on the byte corpus against its torch.compile peer, side
# by side in one call: `bash benchmarks/session10_final.sh MODEL [CANDIDATE_ENV]` with MODEL gpt2 or llama.
# The main runs as shipped and, given CANDIDATE_ENV ('KEY=VALUE;KEY=VALUE'), with that environment too,
# interleaved over rounds (benchmarks/ab_main.py); the peer (.diag/peers: unchanged copies of ../shared/peers)
# runs between the rounds' halves. Rows: $OUT/ab_MODEL.jsonl.
set -u
source benchmarks/gpu_env.sh
model=$1; cand=${2:-}
if [ "$model" = gpt2 ]; then cfg=configs/gpt2_124m.yaml; steps=10; peer=gpt_torch.py; rounds=${ROUNDS:-2}
else cfg=configs/llama_1b.yaml; steps=5; peer=llama_torch.py; rounds=${ROUNDS:-1}; fi
variants=(--variant shipped=); [ -n "$cand" ] && variants+=(--variant "candidate=$cand")
timeout 280 python3 -m benchmarks.ab_main --config $cfg --steps $steps --rounds $rounds --json $OUT/ab_$model.jsonl \
  "${variants[@]}" 2>&1 | tail -6
(cd .diag/peers && timeout 200 python3 $peer --mode compile) 2>&1 | tail -1
timeout 200 python3 -m benchmarks.ab_main --config $cfg --steps $steps --rounds 1 --json $OUT/ab_$model.jsonl \
  "${variants[@]}" 2>&1 | tail -6
