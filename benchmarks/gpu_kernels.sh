# On the lent GPU (device tool, carry [".whl"]): the kernel variants of $1, a trace of the last gpt2 variant.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
grep -v "^llama" "${1:-benchmarks/variants_kernels_3.txt}" > /tmp/v_gpt2.txt; grep "^llama" "${1:-benchmarks/variants_kernels_3.txt}" > /tmp/v_llama.txt
STEPS=${STEPS:-10} OUT=$OUT bash benchmarks/gpu_suite.sh /tmp/v_gpt2.txt
python3 -m benchmarks.trace_top /tmp/prof 60 > $OUT/trace_top.txt 2>&1; head -30 $OUT/trace_top.txt
python3 -m benchmarks.fusion_report /tmp/prof /tmp/hlo.txt 40 > $OUT/fusion_report.txt 2>&1
STEPS=5 OUT=$OUT bash benchmarks/gpu_suite.sh /tmp/v_llama.txt
