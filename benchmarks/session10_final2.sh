#!/usr/bin/env bash
# Session 10, call 2, not run: no machine (carry [".whl", ".diag"]): the training mains with
# train.compile_cache_dir (jzero.compile_cache, off in the configs, set here)
# against their torch.compile peers, side by side. Each model's first main compiles, autotunes and writes the
# cache; the later mains load that executable (compile_s shows it) and so run the first one's kernel choices. The
# peers (.diag/peers: unchanged copies of ../shared/peers) run between. Rows: $OUT/rows.jsonl; logs $OUT/*.log.
set -u
source benchmarks/gpu_env.sh
CACHE=train.compile_cache_dir=$HOME/.cache/jzero/jax_cache
peer() { (cd .diag/peers && timeout 220 python3 $1 --mode compile) > "$OUT/peer_$1.log" 2>&1; tail -1 "$OUT/peer_$1.log"; }
row llama-main-c1 --config configs/llama_1b.yaml --steps 5 --main $CACHE
row llama-main-c2 --config configs/llama_1b.yaml --steps 5 --main $CACHE
grep -h "^step 20/20" "$OUT"/llama-main-c[12].log   # the same losses: the loaded executable computes the same
peer llama_torch.py
row llama-main-c3 --config configs/llama_1b.yaml --steps 5 --main $CACHE
du -sh ~/.cache/jzero/jax_cache; ls ~/.cache/jzero/jax_cache | head -5
if [ $SECONDS -lt ${BUDGET_S:-380} ]; then
  row gpt2-main-c1 --config configs/gpt2_124m.yaml --steps 10 --main $CACHE
  peer gpt_torch.py
  row gpt2-main-c2 --config configs/gpt2_124m.yaml --steps 10 --main $CACHE
else echo "GPT-2 rows skipped (${SECONDS}s used)"; fi
echo "wall ${SECONDS}s"
