#!/usr/bin/env bash
# Next session's call (carry [".whl", ".diag"]). (1) GPT-2's step traced with XLA's CUDA graphs off, so that each
# cuBLAS kernel carries its own custom call as hlo_op (session 15: inside a graph the trace names only the graph):
# which 768-wide GEMMs run slower than the 644 TFLOP/s of the NTT family, and what feeds them. ~120 s.
# (2) On an H200, part 4's acceptance pair with the shipped defaults: session14_gpu2.sh. ~400 s.
set -u
source benchmarks/gpu_env.sh
XLA_FLAGS="--xla_gpu_enable_command_buffer=" row gpt2-prof-nocb --config configs/gpt2_124m.yaml --steps 10 \
    --profile $OUT/prof --hlo $OUT/hlo.txt
python3 -m benchmarks.fusion_report $OUT/prof $OUT/hlo.txt 45 --library > $OUT/gemms_nocb.txt 2>&1
grep "^###" $OUT/gemms_nocb.txt | head -45
python3 -m benchmarks.trace_top $OUT/prof 25 > $OUT/top.txt 2>&1; head -40 $OUT/top.txt
gzip -q $OUT/hlo.txt; rm -rf $OUT/prof
echo "at ${SECONDS}s"
OUT=$OUT PEER_BY=330 bash benchmarks/session14_gpu2.sh
