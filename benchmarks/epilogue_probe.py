"""Which GEMM epilogues XLA uses for GPT-2's MLP (``python -m benchmarks.epilogue_probe``; XLA_FLAGS as set).

Compiles forward + backward of ``proj(gelu(x @ w1 + b1))`` at the GPT-2 124M benchmark shape with jax's autodiff
GELU and with :func:`models.layers.gelu_tanh` (custom VJP), prints every GEMM custom call (target, epilogue) of
the optimized HLO and the median time of the compiled function.
"""

import json
import re
import statistics
import time

import jax
import jax.numpy as jnp

from models.layers import gelu_tanh


def mlp(act):
    def f(x, w1, b1, w2, b2):
        return jnp.einsum("btf,fd->btd", act(jnp.einsum("btd,df->btf", x, w1) + b1), w2) + b2
    return f


def probe(B=16, T=1024, d=768, f=3072, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 6)
    args = (jax.random.normal(ks[0], (B, T, d), dtype), 0.02 * jax.random.normal(ks[1], (d, f), dtype),
            0.02 * jax.random.normal(ks[2], (f,), dtype), 0.02 * jax.random.normal(ks[3], (f, d), dtype),
            0.02 * jax.random.normal(ks[4], (d,), dtype))
    gy = jax.random.normal(ks[5], (B, T, d), dtype)
    for name, act in (("autodiff_gelu", lambda h: jax.nn.gelu(h, approximate=True)), ("gelu_tanh_vjp", gelu_tanh)):
        def step(*a):
            y, vjp = jax.vjp(mlp(act), *a)
            return y, vjp(gy)
        c = jax.jit(step).lower(*args).compile()
        txt = c.as_text()
        calls = re.findall(r'custom_call_target="([^"]+)".*?"epilogue":"(\w+)"', txt)
        fusions = len(re.findall(r" fusion\(", txt))
        for _ in range(3):
            jax.block_until_ready(c(*args))
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            jax.block_until_ready(c(*args))
            ts.append(time.perf_counter() - t)
        print(json.dumps({"variant": name, "ms": round(statistics.median(ts) * 1e3, 3), "gemms": calls,
                          "n_fusions": fusions}))


if __name__ == "__main__":
    probe()
