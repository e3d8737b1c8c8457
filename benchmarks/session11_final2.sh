#!/usr/bin/env bash
# Session 11, last call (carry [".whl", ".diag"]; ~270 s of device time left): the GPT-2 main twice with
# train.compile_cache_dir (the second loads the first's executable: compile_s and the step-40 loss show it) and the
# torch.compile peer, side by side. Rows: $OUT/rows.jsonl; logs $OUT/*.log.
set -u
source benchmarks/gpu_env.sh
CACHE=train.compile_cache_dir=$HOME/.cache/jzero/jax_cache
row gpt2-main-c1 --config configs/gpt2_124m.yaml --steps 10 --main $CACHE
row gpt2-main-c2 --config configs/gpt2_124m.yaml --steps 10 --main $CACHE
for f in "$OUT"/gpt2-main-c[12].log; do grep "^step" $f | tail -1; grep -o "compile [0-9.]* s" $f; done
du -sh ~/.cache/jzero/jax_cache; ls ~/.cache/jzero/jax_cache | wc -l
PEER_S=150 peer gpt_torch.py
echo "wall ${SECONDS}s"
