#!/usr/bin/env bash
# Session 11, call 2 (carry [".whl", ".diag"]): GPT-2's MLP bias gradients summed inside the weight-gradient GEMMs
# (cuBLASLt BGRADB, jzero.kernels.gelu_gemm.WGRAD_BGRAD): the handler against its formula and the MLP fwd+bwd
# alone (gelu_gemm_check), then the GPT-2 main with and without it, interleaved, the torch.compile peer between.
# Then, as time allows, the Llama-1B main twice with train.compile_cache_dir (the second loads the first's
# executable; same step-20 loss expected) and its peer. Rows: $OUT/rows.jsonl; logs $OUT/*.log.
set -u
source benchmarks/gpu_env.sh
NO=--kernel-tile=gelu_gemm.WGRAD_BGRAD=0
CACHE=train.compile_cache_dir=$HOME/.cache/jzero/jax_cache
peer() { (cd .diag/peers && timeout 220 python3 $1 --mode compile) > "$OUT/peer_$1.log" 2>&1; tail -1 "$OUT/peer_$1.log"; }
JZERO_LT_VERBOSE=1 timeout 150 python3 -m benchmarks.gelu_gemm_check > "$OUT/gelu_gemm_check.log" 2>&1
grep -v "^jzero lt_gemm" "$OUT/gelu_gemm_check.log" | tail -40; grep "^jzero lt_gemm" "$OUT/gelu_gemm_check.log" | sort -u | head
row gpt2-main-bgradb --config configs/gpt2_124m.yaml --steps 10 --main
row gpt2-main-nobgradb --config configs/gpt2_124m.yaml --steps 10 --main $NO
peer gpt_torch.py
row gpt2-main-bgradb2 --config configs/gpt2_124m.yaml --steps 10 --main
row gpt2-main-nobgradb2 --config configs/gpt2_124m.yaml --steps 10 --main $NO
echo "at ${SECONDS}s"
if [ $SECONDS -lt ${BUDGET_S:-330} ]; then
  row llama-main-c1 --config configs/llama_1b.yaml --steps 5 --main $CACHE
  row llama-main-c2 --config configs/llama_1b.yaml --steps 5 --main $CACHE
  grep -h "^step 20/20" "$OUT"/llama-main-c[12].log
  grep -h "compile" "$OUT"/llama-main-c[12].log | head -4
  peer llama_torch.py
  du -sh ~/.cache/jzero/jax_cache
fi
echo "wall ${SECONDS}s"
