"""LayerNorm and RMSNorm forward/backward as Pallas (Triton) kernels: one HBM pass each way.

Forward: a program normalises ``block_m`` rows (the whole hidden size in one tile), writes ``y`` in the compute
dtype and the fp32 row statistics (mean, rstd) that the backward reuses. Backward: a program walks
``n_inner`` row tiles, reads ``x`` and ``dy`` once, writes ``dx`` and one row of fp32 partial sums of
``dy * xhat`` and ``dy``; XLA then adds the [programs, d] partials (a ~1 MB array). XLA's own backward for GPT-2
is three kernels (a Triton ``dx`` fusion that recomputes the statistics, an fp32 ``xhat * dy`` array, a column
reduction), well above what its bytes need; times of both: BENCHMARKS.md, "Session 3" (H100).

Math (per row, N = hidden size, g = dy * scale):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dscale = sum_rows(dy * xhat),  dbias = sum_rows(dy)
RMSNorm (``rms=True``, Llama) is the same kernels with the mean fixed at 0, no bias and no ``mean(g)`` term:
    xhat = x * rstd, rstd = rsqrt(mean(x^2) + eps),  dx = rstd * (g - xhat * mean(g * xhat))
XLA's own RMSNorm backward for Llama-1B is two fusions per norm that read five [tokens, d] arrays between them
(BENCHMARKS.md, "Session 8").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jzero import kernels

F32 = jnp.float32


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile(ref, rows, cols, mask, other=0.0):
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=other).astype(F32)


def _fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps, block_m, block_n, rms):
    m, n = x_ref.shape
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = jnp.arange(block_n)
    rmask, cmask = rows < m, cols < n
    mask = rmask[:, None] & cmask[None, :]
    x = _tile(x_ref, rows, cols, mask)
    mean = jnp.zeros((block_m,), F32) if rms else x.sum(axis=1) / n
    xc = x if rms else jnp.where(mask, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt((xc * xc).sum(axis=1) / n + eps)
    w = plgpu.load(scale_ref.at[cols], mask=cmask, other=0.0).astype(F32)
    y = xc * rstd[:, None] * w[None, :]
    if not rms:
        y = y + plgpu.load(bias_ref.at[cols], mask=cmask, other=0.0).astype(F32)[None, :]
    plgpu.store(y_ref.at[rows[:, None], cols[None, :]], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[rows], mean, mask=rmask)
    plgpu.store(rstd_ref.at[rows], rstd, mask=rmask)


def _bwd_kernel(x_ref, dy_ref, scale_ref, mean_ref, rstd_ref, dx_ref, dscale_ref, dbias_ref, *, block_m, block_n,
                n_inner, rms):
    m, n = x_ref.shape
    cols = jnp.arange(block_n)
    cmask = cols < n
    w = plgpu.load(scale_ref.at[cols], mask=cmask, other=0.0).astype(F32)
    first = pl.program_id(0) * n_inner

    def body(k, acc):
        rows = (first + k) * block_m + jnp.arange(block_m)
        rmask = rows < m
        mask = rmask[:, None] & cmask[None, :]
        x = _tile(x_ref, rows, cols, mask)
        dy = _tile(dy_ref, rows, cols, mask)
        mean = plgpu.load(mean_ref.at[rows], mask=rmask, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=rmask, other=0.0)
        xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = (g * xhat).sum(axis=1) / n
        dx = g - xhat * c1[:, None]
        if not rms:
            dx = dx - (g.sum(axis=1) / n)[:, None]
        dx = dx * rstd[:, None]
        plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
        ds, db = acc
        return ds + (dy * xhat).sum(axis=0), db + dy.sum(axis=0)

    zero = jnp.zeros((block_n,), F32)
    ds, db = jax.lax.fori_loop(0, n_inner, body, (zero, zero))
    at = pl.program_id(0) * n + cols
    plgpu.store(dscale_ref.at[at], ds, mask=cmask)
    plgpu.store(dbias_ref.at[at], db, mask=cmask)


#: rows per program tile; programs of the backward walk ``BWD_INNER`` tiles each (fewer partial rows to add)
BLOCK_M = 4
BWD_INNER = 8
NUM_WARPS = 4
#: the same for RMSNorm (chosen at Llama-1B's [16384, 2048]: BENCHMARKS.md, "Session 8")
RMS_BLOCK_M = 2
RMS_BWD_INNER = 16
RMS_NUM_WARPS = 4


def forward_2d(x_MxN, scale_N, bias_N, eps: float, out_dtype, block_m: int | None = None,
               num_warps: int | None = None, rms: bool = False):
    """``(y [M, N] out_dtype, mean [M] fp32, rstd [M] fp32)``; tiles default to the module's constants.
    ``rms``: RMSNorm (the mean output is zeros, ``bias_N`` is not read)."""
    block_m, num_warps = block_m or BLOCK_M, num_warps or NUM_WARPS
    m, n = x_MxN.shape
    kernel = functools.partial(_fwd_kernel, eps=eps, block_m=block_m, block_n=_pow2(n), rms=rms)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m),), name="jzero_rms_norm_fwd" if rms else "jzero_layer_norm_fwd",
        interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((m,), F32),
                   jax.ShapeDtypeStruct((m,), F32)),
    )(x_MxN, scale_N, bias_N)


def backward_2d(x_MxN, dy_MxN, scale_N, mean_M, rstd_M, block_m: int | None = None, n_inner: int | None = None,
                num_warps: int | None = None, rms: bool = False):
    """``(dx [M, N] x.dtype, dscale [N] fp32, dbias [N] fp32)`` of the rows given (``rms``: RMSNorm's dx)."""
    block_m, n_inner, num_warps = block_m or BLOCK_M, n_inner or BWD_INNER, num_warps or NUM_WARPS
    m, n = x_MxN.shape
    programs = pl.cdiv(m, block_m * n_inner)
    kernel = functools.partial(_bwd_kernel, block_m=block_m, block_n=_pow2(n), n_inner=n_inner, rms=rms)
    dx, ds, db = pl.pallas_call(
        kernel, grid=(programs,), name="jzero_rms_norm_bwd" if rms else "jzero_layer_norm_bwd",
        interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(jax.ShapeDtypeStruct((m, n), x_MxN.dtype), jax.ShapeDtypeStruct((programs * n,), F32),
                   jax.ShapeDtypeStruct((programs * n,), F32)),
    )(x_MxN, dy_MxN, scale_N, mean_M, rstd_M)
    return dx, ds.reshape(programs, n).sum(0), db.reshape(programs, n).sum(0)


# --------------------------------------------------------------------------- differentiable op over [..., N]


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def _fwd_local(eps, out_dtype, rms=False):
    def run(x, scale, bias):
        tiles = dict(block_m=RMS_BLOCK_M, num_warps=RMS_NUM_WARPS) if rms else {}
        y, mean, rstd = forward_2d(_flat(x), scale.astype(F32), bias.astype(F32), eps, out_dtype, rms=rms, **tiles)
        lead = x.shape[:-1]
        return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)
    return run


