"""Check and time :mod:`jzero.kernels.gelu_gemm` on the GPU: ``python -m benchmarks.gelu_gemm_check``.

At GPT-2 124M's MLP shapes (tokens 16384, d 768, d_ff 3072, bf16; fresh random inputs per check) it prints
the relative error ||out - ref|| / ||ref|| against an fp32 reference (``jax.nn.gelu`` MLP on upcast inputs) of

- the two epilogue GEMMs against their XLA formulas (same rounding: these should agree to ~1e-3),
- the whole MLP's value and four gradients, for the cuBLASLt path and for XLA's bf16 path (``gelu_tanh``),

then the median time of the MLP's forward + backward on each path (``--reps`` runs after warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jzero.kernels import gelu_gemm as gg
from models.layers import gelu_tanh

F32 = jnp.float32


def rel(a, b) -> float:
    a, b = a.astype(F32), b.astype(F32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def inputs(seed, m, d, f, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (m, d), dtype)
    w1 = (0.02 * jax.random.normal(ks[1], (d, f))).astype(dtype)
    b1 = (0.5 * jax.random.normal(ks[2], (f,))).astype(dtype)
    w2 = (0.02 * jax.random.normal(ks[3], (f, d))).astype(dtype)
    dy = jax.random.normal(ks[4], (m, d), dtype)
    return x, w1, b1, w2, dy


def xla_mlp(x, w1, b1, w2):
    return gelu_tanh(x @ w1 + b1) @ w2


def fused_mlp(x, w1, b1, w2):
    return gg.mlp(x, w1, b1, w2, ("batch", "embed"))


def f32_mlp(x, w1, b1, w2):
    return jax.nn.gelu(x @ w1 + b1, approximate=True) @ w2


def grads(fn, args, dy):
    y, vjp = jax.vjp(fn, *args)
    return (y, *vjp(dy))


def median_ms(f, args, reps):
    for _ in range(3):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--f", type=int, default=3072)
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    out = {}
    x, w1, b1, w2, dy = inputs(1, a.m, a.d, a.f)
    h, pre = jax.jit(gg.bias_gelu_2d)(x, w1, b1)
    hr, prer = jax.jit(gg.reference_bias_gelu)(x, w1, b1)
    out["bias_gelu_vs_formula"] = {"hidden": rel(h, hr), "pre": rel(pre, prer)}
    x, w1, b1, w2, dy = inputs(2, a.m, a.d, a.f)
    pre = (x @ w1 + b1)
    g, db = jax.jit(gg.dgelu_2d)(dy, w2, pre)
    gr, dbr = jax.jit(gg.reference_dgelu)(dy, w2, pre)
    out["dgelu_vs_formula"] = {"dpre": rel(g, gr), "db": rel(db, dbr)}
    x, w1, b1, w2, dy = inputs(3, a.m, a.d, a.f)
    ref = jax.jit(lambda *t: grads(f32_mlp, [u.astype(F32) for u in t[:4]], t[4].astype(F32)))(x, w1, b1, w2, dy)
    names = ("y", "dx", "dw1", "db1", "dw2")
    for label, fn in (("cublaslt", fused_mlp), ("xla", xla_mlp)):
        got = jax.jit(lambda *t, fn=fn: grads(fn, t[:4], t[4]))(x, w1, b1, w2, dy)
        out[f"{label}_vs_fp32"] = {n: rel(g_, r_) for n, g_, r_ in zip(names, got, ref)}
        bad = [n for n, g_ in zip(names, got) if not bool(jnp.isfinite(g_.astype(F32)).all())]
        if bad:
            out[f"{label}_nonfinite"] = bad
    for label, fn in (("cublaslt", fused_mlp), ("xla", xla_mlp)):
        step = jax.jit(lambda *t, fn=fn: grads(fn, t[:4], t[4]))
        out[f"{label}_fwd_bwd_ms"] = round(median_ms(step, (x, w1, b1, w2, dy), a.reps), 4)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
