"""Time jzero's Pallas kernels against the XLA formulas they replace, at GPT-2 124M's shapes, and check numbers.

    python -m benchmarks.kernel_bench                 # table: op, impl, config, ms (fwd+bwd), max |diff| vs XLA
    python -m benchmarks.kernel_bench --sweep         # also try block sizes / warps
    python -m benchmarks.kernel_bench --ops rms_norm,swiglu --d-model 2048 --d-ff 8192   # Llama-1B's shapes

Each row times ``jax.value_and_grad`` of the op (forward + backward, what a train step runs) as the median of
``--iters`` calls after a warm-up, synchronised with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
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


def _kernel_rows(op: str, module, names: tuple[str, ...], configs, run, ref):
    """Time ``run()`` (a jitted fwd+bwd of the module's public op) with each tile config set as the module's
    constants, as ``bench --kernel-tile`` does; a config that does not compile is a row, not a crash."""
    rows = []
    for conf in configs:
        saved = {n: getattr(module, n) for n in names}
        label = " ".join(f"{n}={c}" for n, c in zip(names, conf))
        try:
            for n, c in zip(names, conf):
                setattr(module, n, c)
            ms, out = run()
            rows.append((op, "pallas", label, ms, _diff(out, ref)))
        except Exception as exc:   # noqa: BLE001
            rows.append((op, "pallas", f"{label} FAILED {type(exc).__name__}: {str(exc)[:300]}",
                         float("nan"), float("nan")))
        finally:
            for n, c in saved.items():
                setattr(module, n, c)
    return rows


def layer_norm_rows(m: int, n: int, iters: int, sweep: bool):
    from jzero.kernels import layer_norm as K
    from models.layers import layer_norm as xla_ln

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (jax.random.normal(k[0], (1, m, n)) * 2 + 0.5).astype(jnp.bfloat16)
    s = 1 + 0.1 * jax.random.normal(k[1], (n,))
    b = 0.1 * jax.random.normal(k[2], (n,))
    dy = jax.random.normal(k[3], (1, m, n)).astype(jnp.bfloat16)

    def grad_of(fn):
        def loss(x, s, b):
            return jnp.vdot(fn(x, s, b).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ms, ref = _time(grad_of(lambda x, s, b: xla_ln(x, s, b, 1e-5, jnp.bfloat16)), x, s, b, iters=iters)
    names = ("BLOCK_M", "BWD_INNER", "NUM_WARPS")
    configs = [tuple(getattr(K, n) for n in names)]
    if sweep:
        configs += [(8, 4, 4), (8, 8, 4), (16, 8, 8), (8, 4, 8), (16, 4, 8)]
    kernel = lambda x, s, b: K.layer_norm(x, s, b, 1e-5, jnp.bfloat16, ("batch", "length", "embed"))  # noqa: E731
    run = lambda: _time(grad_of(kernel), x, s, b, iters=iters)  # noqa: E731  (a fresh trace per config)
    return [("layer_norm", "xla", "", ms, 0.0)] + _kernel_rows("layer_norm", K, names, configs, run, ref)


def rms_norm_rows(m: int, n: int, iters: int, sweep: bool):
    from jzero.kernels import layer_norm as K

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = (jax.random.normal(k[0], (1, m, n)) * 2).astype(jnp.bfloat16)
    s = 1 + 0.1 * jax.random.normal(k[1], (n,))
    dy = jax.random.normal(k[2], (1, m, n)).astype(jnp.bfloat16)

    def xla_rms(x, s):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + 1e-5) * s).astype(jnp.bfloat16)

    def grad_of(fn):
        return jax.jit(jax.value_and_grad(lambda x, s: jnp.vdot(fn(x, s).astype(jnp.float32),
                                                                 dy.astype(jnp.float32)), argnums=(0, 1)))

    ms, ref = _time(grad_of(xla_rms), x, s, iters=iters)
    names = ("RMS_BLOCK_M", "RMS_BWD_INNER", "RMS_NUM_WARPS")
    configs = [tuple(getattr(K, n) for n in names)]
    if sweep:
        configs += [(4, 8, 4), (2, 32, 4), (1, 32, 4), (2, 16, 2), (1, 16, 2), (4, 16, 4)]
    kernel = lambda x, s: K.rms_norm(x, s, 1e-5, jnp.bfloat16, ("batch", "length", "embed"))  # noqa: E731
    run = lambda: _time(grad_of(kernel), x, s, iters=iters)  # noqa: E731
    return [("rms_norm", "xla", "", ms, 0.0)] + _kernel_rows("rms_norm", K, names, configs, run, ref)


def swiglu_rows(m: int, f: int, iters: int, sweep: bool):
    from jzero.kernels import swiglu as K

    k = jax.random.split(jax.random.PRNGKey(2), 3)
    g, u, dh = (jax.random.normal(kk, (1, m, f)).astype(jnp.bfloat16) for kk in k)

    def grad_of(fn):
        return jax.jit(jax.value_and_grad(lambda g, u: jnp.vdot(fn(g, u).astype(jnp.float32),
                                                                 dh.astype(jnp.float32)), argnums=(0, 1)))

    ms, ref = _time(grad_of(lambda g, u: jax.nn.silu(g) * u), g, u, iters=iters)
    names = ("BLOCK_M", "BLOCK_F", "NUM_WARPS")
    configs = [tuple(getattr(K, n) for n in names)]
    if sweep:
        configs += [(8, 1024, 4), (16, 512, 4), (4, 2048, 8), (16, 256, 4), (8, 256, 2)]
    run = lambda: _time(grad_of(lambda g, u: K.swiglu(g, u, ("batch", "length", "mlp"))), g, u,  # noqa: E731
                        iters=iters)
    return [("swiglu", "xla", "", ms, 0.0)] + _kernel_rows("swiglu", K, names, configs, run, ref)


def cross_entropy_rows(m: int, d: int, v: int, iters: int, sweep: bool):
    from jzero.engine import cross_entropy
    from jzero.kernels import cross_entropy as K

    k = jax.random.split(jax.random.PRNGKey(1), 3)
    h = jax.random.normal(k[0], (1, m, d)).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(k[1], (v, d))).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (1, m), 0, v)

    def grad_of(loss):
        return jax.jit(jax.value_and_grad(lambda h, w: loss(h, w).mean(), argnums=(0, 1)))

    ms, ref = _time(grad_of(lambda h, w: cross_entropy(jnp.einsum("btd,vd->btv", h, w), labels)), h, w,
                    iters=iters)
    names = ("BLOCK_R", "BLOCK_V", "NUM_WARPS", "PROGRAMS")
    configs = [tuple(getattr(K, n) for n in names)]
    if sweep:
        configs += [(1, 4096, 8, 132), (1, 4096, 8, 264), (1, 4096, 16, 132), (1, 4096, 16, 264),
                    (1, 8192, 16, 132), (1, 4096, 32, 132), (1, 2048, 8, 528), (1, 4096, 4, 264)]
    run = lambda: _time(grad_of(lambda h, w: K.head_cross_entropy(h, w, labels)), h, w, iters=iters)  # noqa: E731
    return [("head+cross_entropy", "xla", "", ms, 0.0)] + _kernel_rows("head+cross_entropy", K, names, configs,
                                                                        run, ref)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ops", default="layer_norm,cross_entropy",
                    help="comma-separated: layer_norm, rms_norm, swiglu, cross_entropy")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    unknown = ops - {"layer_norm", "rms_norm", "swiglu", "cross_entropy"}
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; choose from layer_norm, rms_norm, swiglu, cross_entropy")
    rows = []
    if "layer_norm" in ops:
        rows += layer_norm_rows(args.tokens, args.d_model, args.iters, args.sweep)
    if "rms_norm" in ops:
        rows += rms_norm_rows(args.tokens, args.d_model, args.iters, args.sweep)
    if "swiglu" in ops:
        rows += swiglu_rows(args.tokens, args.d_ff, args.iters, args.sweep)
    if "cross_entropy" in ops:
        rows += cross_entropy_rows(args.tokens, args.d_model, args.vocab, args.iters, args.sweep)
    print("| op | impl | config | ms (fwd+bwd) | max rel diff vs xla |")
    print("|---|---|---|---|---|")
    for op, impl, conf, ms, diff in rows:
        print(f"| {op} | {impl} | {conf} | {ms:.3f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
