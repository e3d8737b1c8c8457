#!/usr/bin/env bash
# Session 12, call 3 (carry [".whl", ".diag"]): the deferred residual alone against the old program, and the old
# program with XLA's command buffers (CUDA graphs) off, GPT-2 main, windows of 50 steps (the 10-step windows of
# calls 1-2 moved by ~0.5 ms between windows of one run), 2 rounds interleaved. Rows: $OUT/rows.jsonl; logs
# $OUT/*.log. Then (MAINPROF=1) the old program's main traced over 50 more steps (bench --main --profile,
# jzero.profiler): the device's busy share of the loop, and its idle gaps by length.
set -u
source benchmarks/gpu_env.sh
OFF1=--kernel-tile=layer_norm.MULTI_DY=0
OFF2=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
# DEFER_RESIDUAL is off by default; session 12's call 3 ran the defer row without ON2, so both rows of that call
# were the old program (BENCHMARKS.md, "Session 12")
ON2=--kernel-tile=layer_norm.DEFER_RESIDUAL=1
G="--config configs/gpt2_124m.yaml --steps ${STEPS:-50} --main"
for r in 1 2; do
  row gpt2-old-r$r $G $OFF1 $OFF2
  row gpt2-defer-r$r $G $OFF1 $ON2
  [ ${NOGRAPH:-1} = 1 ] && XLA_FLAGS=--xla_gpu_enable_command_buffer= row gpt2-oldnograph-r$r $G $OFF1 $OFF2
  echo "at ${SECONDS}s"
  [ $SECONDS -gt ${BUDGET_S:-300} ] && break
done
if [ ${MAINPROF:-1} = 1 ]; then   # where the main's step goes beyond its kernels: a trace of the loop itself
  row gpt2-main-prof $G $OFF1 $OFF2 --profile $OUT/mainprof
  python3 -m benchmarks.trace_top $OUT/mainprof 40 ${STEPS:-50} > $OUT/mainprof-top.txt 2>&1; tail -8 $OUT/mainprof-top.txt
  rm -rf $OUT/mainprof
fi
for f in $OUT/gpt2-*.log; do echo "$(basename $f): $(grep -o 'step [0-9.]* ms | host [0-9.]* ms' $f | tr '\n' ' ')"; done
medians
echo "wall ${SECONDS}s"
