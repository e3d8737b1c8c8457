set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
timeout 260 python3 -m benchmarks.kernel_bench --sweep --iters 10 2>&1 | tee $OUT/kernel_bench.txt | grep -v "^WARNING"
STEPS=10 OUT=$OUT bash benchmarks/gpu_suite.sh benchmarks/variants_kernels.txt
python3 -m benchmarks.trace_top /tmp/prof 45 > $OUT/trace_top.txt 2>&1; head -40 $OUT/trace_top.txt
