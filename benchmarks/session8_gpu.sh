#!/usr/bin/env bash
# Session 8 on the lent GPU (carry [".whl"]): the new kernels alone at Llama-1B's shapes, then the Llama step with
# and without them (variants_session8.txt), then the profile of the last variant.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m benchmarks.kernel_bench --ops rms_norm,swiglu --d-model 2048 --d-ff 8192 --sweep 2>&1 | tail -18
STEPS=5 bash benchmarks/gpu_suite.sh ${VARIANTS:-benchmarks/variants_session8.txt}
if [ -d /tmp/prof_llama ]; then
  python3 -m benchmarks.trace_top /tmp/prof_llama 45 > $OUT/llama-top.txt 2>&1; head -40 $OUT/llama-top.txt | cut -c1-150
fi
