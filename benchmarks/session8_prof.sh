#!/usr/bin/env bash
# On the lent GPU (device tool; carry [".whl"]): where GPT-2 124M's and Llama-1B's steps spend their time.
# For each model: bench --profile (3 traced steps) --hlo, then the top kernels and the kernels joined to fusions.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader
for model in ${MODELS:-gpt2 llama}; do
  if [ $model = gpt2 ]; then C="--config configs/gpt2_124m.yaml --steps 10"; else C="--config configs/llama_1b.yaml --steps 5"; fi
  timeout 300 python3 -m benchmarks.bench --name $model-prof $C --profile /tmp/prof_$model --hlo $OUT/$model.hlo.txt > $OUT/$model-prof.log 2>&1 || tail -5 $OUT/$model-prof.log
  tail -1 $OUT/$model-prof.log
  python3 -m benchmarks.trace_top /tmp/prof_$model 60 > $OUT/$model-top.txt 2>&1
  python3 -m benchmarks.fusion_report /tmp/prof_$model $OUT/$model.hlo.txt 60 > $OUT/$model-fusions.txt 2>&1
  head -70 $OUT/$model-fusions.txt
  gzip -f $OUT/$model.hlo.txt
done
