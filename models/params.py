"""What every model module builds on: the logical layouts of the residual stream and of a sub-layer's input, and
:func:`param`, through which every parameter is created and read.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) in fp32 (the master copy)
and read through :func:`param`, which casts it to the compute dtype and asks for its compute layout with
``jzero.sharding.constrain``. Under ZeRO-3 that constraint is where a layer's params are gathered: inside the
scanned block, so only one layer is whole at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jzero.sharding import gather_param, param_shape

Dtype = Any

#: Logical names of the residual stream between blocks (and of norms/embeddings): its sequence dim is split over
#: ``tensor`` under sequence parallelism (jzero.sharding.SEQUENCE_PARALLEL_RULES), replicated otherwise. Blocks
#: constrain each sub-layer's output to this layout, which is where tensor parallelism's partial sums are reduced
#: (all-reduce, or reduce-scatter with sequence parallelism).
RESIDUAL = ("batch", "residual_length", "embed")
#: The layout attention and MLP read their input in: the whole sequence. Under sequence parallelism constraining
#: to it is the all-gather before the column-parallel matmuls (without it XLA may gather the weights instead);
#: otherwise it is a no-op.
SUBLAYER_INPUT = ("batch", "length", "embed")


def param(mod: nn.Module, name: str, shape: Sequence[int], names: Sequence[str | None], init: Callable,
          dtype: Dtype, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """Create/read a parameter with logical names; return it cast to ``dtype`` in its compute layout."""
    w = mod.param(name, nn.with_logical_partitioning(init, tuple(names)), param_shape(names, shape), param_dtype)
    return gather_param(w, names, dtype, shape)   # param_shape: one rank's shard under ZeRO++ qgZ


def low_precision(dtype) -> bool:
    """bf16/fp16 compute: the GPU training path (the Pallas/cuBLASLt kernels may apply); fp32 keeps the formulas."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
