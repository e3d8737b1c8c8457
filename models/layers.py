"""Building blocks shared by the model families: sharded params, norms, attention, MLP.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) in fp32 (the master copy)
and read through :func:`param`, which casts it to the compute dtype and asks for its compute layout with
``jzero.sharding.constrain``. Under ZeRO-3 that constraint is where a layer's params are gathered: inside the
scanned block, so only one layer is whole at a time. Activations are named with ``checkpoint_name`` so remat
policies can save or offload them by name.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jzero.sharding import constrain

Dtype = Any


def param(mod: nn.Module, name: str, shape: Sequence[int], names: Sequence[str | None], init: Callable,
          dtype: Dtype, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """Create/read a parameter with logical names; return it cast to ``dtype`` in its compute layout."""
    w = mod.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), param_dtype)
    return constrain(w.astype(dtype), names)


def attention_impl(choice: str) -> str | None:
    """'auto' -> cuDNN flash attention on GPU, XLA elsewhere."""
    if choice == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return choice


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (as GPT-2), output in the compute dtype."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, jnp.float32)
        bias = param(self, "bias", (d,), ("embed",), nn.initializers.zeros, jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, output in the compute dtype."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps) * scale
        return y.astype(self.dtype)


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, impl: str) -> jax.Array:
    """Causal scaled dot-product attention, BTNH layout, GQA when K < N heads."""
    if impl == "cudnn" and q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        impl = "xla"  # cuDNN flash attention needs 16-bit inputs
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True, implementation=impl)


class MultiHeadAttention(nn.Module):
    """GPT-2 attention: fused QKV projection with bias, heads split over ``tensor`` (Megatron column/row)."""

    n_head: int
    dtype: Dtype
    attention: str
    out_init_std: float

    @nn.compact
    def __call__(self, x_BxTxD):
        d = x_BxTxD.shape[-1]
        h = d // self.n_head
        init = nn.initializers.normal(0.02)
        w_qkv = param(self, "qkv_kernel", (d, 3, self.n_head, h), ("embed", None, "heads", "kv"), init, self.dtype)
        b_qkv = param(self, "qkv_bias", (3, self.n_head, h), (None, "heads", "kv"), nn.initializers.zeros, self.dtype)
        qkv = jnp.einsum("btd,dcnh->btcnh", x_BxTxD, w_qkv) + b_qkv
        qkv = checkpoint_name(constrain(qkv, ("batch", "length", None, "heads", "kv")), "qkv")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        o = causal_attention(q, k, v, attention_impl(self.attention))
        o = checkpoint_name(constrain(o, ("batch", "length", "heads", "kv")), "attn_out")
        w_o = param(self, "out_kernel", (self.n_head, h, d), ("heads", "kv", "embed"),
                    nn.initializers.normal(self.out_init_std), self.dtype)
        b_o = param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)
        return jnp.einsum("btnh,nhd->btd", o, w_o) + b_o


class MLP(nn.Module):
    """GPT-2 MLP: fc (column-parallel over ``mlp``) -> GELU(tanh) -> proj (row-parallel)."""

    d_ff: int
    dtype: Dtype
    out_init_std: float

    @nn.compact
    def __call__(self, x_BxTxD):
        d = x_BxTxD.shape[-1]
        w1 = param(self, "fc_kernel", (d, self.d_ff), ("embed", "mlp"), nn.initializers.normal(0.02), self.dtype)
        b1 = param(self, "fc_bias", (self.d_ff,), ("mlp",), nn.initializers.zeros, self.dtype)
        hdn = jax.nn.gelu(jnp.einsum("btd,df->btf", x_BxTxD, w1) + b1, approximate=True)
        hdn = checkpoint_name(constrain(hdn, ("batch", "length", "mlp")), "mlp_hidden")
        w2 = param(self, "proj_kernel", (self.d_ff, d), ("mlp", "embed"),
                   nn.initializers.normal(self.out_init_std), self.dtype)
        b2 = param(self, "proj_bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)
        return jnp.einsum("btf,fd->btd", hdn, w2) + b2


def stack_blocks(block_cls, cfg, x):
    """Run ``cfg.n_layer`` blocks: one ``nn.scan`` (params stacked on a leading 'layers' axis) or a Python loop."""
    if cfg.remat:
        block_cls = nn.remat(block_cls, policy=cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(cfg, name="blocks")(x, None)
        return x
    for i in range(cfg.n_layer):
        x, _ = block_cls(cfg, name=f"block_{i}")(x, None)
    return x
