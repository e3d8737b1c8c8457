#!/usr/bin/env bash
# Session 11, call 1 (carry [".whl", ".diag"]): GPT-2 124M's cross-entropy with the whole row in registers
# (jzero.kernels.cross_entropy WHOLE_ROW_MAX: one HBM read of the logits instead of two), first alone
# (kernel_bench sweep at the LM head's shape), then in the training main against the shipped two-pass kernel,
# interleaved, with the torch.compile peer between; then GPT-2's step profiled with its HLO so the add/reduce
# fusions left in the profile get names. Rows: $OUT/rows.jsonl; logs $OUT/*.log; fusion report $OUT/fusions.txt.
set -u
source benchmarks/gpu_env.sh
WR=--kernel-tile=cross_entropy.WHOLE_ROW_MAX=65536
timeout 200 python3 -m benchmarks.kernel_bench --ops cross_entropy --tokens 16384 --d-model 768 --vocab 50304 \
  --sweep > "$OUT/ce_sweep.log" 2>&1; tail -9 "$OUT/ce_sweep.log"
row gpt2-main-shipped --config configs/gpt2_124m.yaml --steps 10 --main
row gpt2-main-wholerow --config configs/gpt2_124m.yaml --steps 10 --main $WR
peer gpt_torch.py
row gpt2-main-shipped2 --config configs/gpt2_124m.yaml --steps 10 --main
row gpt2-main-wholerow2 --config configs/gpt2_124m.yaml --steps 10 --main $WR
echo "at ${SECONDS}s"
if [ $SECONDS -lt ${BUDGET_S:-400} ]; then
  timeout 150 python3 -m benchmarks.bench --name gpt2-prof --config configs/gpt2_124m.yaml --steps 5 $WR \
    --profile /tmp/prof --hlo $OUT/gpt2_hlo.txt > "$OUT/gpt2-prof.log" 2>&1; tail -1 "$OUT/gpt2-prof.log"
  python3 -m benchmarks.trace_top /tmp/prof 60 > "$OUT/top.txt" 2>&1; tail -7 "$OUT/top.txt"
  python3 -m benchmarks.fusion_report /tmp/prof $OUT/gpt2_hlo.txt 40 > "$OUT/fusions.txt" 2>&1; head -60 "$OUT/fusions.txt"
  gzip -f $OUT/gpt2_hlo.txt
fi
if [ $SECONDS -lt ${BUDGET_S2:-470} ]; then
  timeout 120 python3 -m benchmarks.kernel_bench --ops cross_entropy --tokens 16384 --d-model 2048 --vocab 128256 \
    --sweep > "$OUT/ce_sweep_llama.log" 2>&1; tail -9 "$OUT/ce_sweep_llama.log"
fi
echo "wall ${SECONDS}s"
