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
XLA's own RMSNorm took 2.7 ms forward and 5.3 ms backward per Llama-1B step for its 33 norms on an H200
(BENCHMARKS.md, "Session 8").

:func:`residual_norm` is both with the residual stream folded in: the forward adds a sub-layer's output first and
writes the sum too, the backward adds the skip path's gradient into ``dx`` (BENCHMARKS.md, "Session 9").
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


def _fwd_kernel(*refs, eps, block_m, block_n, rms, add, rbias=False):
    if add and rbias:   # s = x + (r + rb): the sub-layer's output bias rb [N] added here too
        x_ref, r_ref, rb_ref, scale_ref, bias_ref, y_ref, s_ref, mean_ref, rstd_ref = refs
    elif add:   # the residual sum first: s = x + r rounded to x's dtype (stored), then the norm of that s
        x_ref, r_ref, scale_ref, bias_ref, y_ref, s_ref, mean_ref, rstd_ref = refs
    else:
        x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
    m, n = x_ref.shape
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = jnp.arange(block_n)
    rmask, cmask = rows < m, cols < n
    mask = rmask[:, None] & cmask[None, :]
    x = _tile(x_ref, rows, cols, mask)
    if add:
        r = _tile(r_ref, rows, cols, mask)
        if rbias:
            r = r + plgpu.load(rb_ref.at[cols], mask=cmask, other=0.0).astype(F32)[None, :]
        x = (x + r).astype(s_ref.dtype)
        plgpu.store(s_ref.at[rows[:, None], cols[None, :]], x, mask=mask)
        x = x.astype(F32)
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


def _bwd_kernel(*refs, block_m, block_n, n_inner, rms, skip, dx_sum=False, n_dy=1):
    if dx_sum:   # one more output: partial column sums of dx (the gradient of a bias added into x)
        refs, dxsum_ref = refs[:-1], refs[-1]
    # n_dy > 1: y had n_dy consumers (GPT-2's q, k, v projections); their gradients are summed here, in fp32
    x_ref, dy_refs, refs = refs[0], refs[1:1 + n_dy], refs[1 + n_dy:]
    if skip:   # dx also takes the gradient reaching x by the other path (the residual stream's skip), added here
        dres_ref, scale_ref, mean_ref, rstd_ref, dx_ref, dscale_ref, dbias_ref = refs
    else:
        scale_ref, mean_ref, rstd_ref, dx_ref, dscale_ref, dbias_ref = refs
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
        dy = _tile(dy_refs[0], rows, cols, mask)
        for ref in dy_refs[1:]:
            dy = dy + _tile(ref, rows, cols, mask)
        mean = plgpu.load(mean_ref.at[rows], mask=rmask, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=rmask, other=0.0)
        xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = (g * xhat).sum(axis=1) / n
        dx = g - xhat * c1[:, None]
        if not rms:
            dx = dx - (g.sum(axis=1) / n)[:, None]
        dx = dx * rstd[:, None]
        if skip:
            dx = dx + _tile(dres_ref, rows, cols, mask)
        dx = dx.astype(dx_ref.dtype)
        plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx, mask=mask)
        out = (acc[0] + (dy * xhat).sum(axis=0), acc[1] + dy.sum(axis=0))
        if dx_sum:   # the rounded dx, as XLA's reduction of the stored dx would sum
            out += (acc[2] + jnp.where(mask, dx.astype(F32), 0.0).sum(axis=0),)
        return out

    zero = jnp.zeros((block_n,), F32)
    acc = jax.lax.fori_loop(0, n_inner, body, (zero,) * 3 if dx_sum else (zero, zero))
    at = pl.program_id(0) * n + cols
    plgpu.store(dscale_ref.at[at], acc[0], mask=cmask)
    plgpu.store(dbias_ref.at[at], acc[1], mask=cmask)
    if dx_sum:
        plgpu.store(dxsum_ref.at[at], acc[2], mask=cmask)


