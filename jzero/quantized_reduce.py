"""ZeRO++ qgZ: ZeRO-3's gradient reduce-scatter moves int8 blocks and one fp32 scale per block.

DeepSpeed's qgZ (``zero_quantized_gradients``, ``deepspeed/runtime/comm/coalesced_collectives.py:
all_to_all_quant_reduce``) replaces the gradient reduce-scatter with an all-to-all of quantized chunks: each rank
quantizes its local gradient chunk by chunk, sends chunk r to rank r (all-to-all), and rank r dequantizes what it
received and sums it in fp32: that sum is its ZeRO shard. With hpZ it is two-level (inside the node, then across).

Under ``jit`` ZeRO's gradient reduction is implicit (the partitioner's all-reduce / reduce-scatter of the
backward pass), so there is nothing to quantize. Here the step's value-and-grad runs inside ``shard_map`` manual
over the batch axes (``data``, and ``node`` under hpZ): each rank differentiates its own rows, and every weight
read goes through :func:`gather` (from :func:`jzero.sharding.gather_param`), a custom-VJP all-gather of the
rank's ZeRO-3 shard over ``data`` whose backward is the quantized reduce-scatter of that weight's cotangent:

    forward  (per layer, in the scan): local shard -> all_gather over data (int8 blocks under qwZ) -> weight
    backward (per layer, in the scan): local gradient [D chunks along ZeRO's dim] -> block_quantize per chunk
             -> all_to_all of s8 blocks + f32 scales over data -> dequantize, sum in fp32 -> this rank's shard
             [hpZ: -> quantized all-reduce of the shard over node: quantize, all_to_all, sum, requantize,
              all_gather s8 + scales, dequantize; every node ends with the same values]

So the gradient is reduced per layer as the backward reaches it (as DeepSpeed's, one bucket at a time) and no
rank ever holds a whole unreduced model gradient. Leaves the plan keeps whole (the persistence threshold) are
replicated inputs of the ``shard_map``; their gradient is its transpose, a psum in fp32 (DeepSpeed also
reduces 1-D tensors unquantized).

Quantizer: :func:`jzero.quantized_gather.block_quantize` (symmetric int8, absmax / 127 per block) over each
rank-chunk flattened, the block the largest divisor <= 256 of the chunk's size. Error of the reduced value:
at most ``sum_r scale_r / 2`` per element (each rank's chunk rounds once); under hpZ the inter-node step adds
its own rounding (two more half-steps of the node-level scales). Bytes moved per gradient element:
``(D-1)/D x (1 + 4/block)`` against ``(D-1)/D x 4`` for an fp32 reduce-scatter. DeepSpeed quantizes to int4;
this is int8, the precision of qwZ.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jzero import sharding as shd
from jzero.errors import ConfigError
from jzero.quantized_gather import block_dequantize, block_for, block_quantize

DEFAULT_BLOCK = 256
AXIS = "data"   # ZeRO's axis (within the node under hpZ)
NODE = "node"   # hpZ's inter-node axis (jzero.topology)

_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jzero_qgz", default=None)


# --------------------------------------------------------------------------- collectives (inside shard_map)


def to_chunks(x: jax.Array, dim: int, parts: int) -> jax.Array:
    """``x`` -> ``[parts, C]``: row r is the r-th of ``parts`` equal slices of ``dim`` (ZeRO's shard r), flat."""
    n = x.shape[dim]
    x = x.reshape(x.shape[:dim] + (parts, n // parts) + x.shape[dim + 1:])
    return jnp.moveaxis(x, dim, 0).reshape(parts, -1)


def from_chunks(x_NxC: jax.Array, dim: int, local_shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_chunks`: ``[parts, C]`` -> the slices concatenated along ``dim``."""
    parts = x_NxC.shape[0]
    x = jnp.moveaxis(x_NxC.reshape((parts,) + tuple(local_shape)), 0, dim)
    return x.reshape(local_shape[:dim] + (parts * local_shape[dim],) + tuple(local_shape[dim + 1:]))


def quantized_reduce_scatter(x: jax.Array, axis: str, dim: int, parts: int, block: int = DEFAULT_BLOCK) -> jax.Array:
    """Sum over ``axis`` of every rank's ``x``, returned split along ``dim``: this rank (index r) gets slice r.

    Each rank quantizes its ``parts`` chunks (int8 blocks + fp32 scales), an ``all_to_all`` sends chunk r to rank
    r, and the receiver dequantizes and sums in fp32. Call inside ``shard_map`` manual over ``axis``."""
    local_shape = x.shape[:dim] + (x.shape[dim] // parts,) + x.shape[dim + 1:]
    chunks = to_chunks(x.astype(jnp.float32), dim, parts)
    q, scale = block_quantize(chunks, block_for(chunks.shape[1], block))
    q = jax.lax.all_to_all(q, axis, 0, 0, tiled=True)          # row j: rank j's chunk for this rank
    scale = jax.lax.all_to_all(scale, axis, 0, 0, tiled=True)
    return block_dequantize(q, scale).sum(0).reshape(local_shape)


def quantized_all_reduce(x: jax.Array, axis: str, parts: int, block: int = DEFAULT_BLOCK) -> jax.Array:
    """Sum over ``axis`` (``parts`` ranks) of ``x``, the same on every rank: a quantized reduce-scatter of the
    flattened (zero-padded) ``x``, then each rank's fp32 sum requantized and all-gathered as int8 + scales.
    Every rank dequantizes the same blocks, its own included, so the replicas stay bit-identical (and the result
    is typed invariant over ``axis``)."""
    n = x.size
    b = min(block, -(-n // parts))
    flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, -(-n // (parts * b)) * parts * b - n))
    mine = quantized_reduce_scatter(flat, axis, 0, parts, b)
    q, scale = block_quantize(mine, b)
    q = jax.lax.all_gather(q, axis, axis=0, tiled=True, to="invarying")
    scale = jax.lax.all_gather(scale, axis, axis=0, tiled=True, to="invarying")
    return block_dequantize(q, scale)[:n].reshape(x.shape)


# --------------------------------------------------------------------------- the gather whose VJP is qgZ


@dataclass(frozen=True)
class _Gather:
    """How one leaf is gathered (hashable: a ``custom_vjp`` static argument)."""
    dim: int                 # ZeRO's split dim of the (per-layer) leaf
    parts: int               # data-axis size (ranks per node under hpZ)
    nodes: int               # hpZ nodes (1: flat ZeRO-3)
    dtype: object            # compute dtype of the gathered weight
    weight_block: int | None  # qwZ: int8 weight gather with this block size; None: gather in ``dtype``
    grad_block: int
    names: tuple


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather(w_local: jax.Array, how: _Gather) -> jax.Array:

    if how.weight_block is None:
        full = jax.lax.all_gather(w_local.astype(how.dtype), AXIS, axis=how.dim, tiled=True)
    else:   # qwZ: this rank's shard as int8 blocks (flattened), gathered, dequantized, laid back along dim
        flat = w_local.astype(jnp.float32).reshape(-1)
        q, scale = block_quantize(flat, block_for(flat.size, how.weight_block))
        q = jax.lax.all_gather(q, AXIS, axis=0, tiled=False)
        scale = jax.lax.all_gather(scale, AXIS, axis=0, tiled=False)
        full = from_chunks(block_dequantize(q, scale, how.dtype).reshape(how.parts, -1), how.dim, w_local.shape)
    if how.nodes > 1:   # hpZ: mark it per node, so the cotangent reaches _gather_bwd unsummed over nodes (else
        full = jax.lax.pcast(full, (NODE,), to="varying")   # the implicit pvary's transpose psums it in fp32)
    return shd.constrain(full, how.names)


def _gather_fwd(w_local, how):
    return _gather(w_local, how), jnp.zeros((), w_local.dtype)


def _gather_bwd(how, res, g):
    shard = quantized_reduce_scatter(g, AXIS, how.dim, how.parts, how.grad_block)
    if how.nodes > 1:   # hpZ: the 1/k shard is replicated across nodes; reduce it there too, quantized
        shard = quantized_all_reduce(shard, NODE, how.nodes, how.grad_block)
    return (shard.astype(res.dtype),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def read_shape(names, shape) -> tuple[int, ...]:
    """The shape the model reads a weight with inside the region: one rank's shard for a leaf split over ``data``
    (``shape`` divided on ZeRO's dim), else ``shape`` (leaves the plan keeps whole)."""
    table = _ACTIVE.get()
    dim = table["dims"].get((tuple(names), tuple(shape)))
    if dim is None:
        return tuple(shape)
    return tuple(shape[:dim]) + (shape[dim] // table["parts"],) + tuple(shape[dim + 1:])


def gather(w: jax.Array, names, dtype, shape) -> jax.Array:
    """:func:`jzero.sharding.gather_param` inside the region: a leaf split over ``data`` (``w`` is this rank's
    shard of a weight of ``shape``) is gathered by :func:`_gather`; a leaf the plan keeps whole is marked
    varying over the batch axes (``pcast``), whose transpose is the fp32 psum of its gradient: over ``data``
    first, then (hpZ) over ``node``, as DeepSpeed's hierarchical reduction. Marking it here, not where it meets
    the rows, keeps every custom VJP downstream (embedding, fused head) type-consistent."""

    table = _ACTIVE.get()
    dim = table["dims"].get((tuple(names), tuple(shape)))
    if dim is None:
        for axis in table["axes"]:   # (node, data): the backward psums over data, then over node; in fp32
            w = jax.lax.pcast(w, (axis,), to="varying")
        return shd.constrain(w.astype(dtype), names)
    return _gather(w, _Gather(dim, table["parts"], table["nodes"], jnp.dtype(dtype), table["weight_block"],
                              table["grad_block"], tuple(names)))


# --------------------------------------------------------------------------- the step's value-and-grad


def _manual_spec(spec: P, axes: tuple[str, ...]) -> P:
    """``spec`` restricted to the manual axes (the shard_map's in/out spec; the other axes stay automatic)."""
    def keep(e):
        kept = tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a in axes) if e is not None else ()
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return P(*[keep(e) for e in spec])


def value_and_grad(loss_fn, mesh, rules, plan, abstract_params, quantized_weights: bool = False,
                   block: int = DEFAULT_BLOCK, weight_fn=None):
    """``(params, micro_batch) -> (loss, grads)`` with ZeRO-3's gradient reduce-scatter done by qgZ.

    ``shard_map`` manual over the batch axes: each rank's loss is over its own rows, scaled by 1/ranks so that
    the reduced gradient is the mean's; the loss returned is the psum of those (the global mean). ``rules`` is
    the engine's compute table; inside, ``batch`` maps to no axis (the rows are already this rank's).
    ``quantized_weights`` (qwZ) makes the forward gathers int8 as well. Grads come out in ``plan.grad``.
    ``weight_fn`` (the task's ``weight``): each rank's loss is scaled by its share of the entries the loss
    averages over instead of 1/ranks, so a masked loss is the micro-batch's mean as under plain ZeRO-3.
    """
    axes = (NODE, AXIS) if NODE in mesh.axis_names else (AXIS,)
    ranks = math.prod(mesh.shape[a] for a in axes)
    from jzero.quantized_gather import gathered_dims

    table = {"axes": axes, "dims": gathered_dims(plan, abstract_params), "parts": mesh.shape[AXIS],
             "nodes": mesh.shape.get(NODE, 1), "weight_block": block if quantized_weights else None,
             "grad_block": block}
    specs = jax.tree.map(lambda s: _manual_spec(s.spec, axes), plan.grad)
    inner_rules = tuple((n, None) if n == "batch" else (n, ax) for n, ax in rules)
    row = axes if len(axes) > 1 else axes[0]

    def body(params, rows):
        if weight_fn is None:
            share = 1.0 / ranks
        else:   # a constant of the step (no gradient): this rank's entries over all ranks'
            w = weight_fn(rows).astype(jnp.float32)
            share = w / jnp.maximum(jax.lax.psum(w, axes), 1.0)
        token = _ACTIVE.set(table)
        try:   # the mesh with data manual; the model's weight reads become this module's gathers
            with shd.activate(jax.sharding.get_abstract_mesh(), inner_rules), shd.override_gather(gather, read_shape):
                loss, grads = jax.value_and_grad(lambda p: loss_fn(p, rows) * share)(params)
        finally:
            _ACTIVE.reset(token)
        return jax.lax.psum(loss, axes), grads

    def vg(params, micro_batch):
        batch_specs = jax.tree.map(lambda x: P(row, *([None] * (x.ndim - 1))), micro_batch)
        return jax.shard_map(body, mesh=mesh, in_specs=(specs, batch_specs), out_specs=(P(), specs),
                             axis_names=set(axes), check_vma=True)(params, micro_batch)

    return vg


def check_config(cfg) -> None:
    """Combinations qgZ does not implement: one-line errors naming the key (called by the engine)."""
    z, key = cfg.zero_optimization, "zero_optimization.zero_quantized_gradients"
    if not z.zero_quantized_gradients:
        return
    from jzero.optim.onebit import is_onebit

    if is_onebit(cfg.optimizer.type):
        raise ConfigError(f"{key}: qgZ with {cfg.optimizer.type} is not implemented (the 1-bit optimizers "
                          "compress their own all-reduce and refuse ZeRO); use Adam/AdamW/Lamb")
    if z.offload_optimizer.device != "none":
        raise ConfigError(f"{key}: qgZ with zero_optimization.offload_optimizer is not implemented; remove one")
    if cfg.mesh.pipeline not in (1, -1):
        raise ConfigError(f"{key}: qgZ with mesh.pipeline > 1 is not implemented; set mesh.pipeline=1")
    if cfg.mesh.tensor not in (1, -1):
        raise ConfigError(f"{key}: qgZ with mesh.tensor > 1 is not implemented (a dim split over tensor and data); "
                          "set mesh.tensor=1")