def _bwd_local(axes, rms=False):
    def run(x, dy, scale, mean, rstd):
        tiles = dict(block_m=RMS_BLOCK_M, n_inner=RMS_BWD_INNER, num_warps=RMS_NUM_WARPS) if rms else {}
        dx, ds, db = backward_2d(_flat(x), _flat(dy), scale.astype(F32), mean.reshape(-1), rstd.reshape(-1),
                                 rms=rms, **tiles)
        if axes:
            ds, db = jax.lax.psum((ds, db), axes)
        return dx.reshape(x.shape), ds, db
    return run


#: widest hidden size the one-tile kernels take (a row tile is next_pow2(d) wide, held in registers)
MAX_HIDDEN = 4096


def supported(names, hidden: int) -> bool:
    """Can the kernel run here: hidden size <= MAX_HIDDEN, not split under the active plan, outside shard_map?"""
    return hidden <= MAX_HIDDEN and kernels.last_axis_unsplit(names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm(x, scale, bias, eps: float, out_dtype, names: tuple):
    """LayerNorm over the last axis of ``x`` (logical axis ``names``), fp32 statistics, output in ``out_dtype``."""
    return _fwd(x, scale, bias, eps, out_dtype, names)[0]


def _fwd(x, scale, bias, eps, out_dtype, names):
    fn = kernels.per_shard(lambda axes: _fwd_local(eps, out_dtype), names,
                           in_specs=lambda s: (s, P(), P()),
                           out_specs=lambda s: (s, kernels.rows_of(s), kernels.rows_of(s)))
    y, mean, rstd = fn(x, scale, bias)
    return y, (x, scale, mean, rstd)


def _bwd(eps, out_dtype, names, res, dy):
    x, scale, mean, rstd = res
    fn = kernels.per_shard(_bwd_local, names,
                           in_specs=lambda s: (s, s, P(), kernels.rows_of(s), kernels.rows_of(s)),
                           out_specs=lambda s: (s, P(), P()))
    dx, ds, db = fn(x, dy, scale, mean, rstd)
    return dx, ds.astype(scale.dtype), db.astype(scale.dtype)


layer_norm.defvjp(_fwd, _bwd)



@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def rms_norm(x, scale, eps: float, out_dtype, names: tuple):
    """RMSNorm over the last axis of ``x`` (logical axis ``names``), fp32 statistics, output in ``out_dtype``."""
    return _rms_fwd(x, scale, eps, out_dtype, names)[0]


def _rms_fwd(x, scale, eps, out_dtype, names):
    fn = kernels.per_shard(lambda axes: _fwd_local(eps, out_dtype, rms=True), names,
                           in_specs=lambda s: (s, P(), P()),
                           out_specs=lambda s: (s, kernels.rows_of(s), kernels.rows_of(s)))
    y, _, rstd = fn(x, scale, jnp.zeros_like(scale))
    return y, (x, scale, rstd)


def _rms_bwd(eps, out_dtype, names, res, dy):
    x, scale, rstd = res
    fn = kernels.per_shard(lambda axes: _bwd_local(axes, rms=True), names,
                           in_specs=lambda s: (s, s, P(), kernels.rows_of(s), kernels.rows_of(s)),
                           out_specs=lambda s: (s, P(), P()))
    dx, ds, _ = fn(x, dy, scale, jnp.zeros_like(rstd), rstd)
    return dx, ds.astype(scale.dtype)


rms_norm.defvjp(_rms_fwd, _rms_bwd)
