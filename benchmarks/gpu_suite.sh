#!/usr/bin/env bash
# Run on the lent GPU: install carried wheels, then one bench row per variant line of $1 (a file:
# "name|config|overrides...|ENV..."). Rows go to $OUT/rows.jsonl, logs to $OUT/NAME.log; a table is printed last.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
while IFS='|' read -r name cfg rest envs; do
  [ -z "$name" ] && continue; case "$name" in \#*) continue;; esac
  echo "== $name"
  # ENV may hold several assignments, quoted where a value has spaces: XLA_FLAGS="--a=1 --b=2" JZERO_X=1
  ( eval "export $envs"; timeout "${VARIANT_TIMEOUT:-300}" python3 -m benchmarks.bench --name "$name" --config "$cfg" \
      --json "$OUT/rows.jsonl" --steps "${STEPS:-10}" $rest ) > "$OUT/$name.log" 2>&1 \
      || { echo "FAILED $name"; tail -5 "$OUT/$name.log"; }
  tail -1 "$OUT/$name.log"
done < "$1"
