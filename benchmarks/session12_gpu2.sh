#!/usr/bin/env bash
# Session 12, call 2 (carry [".whl", ".diag"]): call 1 found the deferred residual (+ the 2-D q bias) slower by
# ~0.9 ms and MULTI_DY faster by ~0.35 ms (H100). Here: MULTI_DY alone against the old program, 2 rounds
# interleaved; then both programs' steps profiled (old and defer-only), their kernels side by side.
# (models.layers.Q_BIAS_2D, the OFF3 switch below, was removed after these calls: re-running this needs the
# commit they ran at, BENCHMARKS.md "Session 12".)
set -u
source benchmarks/gpu_env.sh
OFF1=--kernel-tile=layer_norm.MULTI_DY=0
OFF2=--kernel-tile=layer_norm.DEFER_RESIDUAL=0
OFF3=--kernel-tile=models.layers.Q_BIAS_2D=0
G="--config configs/gpt2_124m.yaml --steps 10 --main"
for r in 1 2; do
  row gpt2-old-r$r $G $OFF1 $OFF2 $OFF3
  row gpt2-multidy-r$r $G $OFF2 $OFF3
done
prof() {
  timeout 150 python3 -m benchmarks.bench --name gpt2-prof-$1 --config configs/gpt2_124m.yaml --steps 5 "${@:2}" \
    --profile /tmp/prof-$1 --hlo $OUT/hlo-$1.txt > "$OUT/prof-$1.log" 2>&1; tail -1 "$OUT/prof-$1.log"
  python3 -m benchmarks.trace_top /tmp/prof-$1 70 > "$OUT/top-$1.txt" 2>&1
}
prof old $OFF1 $OFF2 $OFF3
prof defer $OFF1 $OFF3
python3 - $OUT/top-old.txt $OUT/top-defer.txt <<'PY'
import re, sys
def load(p):
    d = {}
    for l in open(p):
        m = re.match(r"\s*([\d.]+) ms\s+[\d.]+%\s+x(\d+)\s+(.*)", l)
        if m: d[m.group(3).strip()] = (float(m.group(1)) / 3, int(m.group(2)))
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
rows = [(b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0], k) for k in set(a) | set(b)]
for dv, k in sorted(rows, key=lambda r: -abs(r[0]))[:30]:
    print(f"{dv:+7.3f} ms/step  old {a.get(k,(0,0))[0]:6.3f} x{a.get(k,(0,0))[1]:<4d} defer {b.get(k,(0,0))[0]:6.3f} x{b.get(k,(0,0))[1]:<4d} {k[:90]}")
PY
grep "total" $OUT/top-old.txt $OUT/top-defer.txt
medians
echo "wall ${SECONDS}s"
