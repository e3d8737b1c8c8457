#!/usr/bin/env bash
# Session 9's last call (carry [".whl", ".diag"]): the cross-entropy kernel's tiles swept at Llama-1B's head
# (tokens 16384, d 2048, vocab 128256; PROGRAMS = the persistent grid), then in this one call the Llama main on
# the byte corpus as shipped and with the sweep's fastest tiles, its torch.compile peer, the GPT-2 main and its
# peer (peers: .diag/peers, unchanged copies of ../shared/peers). Rows: $OUT/rows.jsonl.
set -u
source benchmarks/gpu_env.sh
timeout 150 python3 -m benchmarks.kernel_bench --ops cross_entropy --tokens 16384 --d-model 2048 --vocab 128256 \
  --iters 20 --sweep > $OUT/ce-llama.txt 2>&1; tail -12 $OUT/ce-llama.txt
best=$(python3 -c '
import math, sys
rows = [l.split("|") for l in open(sys.argv[1]) if l.startswith("| head+cross_entropy | pallas")]
ok = [(float(r[4]), r[3].strip()) for r in rows if "FAILED" not in r[3] and not math.isnan(float(r[4]))]
print(" ".join(f"--kernel-tile cross_entropy.{kv}" for kv in min(ok)[1].split()) if ok else "")
' $OUT/ce-llama.txt)
echo "fastest cross-entropy tiles at Llama's head: ${best:-none}"
row llama-main-bytes --config configs/llama_1b.yaml --steps 5 --main
[ -n "$best" ] && row llama-main-bytes-ce-best --config configs/llama_1b.yaml --steps 5 --main $best
(cd .diag/peers && timeout 240 python3 llama_torch.py --mode compile) 2>&1 | tail -1
row gpt2-main-bytes --config configs/gpt2_124m.yaml --steps 10 --main
(cd .diag/peers && timeout 240 python3 gpt_torch.py --mode compile) 2>&1 | tail -1
