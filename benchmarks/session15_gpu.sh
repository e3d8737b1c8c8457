#!/usr/bin/env bash
# Next session's first call (carry [".whl", ".diag"]). (1) Which GPT-2 GEMMs are slow in the step: session 13's
# trace had one 768-wide kernel family (nvjet 128x128 NNT, 5 a layer) at 44.6 us where the same projections alone
# take ~33 us (session 14, gemm_probe); `fusion_report --library` joins each cuBLAS kernel to its custom call,
# layouts and operands' producers. (2) Issue 18 part 4's pair with the shipped defaults: session14_gpu2.sh (Llama-1B
# main twice around its torch.compile peer, the GPT-2 main and its peer; on an H200 the acceptance figures).
set -u
source benchmarks/gpu_env.sh
row gpt2-prof --config configs/gpt2_124m.yaml --steps 10 --profile $OUT/prof --hlo $OUT/hlo.txt
python3 -m benchmarks.fusion_report $OUT/prof $OUT/hlo.txt 30 --library > $OUT/gemms.txt 2>&1
grep "^###" $OUT/gemms.txt | head -30
gzip -q $OUT/hlo.txt; rm -rf $OUT/prof
echo "at ${SECONDS}s"
# (its own clock starts at 0: the GPT-2 peer only before 330 s of it, a third Llama row not at all after)
OUT=$OUT PEER_BY=330 bash benchmarks/session14_gpu2.sh
