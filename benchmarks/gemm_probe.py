"""The attention projections' GEMMs alone, forward and forward+backward, in the weight layouts a model could store.

    python -m benchmarks.gemm_probe                  # GPT-2 124M and Llama-1B shapes, a table of ms and TFLOP/s

Why: session 13's trace of the GPT-2 main had ~5.6 ms a step in its 768-wide GEMMs (q/k/v/out projections and their
gradients) at ~500 TFLOP/s, against ~700-825 for the MLP and LM-head GEMMs; one kernel family there
(``nvjet ... NNT``, 5 calls a layer) ran at ~430. This probe asks whether the weight's stored layout (``[d, n, h]``
as the models keep it, or ``[n, h, d]``), or one merged ``[d, 3d]`` projection, changes what cuBLAS runs.

Each row is one jitted function: ``fwd`` the projections alone, ``fwd+bwd`` ``jax.vjp`` of them with given output
cotangents (dX summed over q/k/v, dW), the mean of ``--iters`` back-to-back calls after a warm-up, and the GEMM
FLOPs over that time (fwd 2MKN per projection; backward twice that).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.attn_probe import timed

SHAPES = {"gpt2": (16384, 768, 12, 12, 64), "llama1b": (16384, 2048, 32, 8, 64)}   # tokens, d, N, K, H


def _variants(d: int, N: int, K: int, H: int):
    """name -> (projection fn(xs, ws) -> (q, k, v), weight shapes); every q is [M, N, H], k/v [M, K, H]."""
    heads = (N, K, K)

    def sep_dnh(xs, ws):       # the models' layout: [d, n, h] per projection
        return tuple(jnp.einsum("md,dnh->mnh", x, w) for x, w in zip(xs, ws))

    def sep_nhd(xs, ws):       # output-major weights: [n, h, d]
        return tuple(jnp.einsum("md,nhd->mnh", x, w) for x, w in zip(xs, ws))

    def merged(xs, ws):        # one [d, (N + 2K) * H] GEMM on one input, split afterwards
        y = jnp.einsum("md,dc->mc", xs[0], ws[0])
        q, k, v = jnp.split(y, [N * H, (N + K) * H], axis=1)
        return q.reshape(-1, N, H), k.reshape(-1, K, H), v.reshape(-1, K, H)

    return {
        "sep [d,n,h]": (sep_dnh, [(d, n, H) for n in heads], 3),
        "sep [n,h,d]": (sep_nhd, [(n, H, d) for n in heads], 3),
        "merged [d,3d]": (merged, [(d, (N + 2 * K) * H)], 1),
    }


def _out_variants(d: int, N: int, H: int):
    return {
        "out [n,h,d]": (lambda o, w: jnp.einsum("mnh,nhd->md", o, w), (N, H, d)),
        "out [d,n,h]": (lambda o, w: jnp.einsum("mnh,dnh->md", o, w), (d, N, H)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gpt2,llama1b")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    print("jax", jax.__version__, "| device", jax.devices()[0].device_kind)
    print("| shape | variant | ms fwd | TFLOP/s fwd | ms fwd+bwd | TFLOP/s fwd+bwd |")
    print("|---|---|---|---|---|---|")
    dt = jnp.bfloat16
    for name in a.shapes.split(","):
        M, d, N, K, H = SHAPES[name]
        key = iter(jax.random.split(jax.random.key(0), 64))
        rnd = lambda s: jax.random.normal(next(key), s, dt)   # noqa: E731
        xs = tuple(rnd((M, d)) for _ in range(3))
        cts = (rnd((M, N, H)), rnd((M, K, H)), rnd((M, K, H)))
        flops = 2 * M * d * (N + 2 * K) * H
        for vname, (proj, shapes, n_in) in _variants(d, N, K, H).items():
            ws = tuple(rnd(s) for s in shapes)
            fwd = jax.jit(lambda xs, ws, p=proj: p(xs, ws))

            def fb(xs, ws, cts, p=proj, n_in=n_in):
                out, vjp = jax.vjp(lambda xs, ws: p(xs, ws), xs[:n_in] if n_in == 1 else xs, ws)
                return out, vjp(cts)
            fb = jax.jit(fb)
            x_in = xs[:1] if n_in == 1 else xs
            t_f = timed(fwd, (x_in, ws), a.iters)
            t_fb = timed(fb, (x_in, ws, cts), a.iters)
            print(f"| {name} | {vname} | {t_f:.3f} | {flops / t_f / 1e9:.0f} | {t_fb:.3f} | "
                  f"{3 * flops / t_fb / 1e9:.0f} |", flush=True)
        o, do = rnd((M, N, H)), rnd((M, d))
        oflops = 2 * M * N * H * d
        for vname, (out, shape) in _out_variants(d, N, H).items():
            w = rnd(shape)
            fwd = jax.jit(out)

            def fb(o, w, do, f=out):
                y, vjp = jax.vjp(f, o, w)
                return y, vjp(do)
            fb = jax.jit(fb)
            t_f, t_fb = timed(fwd, (o, w), a.iters), timed(fb, (o, w, do), a.iters)
            print(f"| {name} | {vname} | {t_f:.3f} | {oflops / t_f / 1e9:.0f} | {t_fb:.3f} | "
                  f"{3 * oflops / t_fb / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
