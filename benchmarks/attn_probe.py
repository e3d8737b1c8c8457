"""Causal attention forward + backward at the training shapes: cuDNN (what the models call today) against the
FlashAttention-3-style Mosaic GPU kernel that ships with jax (``jax.experimental.pallas.ops.gpu.attention_mgpu``),
if this jax has one whose backward takes a causal mask.

    python -m benchmarks.attn_probe                    # GPT-2 124M and Llama-1B shapes, a table of ms and TFLOP/s

Each row: ``jax.grad`` of ``sum(attention(q, k, v) * do)`` (what a train step runs), the mean over ``--iters``
back-to-back calls after a warm-up (one sync at the end), the causal FLOPs (fwd 2 GEMMs, bwd 5, halved by the
mask) over that time, and the largest relative difference of out/dq/dk/dv from the cuDNN row.
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"gpt2": (16, 1024, 12, 12, 64), "llama1b": (8, 2048, 32, 8, 64)}   # B, T, N, K, H


def timed(fn, args, iters: int) -> float:
    """Mean ms of ``fn(*args)`` over ``iters`` back-to-back calls after one warm-up call (one sync at the end)."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters * 1e3


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _fwd_bwd(attn):
    def f(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))
    return jax.jit(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gpt2,llama1b")
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    try:
        mg = importlib.import_module("jax.experimental.pallas.ops.gpu.attention_mgpu")
    except Exception as exc:   # noqa: BLE001
        mg = None
        print(f"no attention_mgpu: {type(exc).__name__}: {exc}")
    print("jax", jax.__version__, "| device", jax.devices()[0].device_kind)
    print(f"| shape | impl | config | ms fwd+bwd | TFLOP/s | max rel diff vs cuDNN |")
    print("|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        B, T, N, K, H = SHAPES[name]
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
        do = jax.random.normal(ks[3], (B, T, N, H), jnp.bfloat16)
        flops = 4 * B * T * T * N * H * 3.5 / 2
        ref = None
        rows = [("cudnn", "", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                           implementation="cudnn"))]
        if mg is not None:
            scale = 1.0 / np.sqrt(H)
            for bq, bkv, steps, wgs, bq_dkv, bkv_dkv, bq_dq, bkv_dq in [
                    (64, 128, 2, 2, 64, 64, 64, 64), (64, 64, 2, 2, 64, 64, 64, 64),
                    (64, 128, 2, 2, 64, 128, 64, 128), (64, 128, 2, 1, 64, 128, 128, 64),
                    (128, 128, 2, 1, 64, 128, 128, 64)]:
                try:
                    cfg = mg.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True,
                                          compute_wgs_bwd=wgs, block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv,
                                          block_q_dq=bq_dq, block_kv_dq=bkv_dq)
                except Exception as exc:   # noqa: BLE001
                    print(f"| {name} | mgpu | config rejected: {exc} | | | |")
                    continue
                label = f"q{bq} kv{bkv} wgs{wgs} dkv{bq_dkv}/{bkv_dkv} dq{bq_dq}/{bkv_dq}"
                # the kernel takes no scale: fold 1/sqrt(H) into q (one tiny multiply)
                rows.append(("mgpu", label, lambda q, k, v, cfg=cfg: mg.attention(q * jnp.asarray(scale, q.dtype),
                                                                                  k, v, cfg)))
        try:
            tr = importlib.import_module("jax.experimental.pallas.ops.gpu.attention")
            rep = N // K
            for bs, warps in [((128, 128, 32, 32, 32, 32), None), ((128, 64, 64, 64, 64, 64), 4),
                              ((128, 128, 64, 128, 128, 64), 8), ((64, 64, 64, 64, 64, 64), 4)]:
                blocks = tr.BlockSizes(*bs)
                rows.append(("pallas-triton", f"blocks {bs} warps {warps}" + (f" (kv repeated x{rep})" if rep > 1
                                                                              else ""),
                             lambda q, k, v, blocks=blocks, warps=warps: tr.mha(
                                 q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2), None,
                                 sm_scale=float(1.0 / np.sqrt(H)), causal=True, block_sizes=blocks,
                                 num_warps=warps)))
        except Exception as exc:   # noqa: BLE001
            print(f"no pallas triton attention: {type(exc).__name__}: {exc}")
        for impl, label, attn in rows:
            try:
                f = _fwd_bwd(attn)
                ms = timed(f, (q, k, v, do), a.iters)
                out = f(q, k, v, do)
                diff = 0.0 if ref is None else max(_rel(x, y) for x, y in zip(out, ref))
                ref = out if ref is None else ref
                print(f"| {name} | {impl} | {label} | {ms:.3f} | {flops / ms / 1e9:.0f} | {diff:.2e} |", flush=True)
            except Exception as exc:   # noqa: BLE001
                msg = str(exc).replace("\n", " ")[:300]
                print(f"| {name} | {impl} | {label} FAILED {type(exc).__name__}: {msg} | | | |", flush=True)


if __name__ == "__main__":
    main()
