"""ZeRO++ qwZ: ZeRO-3's weight all-gathers move int8 blocks and one fp32 scale per block.

DeepSpeed's qwZ (``zero_quantized_weights``, ``deepspeed/runtime/zero/partition_parameters.py`` with the
``csrc/quantization`` kernels) quantizes each rank's parameter shard before the forward/backward all-gather and
dequantizes the gathered weight. Here the same happens at the one place a jzero model gathers a weight
(:func:`jzero.sharding.gather_param`, called by ``models.params.param`` inside the layer scan):

    storage shard (fp32) -> block_quantize (local: blocks never straddle shards) -> int8 blocks + scales
    -> all_gather of s8 blocks and f32 scales over ``data`` (shard_map) -> block_dequantize -> compute dtype.

Quantizer: symmetric int8 per block of ``block`` consecutive elements of the last dim, ``scale = absmax / 127``,
``q = round(x / scale)`` clipped to [-127, 127] (an all-zero block has scale 0 and decodes to 0). Bytes moved per
element: 1 + 4 / block (block 256: 1.016, vs 2 for bf16 and 4 for fp32).

The gradient is straight-through (the weight's gradient is the gathered weight's, as DeepSpeed's: qwZ changes
what the forward reads, not what the optimizer updates): fp32 masters stay exact and the gradient reduction is
ZeRO-3's. The block is the largest divisor <= ``block`` of the local shard's last dim; leaves the plan keeps
whole (the persistence threshold: never gathered) are not quantized (:func:`gathered_dims`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DEFAULT_BLOCK = 256
AXIS = "data"   # ZeRO's axis (within the node under hpZ)

_ACTIVE: contextvars.ContextVar[tuple[int, dict] | None] = contextvars.ContextVar("jzero_qwz", default=None)


def gathered_dims(plan, abstract_params) -> dict:
    """``(names, shape) -> dim`` split over ``data`` in ZeRO-3's storage layout for every leaf the plan shards,
    as the model sees it: a scanned layer stack's leaf without its leading ``layers`` dim. Leaves the plan keeps
    whole (the persistence threshold applies to the stacked leaf) are absent, so their use is never quantized."""
    out = {}
    for names, s, leaf in zip(jax.tree.leaves(plan.param_names, is_leaf=lambda x: isinstance(x, tuple)),
                              jax.tree.leaves(plan.param_storage), jax.tree.leaves(abstract_params)):
        entries = list(s.spec) + [None] * (len(names) - len(s.spec))
        dims = [i for i, e in enumerate(entries) if e is not None and AXIS in (e if isinstance(e, tuple) else (e,))]
        if dims:
            drop = 1 if names and names[0] == "layers" else 0
            out[(tuple(names[drop:]), tuple(leaf.shape[drop:]))] = dims[0] - drop
    return out


@contextlib.contextmanager
def active(plan, abstract_params, block: int = DEFAULT_BLOCK):
    """Quantize the weight gathers traced inside this context (the engine's step under qwZ)."""
    token = _ACTIVE.set((block, gathered_dims(plan, abstract_params)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def for_step(enabled: bool, plan, abstract_params):
    """:func:`active` when ``zero_quantized_weights`` is on, else a context that changes nothing."""
    return active(plan, abstract_params) if enabled else contextlib.nullcontext()


def settings() -> tuple[int, dict] | None:
    """``(block, gathered_dims)`` while qwZ is active, else None."""
    return _ACTIVE.get()


def block_quantize(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """``x[..., n]`` -> int8 ``q[..., n/block, block]`` and fp32 ``scale[..., n/block]`` (symmetric absmax)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"block_quantize: last dim {n} is not a multiple of block {block}")
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (n // block, block))
    scale = jnp.max(jnp.abs(xb), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xb / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def block_dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`block_quantize` (up to rounding): ``q * scale`` back to ``[..., n]`` in ``dtype``."""
    x = q.astype(jnp.float32) * scale[..., None]
    return x.reshape(q.shape[:-2] + (q.shape[-2] * q.shape[-1],)).astype(dtype)


def block_for(local_last: int, block: int) -> int:
    """Largest divisor of ``local_last`` (the last dim of one rank's shard) that is <= ``block``."""
    return max(b for b in range(1, min(block, local_last) + 1) if local_last % b == 0)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def quantized_gather(w: jax.Array, mesh, dim: int, dtype, block: int, constrain_fn) -> jax.Array:
    """``w`` stored split over ``data`` on ``dim``, gathered whole over ``data`` through int8 blocks.

    The partitioner, given int8 + scales constrained to the compute layout, moves the dequantize before the
    all-gather (it then gathers f32: measured on 8 CPU devices), so the gather is explicit: ``shard_map`` manual
    over ``data`` only (other axes stay automatic), quantize the local shard, ``all_gather`` s8 and f32 scales,
    dequantize. ``constrain_fn(x, 0)`` puts the result in the compute layout.
    """
    spec = P(*[AXIS if i == dim else None for i in range(w.ndim)])

    def local(x):
        q, scale = block_quantize(x, block)
        q = jax.lax.all_gather(q, AXIS, axis=dim, tiled=True)
        scale = jax.lax.all_gather(scale, AXIS, axis=dim, tiled=True)
        return block_dequantize(q, scale, dtype)

    out = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P(), axis_names={AXIS}, check_vma=False)(w)
    return constrain_fn(out, 0)


def _fwd(w, mesh, dim, dtype, block, constrain_fn):
    return quantized_gather(w, mesh, dim, dtype, block, constrain_fn), jnp.zeros((), w.dtype)


def _bwd(mesh, dim, dtype, block, constrain_fn, res, g):
    # straight-through: the cotangent in the compute layout is the weight's; ZeRO-3 reduces it to storage
    return (constrain_fn(g, 0).astype(res.dtype),)


quantized_gather.defvjp(_fwd, _bwd)
