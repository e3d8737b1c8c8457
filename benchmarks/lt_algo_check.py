"""Do runs compute the same bits with the cuBLASLt GELU GEMMs? ``python -m benchmarks.lt_algo_check`` (GPU).

Runs GPT-2 124M's MLP (tokens 16384, d 768, d_ff 3072, bf16, fixed inputs) forward + backward through
:func:`jzero.kernels.gelu_gemm.mlp` in fresh processes and prints one row per run: how the algorithm was chosen,
a hash of the output and gradient bits, and the median ms. Expected: the two runs with an empty record file (the
shipped choice for this GPU, else the heuristic's first candidate) hash equal; the autotuning run records its
choice in a fresh ``JZERO_LT_ALGOS`` file, and the runs reading that file hash equal to it. The recorded lines
are printed last (the ones ``csrc/lt_gemm_algos.txt`` ships).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def one_run(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jzero.kernels import gelu_gemm as gg

    ks = jax.random.split(jax.random.key(0), 5)
    m, d, f = 16384, 768, 3072
    x = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
    w1 = (0.02 * jax.random.normal(ks[1], (d, f))).astype(jnp.bfloat16)
    b1 = (0.5 * jax.random.normal(ks[2], (f,))).astype(jnp.bfloat16)
    w2 = (0.02 * jax.random.normal(ks[3], (f, d))).astype(jnp.bfloat16)
    dy = jax.random.normal(ks[4], (m, d), jnp.bfloat16)

    @jax.jit
    def step(x, w1, b1, w2, dy):
        y, vjp = jax.vjp(lambda *a: gg.mlp(*a, ("batch", "embed")), x, w1, b1, w2)
        return (y, *vjp(dy))

    out = jax.block_until_ready(step(x, w1, b1, w2, dy))
    h = hashlib.sha256(b"".join(np.asarray(o.astype(jnp.float32)).tobytes() for o in out)).hexdigest()[:16]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(step(x, w1, b1, w2, dy))
        times.append((time.perf_counter() - t) * 1e3)
    return {"hash": h, "ms": round(statistics.median(times), 4)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one_run(int(sys.argv[2]))))
        return 0
    tmp = tempfile.mkdtemp(prefix="lt-algos-")
    algos, empty = os.path.join(tmp, "lt_gemm_algos.txt"), os.path.join(tmp, "empty.txt")
    runs = [("no record, run 1", {"JZERO_LT_ALGOS": empty}), ("no record, run 2", {"JZERO_LT_ALGOS": empty}),
            ("autotune -> file", {"JZERO_LT_ALGOS": algos, "JZERO_LT_AUTOTUNE": "1"}),
            ("file, run 1", {"JZERO_LT_ALGOS": algos}), ("file, run 2", {"JZERO_LT_ALGOS": algos})]
    print("| run | bits hash | fwd+bwd ms | choice |\n|---|---|---|---|")
    failed = False
    for name, env in runs:
        res = subprocess.run([sys.executable, "-m", "benchmarks.lt_algo_check", "--one", "20"],
                             env={**os.environ, "JZERO_KERNELS": "1", "JZERO_LT_VERBOSE": "1", **env}, capture_output=True, text=True)
        if res.returncode:
            print(f"| {name} | exit {res.returncode} | | |\n{res.stderr[-1500:]}", flush=True)
            failed = True
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        how = sorted({ln.rsplit("(", 1)[-1].rstrip(")") for ln in res.stderr.splitlines() if "lt_gemm" in ln and "candidate" in ln and "(" in ln})
        print(f"| {name} | {row['hash']} | {row['ms']} | {','.join(how)} |", flush=True)
    print("recorded choices:\n" + open(algos).read() if os.path.exists(algos) else "no choice recorded")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
