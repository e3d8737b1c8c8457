# Sourced by the session scripts on the lent GPU machine (carry [".whl"]): the carried wheels installed into
# /tmp/site, the environment the benchmarks run in, $OUT, the software versions and the GPU; and ``row NAME ARGS``,
# one `benchmarks.bench` row appended to $OUT/rows.jsonl (its log in $OUT/NAME.log, its table row printed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader
row() { name=$1; shift; timeout 300 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" "$@" > "$OUT/$name.log" 2>&1 || tail -3 "$OUT/$name.log"; tail -1 "$OUT/$name.log"; }
# ``peer SCRIPT``: a PyTorch peer from .diag/peers, unchanged, in torch.compile mode (log $OUT/peer_SCRIPT.log)
peer() { (cd .diag/peers && timeout ${PEER_S:-220} python3 $1 --mode compile) > "$OUT/peer_$1.log" 2>&1; tail -1 "$OUT/peer_$1.log"; }
# ``medians``: the rows of $OUT/rows.jsonl grouped by name without its -rN round suffix, each group's runs and median
medians() {
python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys, collections, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = collections.defaultdict(list)
for r in rows:
    by[r["name"].rsplit("-r", 1)[0]].append(r["step_ms"])
for k, v in by.items():
    print(f"{k:16s} runs {v} median {statistics.median(v):.2f} ms")
PY
}
