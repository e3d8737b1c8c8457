#!/usr/bin/env bash
# Session 13, call 1 (carry [".whl", ".diag"]): is there a faster causal attention than cuDNN's at head dim 64 in
# this jax (the FA3-style Mosaic GPU kernel it ships)? Then the GPT-2 main traced over 50 steps of its own loop
# (bench --main --profile): how much of the step the device idles.
set -u
source benchmarks/gpu_env.sh
python3 -c "import jax, os; d = os.path.dirname(jax.__file__) + '/experimental/pallas/ops/gpu'; print(sorted(os.listdir(d)))"
python3 -c "import jax; from jax._src.cudnn import fused_attention_stablehlo as f; print('cudnn', f.check_cudnn_version() if hasattr(f, 'check_cudnn_version') else '?')" 2>&1 | tail -1
python3 -c "from jax._src.lib import cuda_versions as c; print('cudnn', c.cudnn_get_version(), 'cuda rt', c.cuda_runtime_get_version())" 2>&1 | tail -1
timeout ${ATTN_S:-240} python3 -m benchmarks.attn_probe 2>&1 | grep -v "^W0000\|^I0000" | tail -30
echo "at ${SECONDS}s"
if [ ${MAINPROF:-1} = 1 ]; then
  row gpt2-main-prof --config configs/gpt2_124m.yaml --steps 50 --main --profile $OUT/mainprof
  python3 -m benchmarks.trace_top $OUT/mainprof 30 50 > $OUT/mainprof-top.txt 2>&1; tail -12 $OUT/mainprof-top.txt
  rm -rf $OUT/mainprof
fi
echo "wall ${SECONDS}s"
