#!/usr/bin/env bash
# Session 11, call 3 (carry [".whl", ".diag"]): the shipped tree's training mains against the torch.compile peers,
# side by side, with train.compile_cache_dir set (jzero.compile_cache; off in the configs until a GPU has loaded a
# cached step). Each model's first main compiles, autotunes and writes the cache; its second loads that executable
# (compile_s shows it, the step-20 losses must agree). Rows: $OUT/rows.jsonl; logs $OUT/*.log.
set -u
source benchmarks/gpu_env.sh
CACHE=train.compile_cache_dir=$HOME/.cache/jzero/jax_cache
row llama-main-c1 --config configs/llama_1b.yaml --steps 5 --main $CACHE
row llama-main-c2 --config configs/llama_1b.yaml --steps 5 --main $CACHE
for f in "$OUT"/llama-main-c[12].log; do grep "^step" $f | tail -1; grep -o "compile [0-9.]* s" $f; done
peer llama_torch.py
du -sh ~/.cache/jzero/jax_cache; ls ~/.cache/jzero/jax_cache | wc -l
echo "at ${SECONDS}s"
if [ $SECONDS -lt ${BUDGET_S:-380} ]; then
  row gpt2-main-c1 --config configs/gpt2_124m.yaml --steps 10 --main $CACHE
  peer gpt_torch.py
fi
echo "at ${SECONDS}s"
echo "wall ${SECONDS}s"