#: rows per program tile; programs of the backward walk ``BWD_INNER`` tiles each (fewer partial rows to add)
BLOCK_M = 4
BWD_INNER = 8
NUM_WARPS = 4
#: 1: a sub-layer's output bias handed to models.norms.LayerNorm (``delta_bias``) is added in residual_norm's
#: kernels; 0: XLA adds it to the sub-layer output first (the A/B switch of BENCHMARKS.md, "Session 11")
RESIDUAL_BIAS = 1
#: 1: a norm read by several consumers (the attention's q/k/v projections: models.norms.LayerNorm ``n_out``)
#: hands each its own output and sums their gradients in the backward kernel; 0: one output, XLA adds the
#: gradients first; -1 (default): on for RMSNorm, off for LayerNorm (:func:`multi_dy`). Measured: the GPT-2 main
#: no faster with it (31.09 vs 31.08 ms, H100; BENCHMARKS.md, "Session 12"); the Llama-1B main 1.0% faster with
#: it, the deferred residual and XLA's dot merger off together (H100, 2 rounds; "Session 14")
MULTI_DY = -1
#: 1: unrolled blocks (models.layers.stack_blocks) hand their MLP output, and its bias, to the next block's input
#: norm (``models.norms.Residual``), which adds them in its kernel; 0: each block adds its own; -1 (default): the
#: block class's ``auto_defer_residual`` (on for Llama, off for GPT-2). GPT-2: its kernels take 0.3 ms less a step,
#: yet the main measured no faster ("Session 12", "Session 13", "Session 14", H100); Llama-1B: see MULTI_DY
DEFER_RESIDUAL = -1
#: the same for RMSNorm (chosen at Llama-1B's [16384, 2048]: BENCHMARKS.md, "Session 8")
RMS_BLOCK_M = 2
RMS_BWD_INNER = 16
RMS_NUM_WARPS = 4


def multi_dy(rms: bool) -> bool:
    """Does a norm with several consumers give each its own output (``MULTI_DY``; -1: RMSNorm yes, LayerNorm no)?"""
    return bool(rms) if MULTI_DY < 0 else bool(MULTI_DY)


def defer_residual(block_cls) -> bool:
    """Do unrolled ``block_cls`` blocks leave their residual add to the next norm (``DEFER_RESIDUAL``; -1: the
    class's ``auto_defer_residual``)?"""
    return bool(getattr(block_cls, "auto_defer_residual", False)) if DEFER_RESIDUAL < 0 else bool(DEFER_RESIDUAL)


def forward_2d(x_MxN, scale_N, bias_N, eps: float, out_dtype, block_m: int | None = None,
               num_warps: int | None = None, rms: bool = False, residual_MxN=None, residual_bias_N=None):
    """``(y [M, N] out_dtype, mean [M] fp32, rstd [M] fp32)``; tiles default to the module's constants.
    ``rms``: RMSNorm (the mean output is zeros, ``bias_N`` is not read). ``residual_MxN``: normalise
    ``s = x + residual`` (in x's dtype) and return ``(y, mean, rstd, s)``; with ``residual_bias_N`` too,
    ``s = x + (residual + residual_bias)`` (fp32, rounded once)."""
    block_m, num_warps = block_m or BLOCK_M, num_warps or NUM_WARPS
    m, n = x_MxN.shape
    add = residual_MxN is not None
    rbias = residual_bias_N is not None
    if rbias and not add:
        raise ValueError("forward_2d: residual_bias_N needs residual_MxN (the bias belongs to the residual)")
    kernel = functools.partial(_fwd_kernel, eps=eps, block_m=block_m, block_n=_pow2(n), rms=rms, add=add,
                               rbias=rbias)
    name = ("jzero_add_" if add else "jzero_") + ("rms_norm_fwd" if rms else "layer_norm_fwd")
    stats = (jax.ShapeDtypeStruct((m,), F32), jax.ShapeDtypeStruct((m,), F32))
    y = jax.ShapeDtypeStruct((m, n), out_dtype)
    out = pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m),), name=name, interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(y, jax.ShapeDtypeStruct((m, n), x_MxN.dtype)) + stats if add else (y,) + stats,
    )(*((x_MxN, residual_MxN) if add else (x_MxN,)), *((residual_bias_N,) if rbias else ()), scale_N, bias_N)
    return (out[0], out[2], out[3], out[1]) if add else out


