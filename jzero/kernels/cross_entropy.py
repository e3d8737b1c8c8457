"""The LM head's cross-entropy with one HBM read of the logits: a Pallas (Triton) kernel and a fused custom VJP.

Kernel (one program per ``block_r`` rows): pass 1 walks the row's vocabulary in ``block_v`` chunks keeping a
running max and sum of exp (fp32) -> ``lse``; pass 2 walks it again (the rows just read are still in L2) and writes
``softmax - onehot`` in the logits' dtype; the label's logit is one gathered load per row. Out: per-row loss
``lse - logit[label]`` (fp32) and that unscaled gradient ``D`` [M, V]. The math is in the log2 domain (``exp2``).

:func:`head_cross_entropy` puts the head's linear inside the custom VJP: ``logits = h @ w.T`` (XLA's GEMM), then
the kernel; the backward is two GEMMs on the saved ``D`` with the per-token cotangent ``g`` applied to their
small operands (``dh = g * (D @ w)``, ``dw = D.T @ (g * h)``), so no pass over the [M, V] array scales it. XLA's
version is a logsumexp pass and a backward pass over the logits; the kernel reads them once and writes ``D``
once (times on GPT-2 124M, and ``exp2`` against ``exp``: BENCHMARKS.md, "Session 3" (H100)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jzero import kernels
from jzero.loss import cross_entropy

F32 = jnp.float32
_NEG = -1e30   # finite "minus infinity" for the running max (exp(-inf - -inf) would be nan)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _kernel(logits_ref, labels_ref, loss_ref, d_ref, *, block_r, block_v, n_outer):
    # log2 domain: exp2 lowers to one fast instruction (exp to libdevice's accurate expf, ~10), and the kernel is
    # instruction-bound, not byte-bound, with exp (measured: BENCHMARKS.md, "Session 3" (H100))
    # Program p takes row blocks p, p + G, p + 2G, ... (G programs, n_outer blocks each): with G near the SM count
    # only G rows are in flight, so each row's second pass finds it in L2 even at vocab 128256 (256 KB a row)
    pid, n_programs = pl.program_id(0), pl.num_programs(0)   # read outside the loop (interpret mode needs it)

    @pl.loop(0, n_outer)
    def _(i):
        _rows(logits_ref, labels_ref, loss_ref, d_ref, (i * n_programs + pid) * block_r, block_r=block_r,
              block_v=block_v)


def _rows(logits_ref, labels_ref, loss_ref, d_ref, first, *, block_r, block_v):
    m, v = logits_ref.shape
    rows = first + jnp.arange(block_r)
    rmask = rows < m
    labels = plgpu.load(labels_ref.at[rows], mask=rmask, other=0)
    n_chunks = pl.cdiv(v, block_v)

    def chunk(k):
        cols = k * block_v + jnp.arange(block_v)
        return cols, rmask[:, None] & (cols < v)[None, :]

    def stats(k, carry):
        mx, se = carry
        cols, mask = chunk(k)
        x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=mask, other=float("-inf"),
                       eviction_policy="evict_last").astype(F32) * _LOG2E
        new = jnp.maximum(mx, x.max(axis=1))
        se = se * jnp.exp2(mx - new) + jnp.exp2(x - new[:, None]).sum(axis=1)
        return new, se

    mx, se = jax.lax.fori_loop(0, n_chunks, stats, (jnp.full((block_r,), _NEG, F32), jnp.zeros((block_r,), F32)))
    lse2 = mx + jnp.log2(se)

    @pl.loop(0, n_chunks)
    def _(k):
        cols, mask = chunk(k)
        x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0,
                       eviction_policy="evict_first").astype(F32)
        d = jnp.exp2(x * _LOG2E - lse2[:, None]) - jnp.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        plgpu.store(d_ref.at[rows[:, None], cols[None, :]], d.astype(d_ref.dtype), mask=mask)

    picked = plgpu.load(logits_ref.at[rows, labels], mask=rmask, other=0.0).astype(F32)
    plgpu.store(loss_ref.at[rows], (lse2 - picked * _LOG2E) * _LN2, mask=rmask)


BLOCK_R = 1
BLOCK_V = 4096
NUM_WARPS = 8
#: programs launched (each walks its share of the row blocks); 0: one program per row block
PROGRAMS = 0


def loss_and_grad_2d(logits_MxV, labels_M, block_r: int | None = None, block_v: int | None = None,
                     num_warps: int | None = None, programs: int | None = None):
    """``(loss [M] fp32, softmax - onehot [M, V] in the logits' dtype)`` in one read of the logits."""
    block_r, block_v, num_warps = block_r or BLOCK_R, block_v or BLOCK_V, num_warps or NUM_WARPS
    programs = PROGRAMS if programs is None else programs
    m, v = logits_MxV.shape
    blocks = pl.cdiv(m, block_r)
    grid = min(programs, blocks) if programs else blocks
    kernel = functools.partial(_kernel, block_r=block_r, block_v=block_v, n_outer=pl.cdiv(blocks, grid))
    return pl.pallas_call(
        kernel, grid=(grid,), name="jzero_cross_entropy", interpret=kernels.interpret(),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        out_shape=(jax.ShapeDtypeStruct((m,), F32), jax.ShapeDtypeStruct((m, v), logits_MxV.dtype)),
    )(logits_MxV, labels_M.astype(jnp.int32))


# --------------------------------------------------------------------------- the head + loss as one VJP

#: logical names of the hidden states [B, T, D] entering the head
HIDDEN = ("batch", "length", "embed")


def supported() -> bool:
    """Can the fused head run under the active plan? Rows may be split; the hidden axis may not (the vocabulary
    projection would then need a partial-sum all-reduce of the logits inside the kernel's shard)."""
    return kernels.last_axis_unsplit(HIDDEN)


def _local_fwd(h, w, labels):
    logits = jnp.einsum("btd,vd->btv", h, w)
    loss, d = loss_and_grad_2d(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss.reshape(labels.shape), d.reshape(logits.shape)


def _local_bwd(axes):
    def run(h, w, d, g):
        g = g[..., None].astype(F32)
        dh = (jnp.einsum("btv,vd->btd", d, w, preferred_element_type=F32) * g).astype(h.dtype)
        dw = jnp.einsum("btv,btd->vd", d, (h.astype(F32) * g).astype(h.dtype), preferred_element_type=F32)
        if axes:
            dw = jax.lax.psum(dw, axes)
        return dh, dw.astype(w.dtype)
    return run


@jax.custom_vjp
def head_cross_entropy(h_BxTxD, w_VxD, labels_BxT):
    """Per-token cross-entropy (fp32) of ``logits = h @ w.T`` against ``labels``, logits never kept.

    ``h`` and ``w`` in the compute dtype (bf16); the rows may be sharded (data parallelism), ``w`` replicated.
    Not differentiated (evaluation), it is :func:`jzero.loss.cross_entropy` (XLA): the kernel's gradient output
    would be wasted work.
    """
    return cross_entropy(jnp.einsum("btd,vd->btv", h_BxTxD, w_VxD), labels_BxT)


def _fwd(h, w, labels):
    fn = kernels.per_shard(lambda axes: _local_fwd, HIDDEN, in_specs=lambda s: (s, P(), kernels.rows_of(s)),
                           out_specs=lambda s: (kernels.rows_of(s), s))
    loss, d = fn(h, w, labels)
    return loss, (h, w, d)


def _bwd(res, g):
    h, w, d = res
    fn = kernels.per_shard(_local_bwd, HIDDEN, in_specs=lambda s: (s, P(), s, kernels.rows_of(s)),
                           out_specs=lambda s: (s, P()))
    dh, dw = fn(h, w, d, g)
    return dh, dw, None


head_cross_entropy.defvjp(_fwd, _bwd)
