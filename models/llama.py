"""Llama-style decoder in Flax Linen: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.

The same layout as GPT-2 (pre-norm blocks scanned over a leading 'layers' axis by ``stack_blocks``, so pipeline
parallelism and remat apply unchanged); what differs is inside the block. Tensor parallelism comes from the
logical names alone: Q/K/V and gate/up are column-parallel ('heads', 'kv_heads', 'mlp' on their output dim),
the attention output and down projections row-parallel, the embedding and LM head vocabulary-parallel.
Params are fp32 masters; compute runs in ``dtype``; norms and RoPE in fp32; logits in ``dtype`` (the loss upcasts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jzero.sharding import constrain
from models.kv_cache import KVCache, stack_blocks_cached
from models.layers import Attention, SwiGLU, embed_lookup, qkv_inputs, stack_blocks
from models.norms import Residual, RMSNorm, block_input, final_norm
from models.params import RESIDUAL, param


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32          # < n_head: grouped-query attention (n_head // n_kv_head query heads per K/V head)
    d_model: int = 4096
    d_ff: int = 11008
    max_len: int = 4096          # longest sequence accepted (RoPE itself has no table to outgrow)
    rope_theta: float = 10000.0
    #: Llama 3.1 RoPE scaling ``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``
    #: (models.layers.rope_frequencies; set by the HF import of rope_type 'llama3'), None = plain RoPE
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"
    scan_layers: bool = True
    remat_policy: Callable | None = None
    remat: bool = False

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.n_kv_head}; "
                             f"grouped-query attention shares each K/V head among n_head/n_kv_head query heads")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head size model.d_model/model.n_head = {self.d_model // self.n_head} is odd; "
                             f"RoPE rotates pairs of dims, so choose sizes giving an even head size")

    def n_params(self, include_pos: bool = True) -> int:
        """Parameter count (``include_pos`` is accepted for the GPT-2 signature; RoPE has no parameters)."""
        d, f, L, V = self.d_model, self.d_ff, self.n_layer, self.vocab_size
        h = d // self.n_head
        attn = d * self.n_head * h * 2 + d * self.n_kv_head * h * 2     # q, out + k, v
        block = attn + 3 * d * f + 2 * d                                 # gate, up, down + two norms
        return V * d * (1 if self.tie_embeddings else 2) + L * block + d


class LlamaBlock(nn.Module):
    cfg: LlamaConfig
    #: training: return ``Residual(x, mlp_out)`` for the next block's attn_norm (or the final norm) to add in its
    #: kernel (models.layers.stack_blocks sets it for unrolled layers)
    defer_residual: bool = False
    #: what ``jzero.kernels.layer_norm.DEFER_RESIDUAL=-1`` (the default) picks: on (Llama-1B main 1.0% faster with
    #: it, MULTI_DY and XLA's dot merger off together; BENCHMARKS.md, "Session 14")
    auto_defer_residual = True

    @nn.compact
    def __call__(self, x_BxTxD, kv=None, ctx=None):
        """``(x, None)``; with a layer's cached ``kv=(k, v)`` and the decode ``ctx`` (:mod:`models.kv_cache`)
        ``(x, (k_new, v_new))``. ``x_BxTxD`` may be a :class:`models.norms.Residual` (the previous block's)."""
        cfg = self.cfg
        out_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        x, delta, _ = block_input(x_BxTxD)
        # (x, norm(x)) or (x + delta, norm(x + delta)): the block input and its norm in one op
        # (models.norms.LayerNorm.__call__); training gives q, k, v each a copy
        x, h = RMSNorm(cfg.dtype, cfg.norm_eps, name="attn_norm")(x, delta, with_sum=True,
                                                                  n_out=qkv_inputs() if kv is None else 1)
        attn = Attention(cfg.n_head, cfg.n_kv_head, cfg.dtype, cfg.attention, out_std, causal=True,
                         rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, name="attn")
        if kv is None:
            a, new_kv = attn(h), None
        else:
            a, new_kv = attn(h, kv=kv, ctx=ctx)
        x, h = RMSNorm(cfg.dtype, cfg.norm_eps, name="mlp_norm")(x, constrain(a, RESIDUAL))
        m = constrain(SwiGLU(cfg.d_ff, cfg.dtype, out_std, name="mlp")(h), RESIDUAL)
        if self.defer_residual and kv is None:
            return Residual(x, m), new_kv
        return constrain(x + m, RESIDUAL), new_kv


class Llama(nn.Module):
    """``tokens_BxT`` (int32) -> logits ``[B, T, vocab]`` in the compute dtype.

    Not fp32: with fp32 logits the head's two backward GEMMs take an fp32 cotangent and run as fp32/TF32 GEMMs,
    a large share of a Llama-1B step (vocab 128256; BENCHMARKS.md, "Session 2"); the cross-entropy upcasts per element.

    With ``cache`` (a :class:`models.kv_cache.KVCache`) the tokens are the next ``T`` of each row and the result
    is ``(logits, advanced_cache)`` (``((hidden, head weight), cache)`` with ``head=False``).
    """

    cfg: LlamaConfig

    fused_head = True   # __call__(..., head=False) gives (hidden, head weight [V, D]); see jzero.tasks.lm_loss

    @nn.compact
    def __call__(self, tokens_BxT, head: bool = True, cache: KVCache | None = None):
        cfg = self.cfg
        if tokens_BxT.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens_BxT.shape[1]} exceeds model.max_len={cfg.max_len}; "
                             f"raise model.max_len")
        embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                      nn.initializers.normal(0.02), cfg.dtype)
        x = constrain(embed_lookup(embed, tokens_BxT), RESIDUAL)
        if cache is not None:
            x, cache = stack_blocks_cached(LlamaBlock, cfg, x, cache)
        else:
            x = stack_blocks(LlamaBlock, cfg, x)
        x = final_norm(RMSNorm(cfg.dtype, cfg.norm_eps, name="final_norm"), x)
        if cfg.tie_embeddings:
            w_VxD = embed.astype(cfg.dtype)
        else:
            w_VxD = param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(0.02), cfg.dtype).T
        if not head:   # (hidden, head weight) for a loss that applies the head itself (jzero.tasks.lm_loss)
            return (x, w_VxD) if cache is None else ((x, w_VxD), cache)
        logits = constrain(jnp.einsum("btd,vd->btv", x, w_VxD), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, cache)