def backward_2d(x_MxN, dy_MxN, scale_N, mean_M, rstd_M, block_m: int | None = None, n_inner: int | None = None,
                num_warps: int | None = None, rms: bool = False, dres_MxN=None, dx_sum: bool = False):
    """``(dx [M, N] x.dtype, dscale [N] fp32, dbias [N] fp32)`` of the rows given (``rms``: RMSNorm's dx).
    ``dy_MxN`` may be a tuple of [M, N] gradients (of one ``y`` read by several consumers): their fp32 sum is
    the gradient, read in this pass instead of an XLA add before it. ``dres_MxN``: a gradient reaching ``x`` by
    another path, added into ``dx`` in the same pass. ``dx_sum``: one more result, ``dx.sum(0)`` [N] fp32 (the
    gradient of a bias that was added into ``x``), from the same pass."""
    block_m, n_inner, num_warps = block_m or BLOCK_M, n_inner or BWD_INNER, num_warps or NUM_WARPS
    m, n = x_MxN.shape
    programs = pl.cdiv(m, block_m * n_inner)
    skip = dres_MxN is not None
    dys = tuple(dy_MxN) if isinstance(dy_MxN, (tuple, list)) else (dy_MxN,)
    kernel = functools.partial(_bwd_kernel, block_m=block_m, block_n=_pow2(n), n_inner=n_inner, rms=rms, skip=skip,
                               dx_sum=dx_sum, n_dy=len(dys))
    name = ("jzero_add_" if skip else "jzero_") + ("rms_norm_bwd" if rms else "layer_norm_bwd")
    partial = jax.ShapeDtypeStruct((programs * n,), F32)
    out = pl.pallas_call(
        kernel, grid=(programs,), name=name, interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(jax.ShapeDtypeStruct((m, n), x_MxN.dtype), partial, partial) + ((partial,) if dx_sum else ()),
    )(x_MxN, *dys, *((dres_MxN,) if skip else ()), scale_N, mean_M, rstd_M)
    return (out[0],) + tuple(p.reshape(programs, n).sum(0) for p in out[1:])


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



# --------------------------------------------------------------------------- the norm with the residual stream


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def residual_norm(x, r, scale, bias, rbias, eps: float, out_dtype, names: tuple, rms: bool, n_y: int = 1):
    """``(s, norm(s))`` with ``s = x + r`` (``r`` None: ``s = x``), LayerNorm (``rms=False``) or RMSNorm.

    A pre-norm block adds each sub-layer's output into the residual stream and normalises the sum for the next
    sub-layer; the sum also flows on (the skip). Unfused that is an XLA add (3 passes over [tokens, d]) and the
    norm (2); in the backward the norm's dx (3) and the add of the skip's gradient (3). Here the forward reads x and
    r and writes s and y (4), the backward reads s, dy and the skip's gradient ds and writes ``dx = ds + norm'``
    (4): 3 of 11 passes fewer with ``r``, 2 without (the norm at a block's input, whose skip gradient it adds).
    ``bias`` is not read under ``rms`` (pass zeros). ``rbias`` [N] (or None; needs ``r``): the sub-layer's output
    bias, ``s = x + (r + rbias)``: its add (2 passes) and its gradient's reduction (1) move into these passes.
    ``n_y > 1``: ``(s, (y,) * n_y)``, the same norm handed to ``n_y`` consumers (the attention's q, k and v
    projections) as separate outputs, so their gradients reach the backward kernel apart and are summed there
    (the XLA add of three [tokens, d] gradients, 4 passes, becomes 2 more reads in the kernel's pass).
    """
    return _res_fwd(x, r, scale, bias, rbias, eps, out_dtype, names, rms, n_y)[0]


