"""Time jzero's Pallas kernels against the XLA formulas they replace, at GPT-2 124M's shapes, and check numbers.

    python -m benchmarks.kernel_bench                 # table: op, impl, config, ms (fwd+bwd), max |diff| vs XLA
    python -m benchmarks.kernel_bench --sweep         # also try block sizes / warps

Each row times ``jax.value_and_grad`` of the op (forward + backward, what a train step runs) as the median of
``--iters`` calls after a warm-up, synchronised with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, iters: int):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def _diff(a, b):
    """Largest per-leaf relative difference: max |a - b| / max |b|."""
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
                     / (np.max(np.abs(np.asarray(y, np.float32))) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def layer_norm_rows(m: int, n: int, iters: int, sweep: bool):
    from jzero.kernels import layer_norm as K
    from models.layers import layer_norm as xla_ln

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (jax.random.normal(k[0], (m, n)) * 2 + 0.5).astype(jnp.bfloat16)
    s = 1 + 0.1 * jax.random.normal(k[1], (n,))
    b = 0.1 * jax.random.normal(k[2], (n,))
    dy = jax.random.normal(k[3], (m, n)).astype(jnp.bfloat16)

    def grad_of(fn):
        def loss(x, s, b):
            return jnp.vdot(fn(x, s, b).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ms, ref = _time(grad_of(lambda x, s, b: xla_ln(x, s, b, 1e-5, jnp.bfloat16)), x, s, b, iters=iters)
    rows = [("layer_norm", "xla", "", ms, 0.0)]
    configs = [(K.BLOCK_M, K.BWD_INNER, K.NUM_WARPS)]
    if sweep:
        configs += [(8, 4, 4), (8, 8, 4), (16, 8, 8), (8, 4, 8), (4, 8, 4)]
    for bm, inner, warps in configs:
        def op(x, s, b, bm=bm, inner=inner, warps=warps):
            @jax.custom_vjp
            def f(x, s, b):
                return K.forward_2d(x, s, b, 1e-5, jnp.bfloat16, block_m=bm, num_warps=warps)[0]

            def fwd(x, s, b):
                y, mean, rstd = K.forward_2d(x, s, b, 1e-5, jnp.bfloat16, block_m=bm, num_warps=warps)
                return y, (x, s, mean, rstd)

            def bwd(res, g):
                x, s, mean, rstd = res
                return K.backward_2d(x, g, s, mean, rstd, block_m=bm, n_inner=inner, num_warps=warps)

            f.defvjp(fwd, bwd)
            return f(x, s, b)
        try:
            ms, out = _time(grad_of(op), x, s, b, iters=iters)
            rows.append(("layer_norm", "pallas", f"block_m={bm} inner={inner} warps={warps}", ms, _diff(out, ref)))
        except Exception as exc:   # noqa: BLE001 - a config that does not compile is a row, not a crash
            rows.append(("layer_norm", "pallas", f"block_m={bm} inner={inner} warps={warps} FAILED "
                         f"{type(exc).__name__}: {str(exc)[:300]}", float("nan"), float("nan")))
    return rows


def cross_entropy_rows(m: int, d: int, v: int, iters: int, sweep: bool):
    from jzero.engine import cross_entropy
    from jzero.kernels import cross_entropy as K

    k = jax.random.split(jax.random.PRNGKey(1), 3)
    h = jax.random.normal(k[0], (1, m, d)).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(k[1], (v, d))).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (1, m), 0, v)

    def xla(h, w):
        return cross_entropy(jnp.einsum("btd,vd->btv", h, w), labels).mean()

    ms, ref = _time(jax.jit(jax.value_and_grad(xla, argnums=(0, 1))), h, w, iters=iters)
    rows = [("head+cross_entropy", "xla", "", ms, 0.0)]
    configs = [(K.BLOCK_R, K.BLOCK_V, K.NUM_WARPS)]
    if sweep:
        configs += [(1, 4096, 8), (4, 4096, 8), (8, 2048, 8), (2, 8192, 8), (1, 16384, 8), (1, 65536, 16),
                    (1, 65536, 32), (4, 2048, 4)]
    for br, bv, warps in configs:
        orig = K.loss_and_grad_2d
        K.loss_and_grad_2d = functools.partial(orig, block_r=br, block_v=bv, num_warps=warps)
        try:
            fn = jax.jit(jax.value_and_grad(lambda h, w: K.head_cross_entropy(h, w, labels).mean(), argnums=(0, 1)))
            ms, out = _time(fn, h, w, iters=iters)
            rows.append(("head+cross_entropy", "pallas", f"block_r={br} block_v={bv} warps={warps}", ms,
                         _diff(out, ref)))
        except Exception as exc:   # noqa: BLE001
            rows.append(("head+cross_entropy", "pallas", f"block_r={br} block_v={bv} warps={warps} FAILED "
                         f"{type(exc).__name__}: {str(exc)[:300]}", float("nan"), float("nan")))
        finally:
            K.loss_and_grad_2d = orig
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    rows = layer_norm_rows(args.tokens, args.d_model, args.iters, args.sweep)
    rows += cross_entropy_rows(args.tokens, args.d_model, args.vocab, args.iters, args.sweep)
    print("| op | impl | config | ms (fwd+bwd) | max rel diff vs xla |")
    print("|---|---|---|---|---|")
    for op, impl, conf, ms, diff in rows:
        print(f"| {op} | {impl} | {conf} | {ms:.3f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
