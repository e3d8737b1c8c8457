#!/usr/bin/env bash
# The next GPU call (carry [".whl", ".diag"]; kind nvidia-h200, timeout ~560). Session 17 was lent no machine.
# On an H200: issue 18 part 4's acceptance pair with the shipped defaults (Triton GEMMs off since session 16):
#   benchmarks/session14_gpu2.sh, ~420 s. Predicted from the H100 figures: Llama ~1.20x, GPT-2 ~1.13x, ~29.4 ms.
# On an H100 (no H200 came): (1) the paired Llama A/B of the Triton flag that session 16 could only run unpaired,
# 2 rounds interleaved, ~300 s; (2) GPT-2's memsets attributed (CUDA graphs off, benchmarks/memset_sources.py:
# 243 a step, 0.79 ms, by the op they serve), ~90 s.
set -u
source benchmarks/gpu_env.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT=$OUT PEER_BY=330 bash benchmarks/session14_gpu2.sh
  exit
fi
echo "not an H200: the H100 plan"
XLA_FLAGS="--xla_gpu_enable_command_buffer=" row gpt2-prof-nocb --config configs/gpt2_124m.yaml --steps 10 \
    --profile $OUT/prof
python3 -m benchmarks.memset_sources $OUT/prof 40 > $OUT/memsets.txt 2>&1; head -45 $OUT/memsets.txt
rm -rf $OUT/prof
echo "at ${SECONDS}s"
for r in 1 2; do
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=true row llama-triton-r$r --config configs/llama_1b.yaml --steps 30 --main
  row llama-shipped-r$r --config configs/llama_1b.yaml --steps 30 --main
  echo "at ${SECONDS}s"
done
medians