def _marker(a):
    """A zero-size array of ``a``'s dtype (None for None): tells the backward which inputs were given, and the
    dtype of their cotangent."""
    return None if a is None else jnp.zeros((0,), a.dtype)


def _res_fwd(x, r, scale, bias, rbias, eps, out_dtype, names, rms, n_y=1):
    tiles = dict(block_m=RMS_BLOCK_M, num_warps=RMS_NUM_WARPS) if rms else {}
    add, has_rb = r is not None, rbias is not None
    if has_rb and not add:
        raise ValueError("residual_norm: rbias needs r (the bias belongs to the sub-layer output r)")
    given = (x,) + ((r,) if add else ()) + ((rbias,) if has_rb else ())

    def make(axes):
        def run(*args):
            x, r, rb = args[0], (args[1] if add else None), (args[2] if has_rb else None)
            scale, bias = args[-2:]
            out = forward_2d(_flat(x), scale.astype(F32), bias.astype(F32), eps, out_dtype, rms=rms,
                             residual_MxN=None if r is None else _flat(r),
                             residual_bias_N=None if rb is None else rb.astype(F32), **tiles)
            lead = x.shape[:-1]
            s = out[3].reshape(x.shape) if add else x
            return out[0].reshape(x.shape), s, out[1].reshape(lead), out[2].reshape(lead)
        return run

    rows = kernels.rows_of
    fn = kernels.per_shard(make, names,
                           in_specs=lambda sp: (sp,) + ((sp,) if add else ()) + ((P(),) if has_rb else ()) + (P(), P()),
                           out_specs=lambda sp: (sp, sp, rows(sp), rows(sp)))
    y, s, mean, rstd = fn(*given, scale, bias)
    return (s, y if n_y == 1 else (y,) * n_y), (s, scale, mean, rstd, _marker(r), _marker(rbias))


def _res_bwd(eps, out_dtype, names, rms, n_y, res, cts):
    s, scale, mean, rstd, r_mark, rb_mark = res
    add, has_rb = r_mark is not None, rb_mark is not None
    ds, dy = cts
    dys = (dy,) if n_y == 1 else tuple(dy)
    tiles = dict(block_m=RMS_BLOCK_M, n_inner=RMS_BWD_INNER, num_warps=RMS_NUM_WARPS) if rms else {}

    def make(axes):
        def run(s, ds, scale, mean, rstd, *dys):
            out = backward_2d(_flat(s), tuple(_flat(d) for d in dys), scale.astype(F32), mean.reshape(-1),
                              rstd.reshape(-1), rms=rms, dres_MxN=_flat(ds), dx_sum=has_rb, **tiles)
            sums = out[1:]
            if axes:
                sums = jax.lax.psum(sums, axes)
            return (out[0].reshape(s.shape),) + tuple(sums)
        return run

    rows = kernels.rows_of
    fn = kernels.per_shard(make, names, in_specs=lambda sp: (sp, sp, P(), rows(sp), rows(sp)) + (sp,) * n_y,
                           out_specs=lambda sp: (sp, P(), P()) + ((P(),) if has_rb else ()))
    dx, dsc, db, *drb = fn(s, ds.astype(s.dtype), scale, mean, rstd, *dys)
    d_rbias = drb[0].astype(rb_mark.dtype) if has_rb else None
    return dx, (dx.astype(r_mark.dtype) if add else None), dsc.astype(scale.dtype), db.astype(scale.dtype), d_rbias


residual_norm.defvjp(_res_fwd, _res_bwd)
