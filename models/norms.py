"""The norms (LayerNorm, RMSNorm) and the residual stream they sit on in a pre-norm block.

On a GPU in bf16/fp16 they run as :mod:`jzero.kernels.layer_norm`'s Pallas kernels, which also fold in the
residual add (``norm(x, delta)``), a sub-layer's output bias (``delta_bias``) and, with ``n_out``, the gradients of
several consumers of one norm; elsewhere the same math in XLA. :class:`Residual` is the residual stream with a
sub-layer's output not yet added, passed between unrolled blocks so the next norm's kernel adds it.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jzero import kernels
from jzero.kernels import layer_norm as kernel_ln
from models.params import RESIDUAL, Dtype, low_precision, param


class Residual(NamedTuple):
    """The residual stream with a sub-layer's output not yet added: ``x + (delta + delta_bias)``.

    Unrolled pre-norm blocks (:func:`models.layers.stack_blocks`) pass it from one block to the next, so the add happens inside
    the next block's input norm (:class:`LayerNorm` with ``delta``), whose kernels also sum the bias's gradient,
    instead of an XLA add pass at the end of each block (and a reduction for the bias gradient). The model's
    final norm takes the last one: :func:`final_norm`.
    """

    x: jax.Array
    delta: jax.Array | None = None
    delta_bias: jax.Array | None = None   # [d], the sub-layer's output bias (None: none)


def final_norm(norm: nn.Module, x):
    """``norm(x)`` of the blocks' output, a plain array or a :class:`Residual` (its add done inside the norm)."""
    if not isinstance(x, Residual):
        return norm(x)
    if x.delta is None:
        return norm(x.x)
    kw = {} if x.delta_bias is None else {"delta_bias": x.delta_bias}
    return norm(x.x, x.delta, **kw)[1]


