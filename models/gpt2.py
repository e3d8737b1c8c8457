"""GPT-2 in Flax Linen: learned positions, pre-LN blocks, tied LM head, scan over layers.

Linen rather than NNX: it needs no mesh to derive logical partition specs, and ``nn.scan`` stacks the layers'
params as ``[layers, ...]`` (the shape pipeline parallelism reshapes to ``[stages, layers_per_stage, ...]``).
Params are fp32 masters; compute runs in ``dtype`` (bf16 or fp16 when enabled); norms and logits in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jzero.sharding import constrain
from models.kv_cache import KVCache, context, stack_blocks_cached
from models.layers import MLP, MultiHeadAttention, embed_lookup, qkv_inputs, stack_blocks
from models.norms import LayerNorm, Residual, block_input, final_norm
from models.params import RESIDUAL, param


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_len: int = 1024
    dtype: Any = jnp.float32
    attention: str = "auto"
    scan_layers: bool = True
    remat_policy: Callable | None = None   # a jax.checkpoint policy; None = no remat
    remat: bool = False

    def n_params(self, include_pos: bool = True) -> int:
        d, f, L = self.d_model, self.d_ff, self.n_layer
        block = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
        n = self.vocab_size * d + L * block + 2 * d
        return n + (self.max_len * d if include_pos else 0)


class Block(nn.Module):
    cfg: GPT2Config
    #: training: return the residual stream as ``Residual(x, mlp_out, proj_bias)`` for the next block's ln_1 (or
    #: the model's ln_f) to add in its kernel (models.layers.stack_blocks sets it for unrolled layers)
    defer_residual: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, kv=None, ctx=None):
        """``(x, None)``; with a layer's cached ``kv=(k, v)`` and the decode ``ctx`` (:mod:`models.kv_cache`)
        ``(x, (k_new, v_new))``. ``x_BxTxD`` may be a :class:`models.norms.Residual` (the previous block's)."""
        cfg = self.cfg
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        x, delta, delta_bias = block_input(x_BxTxD)
        # (x, norm(x)) or (x + delta + bias, norm(...)): LayerNorm.__call__; training gives q, k, v each a copy
        x, h = LayerNorm(cfg.dtype, name="ln_1")(x, delta, with_sum=True, delta_bias=delta_bias,
                                                 n_out=qkv_inputs() if kv is None else 1)
        # each sub-layer's output is reduced into the residual layout here (tensor parallelism's all-reduce,
        # or reduce-scatter under sequence parallelism)
        # training: the attention's output bias is added inside ln_2's kernel (and its gradient summed there)
        attn = MultiHeadAttention(cfg.n_head, cfg.dtype, cfg.attention, out_std, defer_out_bias=kv is None,
                                  name="attn")
        if kv is None:
            (a, a_bias), new_kv = attn(h), None
        else:
            (a, new_kv), a_bias = attn(h, kv, ctx), None
        x, h = LayerNorm(cfg.dtype, name="ln_2")(x, constrain(a, RESIDUAL), delta_bias=a_bias)
        defer = self.defer_residual and kv is None
        m = MLP(cfg.d_ff, cfg.dtype, out_std, fused=not cfg.remat, defer_bias=defer, name="mlp")(h)
        if defer:
            return Residual(x, constrain(m[0], RESIDUAL), m[1]), new_kv
        x = x + constrain(m, RESIDUAL)
        return constrain(x, RESIDUAL), new_kv


class GPT2(nn.Module):
    """``tokens_BxT`` (int32) -> logits ``[B, T, vocab]`` in the compute dtype.

    With ``cache`` (a :class:`models.kv_cache.KVCache`) the tokens are the next ``T`` of each row, at the cache's
    slots, and the result is ``(logits, advanced_cache)`` (or ``((hidden, wte), cache)`` with ``head=False``).
    """

    fused_head = True   # __call__(..., head=False) gives (hidden, head weight [V, D]); see jzero.tasks.lm_loss

    cfg: GPT2Config

    @nn.compact
    def __call__(self, tokens_BxT, head: bool = True, cache: KVCache | None = None):
        """``head=False``: ``(hidden_BxTxD, wte_VxD)`` in the compute dtype instead of the logits (for a loss that
        applies the tied head itself, ``jzero.kernels.cross_entropy.head_cross_entropy``)."""
        cfg = self.cfg
        T = tokens_BxT.shape[1]
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={cfg.max_len}; raise model.max_len")
        wte = param(self, "wte", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), nn.initializers.normal(0.02),
                    cfg.dtype)
        wpe = param(self, "wpe", (cfg.max_len, cfg.d_model), (None, "embed"), nn.initializers.normal(0.01), cfg.dtype)
        if cache is not None:   # decoding: each token at its row's own position (left padding), via the cache
            positions_BxT = context(cache, T).positions_BxT
            # (clip: only the steps of a last decode chunk past max_new_tokens, whose tokens are dropped, can reach
            # max_len; jzero.generation checks that every kept token's position fits)
            pos_BxTxD = jnp.take(wpe, positions_BxT, axis=0, mode="clip")
            x = constrain(jnp.take(wte, tokens_BxT, axis=0) + pos_BxTxD, RESIDUAL)
            x, cache = stack_blocks_cached(Block, cfg, x, cache)
            x = LayerNorm(cfg.dtype, name="ln_f")(x)
            out = (x, wte) if not head else constrain(jnp.einsum("btd,vd->btv", x, wte), ("batch", "length", "vocab"))
            return out, cache
        x = embed_lookup(wte, tokens_BxT) + wpe[:T][None]
        x = constrain(x, RESIDUAL)
        x = stack_blocks(Block, cfg, x)
        x = final_norm(LayerNorm(cfg.dtype, name="ln_f"), x)
        if not head:
            return x, wte
        # logits in the compute dtype (bf16 under bf16.enabled, as PyTorch autocast gives); the loss upcasts to fp32
        logits = jnp.einsum("btd,vd->btv", x, wte)
        return constrain(logits, ("batch", "length", "vocab"))

