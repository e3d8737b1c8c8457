"""SwiGLU's backward as one Pallas (Triton) kernel: ``dgate`` and ``dup`` from one read of ``gate, up, dh``.

``h = silu(gate) * up`` (Llama's MLP). Its gradients share every operand:
    du = dh * silu(g),   dg = dh * u * sig(g) * (1 + g * (1 - sig(g)))
XLA (jax 0.11.2) computes them as two fusions that read ``dh`` and ``gate`` twice between them, with ``sig`` in
bf16; on Llama-1B those two run 0.46 ms a layer against the 0.28 ms that five [tokens, d_ff] passes take at
HBM bandwidth (BENCHMARKS.md, "Session 8"). Here one program per ``block_m x block_f`` tile reads the three
tiles once, does the math in fp32 and writes both gradients. The forward stays XLA's (already one pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jzero import kernels

F32 = jnp.float32

#: tile of one program (rows x columns of the [tokens, d_ff] arrays) and its warps; the fastest of the configs
#: swept at Llama-1B's [16384, 8192] (BlockSpec tiles were slower): BENCHMARKS.md, "Session 8"
BLOCK_M = 8
BLOCK_F = 512
NUM_WARPS = 4


def _bwd_kernel(g_ref, u_ref, dh_ref, dg_ref, du_ref, *, block_m, block_f):
    m, f = g_ref.shape
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = pl.program_id(1) * block_f + jnp.arange(block_f)
    mask = (rows < m)[:, None] & (cols < f)[None, :]
    at = (rows[:, None], cols[None, :])
    g = plgpu.load(g_ref.at[at], mask=mask, other=0.0).astype(F32)
    u = plgpu.load(u_ref.at[at], mask=mask, other=0.0).astype(F32)
    dh = plgpu.load(dh_ref.at[at], mask=mask, other=0.0).astype(F32)
    sig = 1.0 / (1.0 + jnp.exp(-g))
    plgpu.store(du_ref.at[at], (dh * g * sig).astype(du_ref.dtype), mask=mask)
    plgpu.store(dg_ref.at[at], (dh * u * sig * (1.0 + g * (1.0 - sig))).astype(dg_ref.dtype), mask=mask)


def backward_2d(gate_MxF, up_MxF, dh_MxF, block_m: int | None = None, block_f: int | None = None,
                num_warps: int | None = None):
    """``(dgate, dup)`` [M, F] in the inputs' dtype; tiles default to the module's constants."""
    block_m, block_f, num_warps = block_m or BLOCK_M, block_f or BLOCK_F, num_warps or NUM_WARPS
    m, f = gate_MxF.shape
    block_f = min(block_f, 1 << max(0, (f - 1).bit_length()))
    out = jax.ShapeDtypeStruct((m, f), gate_MxF.dtype)
    kernel = functools.partial(_bwd_kernel, block_m=block_m, block_f=block_f)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m), pl.cdiv(f, block_f)), name="jzero_swiglu_bwd",
        interpret=kernels.interpret(), compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(out, out),
    )(gate_MxF, up_MxF, dh_MxF)


def supported() -> bool:
    """Can the kernel run here? Anywhere outside a shard_map (it is element-wise: any split of the rows or of
    d_ff runs per shard)."""
    return not kernels.in_manual_region()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu(gate, up, names: tuple):
    """``silu(gate) * up`` (same dtype; XLA's forward), with the backward of :func:`backward_2d` per shard of
    the layout of logical axis ``names`` (e.g. ``("batch", "length", "mlp")``)."""
    return jax.nn.silu(gate) * up


def _fwd(gate, up, names):
    return jax.nn.silu(gate) * up, (gate, up)


def _bwd(names, res, dh):
    gate, up = res

    def local(axes):
        def run(g, u, d):
            dg, du = backward_2d(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1]))
            return dg.reshape(g.shape), du.reshape(u.shape)
        return run

    fn = kernels.per_shard(local, names, in_specs=lambda s: (s, s, s), out_specs=lambda s: (s, s))
    return fn(gate, up, dh.astype(gate.dtype))


swiglu.defvjp(_fwd, _bwd)