def block_input(x):
    """``(x, delta, delta_bias)`` of a block's input, a plain array or a :class:`Residual`."""
    return tuple(x) if isinstance(x, Residual) else (x, None, None)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (as GPT-2), output in the compute dtype.

    bf16/fp16 on a GPU: the Pallas kernels of :mod:`jzero.kernels.layer_norm` (one HBM pass each way), per shard
    of the residual layout (``RESIDUAL``); elsewhere :func:`layer_norm` (XLA, same gradient).
    """

    dtype: Dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, delta=None, with_sum: bool = False, delta_bias=None, n_out: int = 1):
        """``norm(x)``. A pre-norm block calls it with the residual stream instead:

            x, h = norm(x, with_sum=True)     # (x, norm(x)): a block's input and its first sub-layer's input
            x, h = norm(x, delta)             # (x + delta, norm(x + delta)): a sub-layer's output added
            x, h = norm(x, delta, delta_bias=b)   # the sub-layer's output bias [d] not yet added to delta
            x, (hq, hk, hv) = norm(x, delta, n_out=3)   # h for three consumers (each its own output)

        the same numbers as ``x = x + (delta + b); h = norm(x)`` (to rounding: the kernel rounds the sum once).
        With the GPU kernels the adds and, in the backward, the skip path's gradient and the bias gradient are
        folded into the norm's own pass (:func:`jzero.kernels.layer_norm.residual_norm`); with ``n_out`` the
        consumers' gradients are summed there too.
        """
        if delta_bias is not None and delta is None:
            raise ValueError("LayerNorm: delta_bias is the bias of delta; pass delta too")
        if n_out > 1 and not (delta is not None or with_sum):
            raise ValueError("LayerNorm: n_out > 1 is for the residual form (pass delta or with_sum=True)")
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, jnp.float32)
        bias = param(self, "bias", (d,), ("embed",), nn.initializers.zeros, jnp.float32)
        fused = delta is not None or with_sum
        low = low_precision(self.dtype)   # GPU training path; fp32 keeps the plain formula (results unchanged)
        kernel = low and kernels.use("layer_norm", (kernels.LAYOUT_WHY, lambda: kernel_ln.supported(RESIDUAL, d)))
        fold = kernel and fused and kernels.enabled("residual_norm")
        if delta_bias is not None and not (fold and kernel_ln.RESIDUAL_BIAS):   # XLA adds the bias here
            delta, delta_bias = delta + delta_bias.astype(delta.dtype), None
        if fold:
            n_y = n_out if kernel_ln.multi_dy(False) else 1
            s, y = kernel_ln.residual_norm(x, _like(delta, x), scale, bias, delta_bias, self.eps, self.dtype,
                                           RESIDUAL, False, n_y)
            return s, _copies(y, n_out, n_y)
        s = x if delta is None else x + delta
        if kernel:
            y = kernel_ln.layer_norm(s, scale, bias, self.eps, self.dtype, RESIDUAL)
        elif low:
            y = layer_norm(s, scale, bias, self.eps, self.dtype)
        else:
            x32 = s.astype(jnp.float32)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)
        return (s, _copies(y, n_out)) if fused else y


def _like(delta, x):
    return None if delta is None else delta.astype(x.dtype)


def _copies(y, n_out: int, n_y: int = 1):
    """The norm output for ``n_out`` consumers: ``y`` itself for one, else a tuple (``y`` repeated, unless the
    kernel already gave ``n_y == n_out`` separate outputs)."""
    if n_out == 1 or n_y == n_out:
        return y
    return (y,) * n_out


def _ln_stats(x, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return x32, mean, jax.lax.rsqrt(var + eps)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, out_dtype):
    """LayerNorm in fp32 with a hand-written backward that keeps only ``x`` and the per-row mean/rstd.

    Used for bf16/fp16 compute (fp32 keeps the plain formula, so fp32 results are unchanged). The aim was to let
    the scale/bias gradients be plain column reductions instead of a materialised fp32 ``xhat * dy``; on the H100
    XLA still recomputes the statistics in the backward pass (its Triton norm fusions have one output), so the
    change measured little (BENCHMARKS.md, "Notes: predictions vs measurements", LayerNorm custom VJP).
    Numerically it is the same gradient.
    """
    x32, mean, rstd = _ln_stats(x, eps)
    return ((x32 - mean) * rstd * scale + bias).astype(out_dtype)


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
    x32, mean, rstd = _ln_stats(x, eps)
    return ((x32 - mean) * rstd * scale + bias).astype(out_dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, out_dtype, res, dy):
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), (dy32 * xhat).sum(lead), dy32.sum(lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, output in the compute dtype.

    bf16/fp16 on a GPU: the Pallas kernels of :mod:`jzero.kernels.layer_norm` (``rms_norm``), per shard of the
    residual layout; elsewhere XLA's autodiff of the formula below.
    """

    dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x, delta=None, with_sum: bool = False, n_out: int = 1):
        """``norm(x)``, or with ``delta`` / ``with_sum`` the residual stream's sum too, and ``n_out`` copies of
        the norm for that many consumers (as :class:`LayerNorm`)."""
        if n_out > 1 and not (delta is not None or with_sum):
            raise ValueError("RMSNorm: n_out > 1 is for the residual form (pass delta or with_sum=True)")
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, jnp.float32)
        fused = delta is not None or with_sum
        kernel = low_precision(self.dtype) and kernels.use(
            "rms_norm", (kernels.LAYOUT_WHY, lambda: kernel_ln.supported(RESIDUAL, d)))
        if kernel and fused and kernels.enabled("residual_norm"):
            n_y = n_out if kernel_ln.multi_dy(True) else 1
            s, y = kernel_ln.residual_norm(x, _like(delta, x), scale, jnp.zeros_like(scale), None, self.eps,
                                           self.dtype, RESIDUAL, True, n_y)
            return s, _copies(y, n_out, n_y)
        s = x if delta is None else x + delta
        if kernel:
            y = kernel_ln.rms_norm(s, scale, self.eps, self.dtype, RESIDUAL)
        else:
            x32 = s.astype(jnp.float32)
            y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps) * scale).astype(self.dtype)
        return (s, _copies(y, n_out)) if fused else y

