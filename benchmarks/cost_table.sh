#!/usr/bin/env bash
# Issue 11's "how cost grows" table on the lent GPU: for each line "name|config|overrides|candidates" of $1, find the
# largest micro-batch among the candidates that fits (benchmarks.max_batch: XLA's buffer assignment, nothing run),
# then time it with benchmarks.bench. Rows go to $OUT/rows.jsonl; set XLA_PYTHON_CLIENT_MEM_FRACTION yourself.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
while IFS='|' read -r name cfg rest cands; do
  [ -z "$name" ] && continue; case "$name" in \#*) continue;; esac
  echo "== $name"
  timeout "${VARIANT_TIMEOUT:-300}" python3 -m benchmarks.max_batch --config "$cfg" --candidates "$cands" $rest \
    > "$OUT/$name.fit.log" 2>&1 || { echo "FAILED fit $name"; tail -3 "$OUT/$name.fit.log"; continue; }
  grep "micro-batch" "$OUT/$name.fit.log"
  b=$(awk '/^largest:/{print $2}' "$OUT/$name.fit.log")
  [ "${b:-0}" = 0 ] && { echo "nothing fits for $name"; continue; }
  timeout "${VARIANT_TIMEOUT:-300}" python3 -m benchmarks.bench --name "$name-b$b" --config "$cfg" --json "$OUT/rows.jsonl" \
    --steps "${STEPS:-3}" $rest train_batch_size=$b train_micro_batch_size_per_gpu=$b > "$OUT/$name.log" 2>&1 \
    || { echo "FAILED bench $name b$b"; tail -3 "$OUT/$name.log"; }
  tail -1 "$OUT/$name.log"
done < "$1"
