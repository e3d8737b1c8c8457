#!/usr/bin/env bash
# Session 10, call 1 (carry [".whl"]): is the main's run-to-run spread (Llama-1B 222.7 vs 232.6 ms for one program
# in one call, session 9) XLA's compile-time autotuning? Three Llama-1B mains each dump their autotune choices;
# benchmarks/autotune_diff counts the choices that differ; then two more mains load the fastest and the slowest
# run's choices: if those reproduce their runs' step times, the choice is the cause. Then, as time allows, GPT-2's
# step profiled for idle gaps between kernels (benchmarks/trace_top.py; a row with the GELU-GEMM FFI handlers marked
# command-buffer compatible followed here, skipped for time and dropped after: BENCHMARKS.md "Session 10").
# Output: $OUT/rows.jsonl, $OUT/at_*.textproto, $OUT/top.txt, $OUT/logs.txt.
set -u
source benchmarks/gpu_env.sh
main() {  # main NAME XLA_FLAG
  name=$1; flag=$2
  XLA_FLAGS="$flag" timeout 170 python3 -m benchmarks.bench --main --name "$name" --json "$OUT/rows.jsonl" \
    --config configs/llama_1b.yaml --steps 5 > /tmp/log_$name.txt 2>&1 || tail -4 /tmp/log_$name.txt
  { echo "=== $name"; cat /tmp/log_$name.txt; } >> "$OUT/logs.txt"
  tail -1 /tmp/log_$name.txt
}
for i in 1 2 3; do main llama-at$i "--xla_gpu_dump_autotune_results_to=$OUT/at_$i.textproto"; done
python3 -m benchmarks.autotune_diff $OUT/at_1.textproto $OUT/at_2.textproto $OUT/at_3.textproto
read fast slow < <(python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = {r["name"]: r["step_ms"] for r in rows if r["name"].startswith("llama-at")}
order = sorted(rows, key=rows.get)
print(order[0][-1], order[-1][-1])
PY
)
echo "fastest run: $fast, slowest: $slow"
main llama-load-fast$fast "--xla_gpu_load_autotune_results_from=$OUT/at_$fast.textproto"
main llama-load-slow$slow "--xla_gpu_load_autotune_results_from=$OUT/at_$slow.textproto"
prof() {
  name=$1; shift
  if [ $SECONDS -gt ${BUDGET_S:-420} ]; then echo "$name: skipped (${SECONDS}s used)"; return; fi
  timeout 120 python3 -m benchmarks.bench --name "$name" --json "$OUT/rows.jsonl" --config configs/gpt2_124m.yaml \
    --steps 10 --profile /tmp/prof_$name --hlo /tmp/hlo_$name.txt > /tmp/log_$name.txt 2>&1 || tail -4 /tmp/log_$name.txt
  { echo "=== $name"; cat /tmp/log_$name.txt; } >> "$OUT/logs.txt"
  tail -1 /tmp/log_$name.txt
  python3 -m benchmarks.trace_top /tmp/prof_$name 60 > /tmp/top_$name.txt 2>&1
  { echo "=== $name"; cat /tmp/top_$name.txt; } >> "$OUT/top.txt"
  head -1 /tmp/top_$name.txt; tail -8 /tmp/top_$name.txt
  echo "$name: HLO lines naming command_buffer: $(grep -c command_buffer /tmp/hlo_$name.txt 2>/dev/null)"
}
prof gpt2-shipped
