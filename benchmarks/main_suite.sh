#!/usr/bin/env bash
# On the lent GPU (device tool; carry [".whl", ".diag"]): the training main vs the step alone, for GPT-2 124M and
# Llama-1B, on the embedded byte-level corpus and on a prepared BPE data.path, then the PyTorch peers of
# ../shared/peers (copied unchanged into .diag/peers) in the same call. Rows: $OUT/rows.jsonl; table printed last.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader
STD=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
python3 -m train.prepare_data --input "$STD"/*.py --output-dir /tmp/bpe --tokenizer .diag/bpe50k.json > "$OUT/prep.log" 2>&1 || tail -3 "$OUT/prep.log"
row() { name=$1; shift; timeout 300 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" "$@" > "$OUT/$name.log" 2>&1 || tail -3 "$OUT/$name.log"; tail -1 "$OUT/$name.log"; }
for model in ${MODELS:-gpt2 llama}; do
  if [ $model = gpt2 ]; then C="--config configs/gpt2_124m.yaml --steps 10"; else C="--config configs/llama_1b.yaml --steps 5"; fi
  row $model-step $C
  row $model-main-bytes $C --main
  row $model-main-bpe $C --main data.path=/tmp/bpe
done
if [ -z "${NO_PEERS:-}" ]; then
  (cd .diag/peers && timeout 240 python3 gpt_torch.py --mode compile) 2>&1 | tail -1
  (cd .diag/peers && timeout 240 python3 llama_torch.py --mode compile) 2>&1 | tail -1
fi
