"""GPT-2's MLP (fc -> bias -> tanh-GELU -> proj) with the GELU in the GEMMs' epilogues: two Pallas (Triton) GEMMs.

XLA runs the fc GEMM (cuBLAS), then a pass that adds the bias and applies GELU, and in the backward the proj's
dX GEMM, then a pass that multiplies by GELU' and reduces the fc-bias gradient: per layer of GPT-2 124M
(tokens 16384, d_ff 3072) about 0.2 ms of element-wise passes over [tokens, d_ff] arrays beside the GEMMs.
Here:

- forward (:func:`fc_gelu`): ``pre = x @ w1 + b1`` and ``act = gelu(pre)`` written from the fp32 accumulator;
- backward (:func:`proj_gelu_grad`): ``dpre = (dout @ w2.T) * gelu'(pre)`` from the accumulator, with per-tile
  partial sums of ``dpre`` for the fc-bias gradient.

The other four GEMMs (proj forward, its dW, fc's dW and dX) stay XLA's (cuBLAS). :func:`mlp` is the custom VJP
over the whole MLP; it runs per shard of the rows and needs the ``mlp`` axis unsplit (no tensor parallelism).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jzero import kernels

F32 = jnp.float32
_C = float(np.sqrt(2.0 / np.pi))
_dot = getattr(plgpu, "dot", None) or pl.dot


def _gelu(x):
    return 0.5 * x * (1.0 + jnp.tanh(_C * (x + 0.044715 * x * x * x)))


def _gelu_grad(x):
    t = jnp.tanh(_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x * x)


def _fc_gelu_kernel(x_ref, w_ref, b_ref, pre_ref, act_ref, *, bm, bn, bk):
    i, j = pl.program_id(0), pl.program_id(1)

    def body(k, acc):
        a = plgpu.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(k * bk, bk)])
        b = plgpu.load(w_ref.at[pl.ds(k * bk, bk), pl.ds(j * bn, bn)])
        return acc + _dot(a, b)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, jnp.zeros((bm, bn), F32))
    pre = acc + plgpu.load(b_ref.at[pl.ds(j * bn, bn)]).astype(F32)[None, :]
    out = (pl.ds(i * bm, bm), pl.ds(j * bn, bn))
    plgpu.store(pre_ref.at[out], pre.astype(pre_ref.dtype))
    plgpu.store(act_ref.at[out], _gelu(pre).astype(act_ref.dtype))


def _grad_kernel(g_ref, w_ref, pre_ref, dpre_ref, db_ref, *, bm, bn, bk):
    i, j = pl.program_id(0), pl.program_id(1)

    def body(k, acc):
        a = plgpu.load(g_ref.at[pl.ds(i * bm, bm), pl.ds(k * bk, bk)])
        b = plgpu.load(w_ref.at[pl.ds(j * bn, bn), pl.ds(k * bk, bk)])
        return acc + _dot(a, b, trans_b=True)

    dact = jax.lax.fori_loop(0, g_ref.shape[1] // bk, body, jnp.zeros((bm, bn), F32))
    tile = (pl.ds(i * bm, bm), pl.ds(j * bn, bn))
    dpre = dact * _gelu_grad(plgpu.load(pre_ref.at[tile]).astype(F32))
    plgpu.store(dpre_ref.at[tile], dpre.astype(dpre_ref.dtype))
    plgpu.store(db_ref.at[i, pl.ds(j * bn, bn)], dpre.sum(axis=0))


#: (block_m, block_n, block_k, num_warps, num_stages) of both kernels
CONFIG = (128, 128, 64, 4, 4)


def fits(m: int, d: int, f: int, config=None) -> bool:
    """Do the tiles divide [m, d] x [d, f] (the kernels have no masks)?"""
    bm, bn, bk = (config or CONFIG)[:3]
    return m % bm == 0 and f % bn == 0 and d % bk == 0


def fc_gelu(x_MxD, w_DxF, b_F, config=None):
    """``(pre, gelu(pre))`` with ``pre = x @ w + b``, both [M, F] in ``x``'s dtype."""
    bm, bn, bk, warps, stages = config or CONFIG
    m, _ = x_MxD.shape
    f = w_DxF.shape[1]
    shape = jax.ShapeDtypeStruct((m, f), x_MxD.dtype)
    return pl.pallas_call(
        functools.partial(_fc_gelu_kernel, bm=bm, bn=bn, bk=bk), grid=(m // bm, f // bn), out_shape=(shape, shape),
        name="jzero_fc_gelu", interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(x_MxD, w_DxF, b_F)


def proj_gelu_grad(dout_MxD, w_FxD, pre_MxF, config=None):
    """``(dpre [M, F], dbias [F] fp32)``: ``dpre = (dout @ w.T) * gelu'(pre)`` and its column sums."""
    bm, bn, bk, warps, stages = config or CONFIG
    m, _ = dout_MxD.shape
    f = w_FxD.shape[0]
    dpre, db = pl.pallas_call(
        functools.partial(_grad_kernel, bm=bm, bn=bn, bk=bk), grid=(m // bm, f // bn),
        out_shape=(jax.ShapeDtypeStruct((m, f), pre_MxF.dtype), jax.ShapeDtypeStruct((m // bm, f), F32)),
        name="jzero_proj_gelu_grad", interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(dout_MxD, w_FxD, pre_MxF)
    return dpre, db.sum(axis=0)


# --------------------------------------------------------------------------- the MLP as one VJP

#: logical names of the MLP's input rows
ROWS = ("batch", "length", "embed")


def supported(x_shape, d_ff: int) -> bool:
    """Can :func:`mlp` run here: ``mlp`` and ``embed`` unsplit, and the local tiles divide the shapes?"""
    rows = int(np.prod(x_shape[:-1]))
    got = kernels.row_spec(ROWS)
    if got is not None and got[0].size > 1:
        mesh, spec = got
        if kernels.spec_axes(kernels.row_spec(("mlp",))[1]) or kernels.spec_axes(P(*tuple(spec)[2:])):
            return False
        rows //= int(np.prod([mesh.shape[a] for a in kernels.spec_axes(spec)]))
    return fits(rows, x_shape[-1], d_ff)


def _local_fwd(x, w1, b1, w2, b2):
    x2 = x.reshape(-1, x.shape[-1])
    pre, act = fc_gelu(x2, w1, b1)
    out = jnp.dot(act, w2) + b2
    return out.reshape(x.shape), pre, act


def _local_bwd(axes):
    def run(x, w1, w2, pre, act, dout):
        x2 = x.reshape(-1, x.shape[-1])
        g = dout.reshape(-1, dout.shape[-1])
        db2 = g.astype(F32).sum(axis=0)
        dw2 = jnp.dot(act.T, g, preferred_element_type=F32)
        dpre, db1 = proj_gelu_grad(g, w2, pre)
        dw1 = jnp.dot(x2.T, dpre, preferred_element_type=F32)
        dx = jnp.dot(dpre, w1.T)
        if axes:
            dw1, db1, dw2, db2 = jax.lax.psum((dw1, db1, dw2, db2), axes)
        return dx.reshape(x.shape), dw1, db1, dw2, db2
    return run


def _rows(spec):
    """Spec of the flattened [rows, d_ff] residuals: rows split over every axis splitting batch/length."""
    axes = kernels.spec_axes(P(*tuple(spec)[:-1]))
    return P(axes or None, None)


@jax.custom_vjp
def mlp(x_BxTxD, w1_DxF, b1_F, w2_FxD, b2_D):
    """``gelu_tanh(x @ w1 + b1) @ w2 + b2`` (compute-dtype operands), GELU fused into the GEMM epilogues."""
    return _fwd(x_BxTxD, w1_DxF, b1_F, w2_FxD, b2_D)[0]


def _fwd(x, w1, b1, w2, b2):
    fn = kernels.per_shard(lambda axes: _local_fwd, ROWS, in_specs=lambda s: (s, P(), P(), P(), P()),
                           out_specs=lambda s: (s, _rows(s), _rows(s)))
    out, pre, act = fn(x, w1, b1, w2, b2)
    return out, (x, w1, w2, pre, act)


def _bwd(res, dout):
    x, w1, w2, pre, act = res
    fn = kernels.per_shard(_local_bwd, ROWS, in_specs=lambda s: (s, P(), P(), _rows(s), _rows(s), s),
                           out_specs=lambda s: (s, P(), P(), P(), P()))
    dx, dw1, db1, dw2, db2 = fn(x, w1, w2, pre, act, dout)
    return dx, dw1.astype(w1.dtype), db1.astype(w1.dtype), dw2.astype(w2.dtype), db2.astype(w2.dtype)


mlp.defvjp(_fwd, _bwd)
