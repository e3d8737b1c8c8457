"""KV cache for autoregressive decoding, shared by GPT-2 and Llama (grouped-query attention).

    cache = KVCache.zeros(cfg.n_layer, batch, slots, n_kv_head, head_dim, dtype, start_B=pad_B)
    logits, cache = model.apply({"params": params}, tokens_BxT, cache=cache)   # prefill (T = prompt length)
    logits, cache = model.apply({"params": params}, next_Bx1, cache=cache)     # one decode step

Layout. ``k``/``v`` are ``[layers, batch, slots, kv_heads, head_dim]``; slot ``s`` holds the token fed at step
``s`` (all rows advance together, so one scalar ``index`` is the slot the next token goes to). Prompts of
different lengths are padded on the **left** to a common length, ``start_B`` being each row's first real slot:
a row's token at slot ``s`` has position ``s - start_B`` (RoPE angle, GPT-2's learned position), and the slots
before ``start_B`` are never attended to. With left padding every row's last prompt token is at the same slot,
so the first sampled token comes from one logits column for the whole batch.

Attention of ``T`` new tokens reads the cache's old keys (slots ``start_B <= s < index``) and the new tokens' own
keys (causal among them) as two parts of one softmax (:func:`attend_cached`); each layer returns only its new
``k``/``v`` and the stack writes all layers' new slots into the cache with one ``dynamic_update_slice`` after the
layer scan (:func:`stack_blocks_cached`). So a decode step never copies a layer's cache: inside a jitted decode
loop that carries the cache (donated), XLA updates the buffer in place, and attention reads each slot once.

Padded query rows (slots before ``start_B``) see no key at all; masked scores are a large finite negative, not
``-inf``, so their softmax is uniform instead of NaN (their outputs are never used). The cache has ``slots``
fixed at creation; writing past it would be clamped by XLA, so :mod:`jzero.generate` sizes it to prompt + new.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jzero.sharding import constrain

#: logical names of the cache arrays: K/V heads split over ``tensor`` like the attention's K/V projections
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "kv")
#: the score of a masked key: finite, so a query with no visible key gets a uniform softmax rather than NaN
MASKED = -1e30


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``slots`` steps, the next slot to write, and each row's first real slot."""

    k_LxBxSxKxH: jax.Array
    v_LxBxSxKxH: jax.Array
    index: jax.Array      # int32 scalar: slot of the next token fed
    start_B: jax.Array    # int32 [B]: left padding of each row (its first real slot)

    @classmethod
    def zeros(cls, n_layer: int, batch: int, slots: int, n_kv_head: int, head_dim: int, dtype: Any,
              start_B=None) -> "KVCache":
        shape = (n_layer, batch, slots, n_kv_head, head_dim)
        start = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start)

    @property
    def slots(self) -> int:
        return self.k_LxBxSxKxH.shape[2]


@flax.struct.dataclass
class DecodeContext:
    """What every layer needs about the new tokens' place in the cache (built once per call by :func:`context`)."""

    positions_BxT: jax.Array      # int32 position of each new token within its row (0 = first real token)
    old_mask_BxS: jax.Array       # bool: cache slots each row may attend to (real and already written)
    new_mask_BxTxT: jax.Array     # bool: new token j visible to new token t (j <= t, and j not padding)


def context(cache: KVCache, T: int) -> DecodeContext:
    """The :class:`DecodeContext` of feeding ``T`` tokens per row at slots ``index .. index + T - 1``."""
    slot_T = cache.index + jnp.arange(T, dtype=jnp.int32)
    start = cache.start_B[:, None]
    positions = jnp.maximum(slot_T[None, :] - start, 0)
    s = jnp.arange(cache.slots, dtype=jnp.int32)[None, :]
    old = (s >= start) & (s < cache.index)
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    new = causal & (slot_T[None, None, :] >= start[:, :, None])
    return DecodeContext(positions, old, new)


def attend_cached(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, k_old_BxSxKxH, v_old_BxSxKxH, ctx: DecodeContext) -> jax.Array:
    """Attention of the new tokens over the cached keys plus their own, one softmax over both, in fp32.

    Grouped-query: query head ``n`` reads K/V head ``n // (N // K)`` (the order of ``jax.nn.dot_product_attention``
    and HF's ``repeat_kv``). Scores and softmax in fp32, the probabilities cast to the values' dtype for the PV
    products (as flash attention does), output in the queries' dtype.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    q = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scale = H ** -0.5
    s_old = jnp.einsum("btkgh,bskh->bkgts", q, k_old_BxSxKxH, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("btkgh,bjkh->bkgtj", q, k_BxTxKxH, preferred_element_type=jnp.float32) * scale
    s_old = jnp.where(ctx.old_mask_BxS[:, None, None, None, :], s_old, MASKED)
    s_new = jnp.where(ctx.new_mask_BxTxT[:, None, None], s_new, MASKED)
    S = s_old.shape[-1]
    p = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)
    p_old, p_new = p[..., :S].astype(v_old_BxSxKxH.dtype), p[..., S:].astype(v_BxTxKxH.dtype)
    o = (jnp.einsum("bkgts,bskh->btkgh", p_old, v_old_BxSxKxH, preferred_element_type=jnp.float32)
         + jnp.einsum("bkgtj,bjkh->btkgh", p_new, v_BxTxKxH, preferred_element_type=jnp.float32))
    return o.reshape(B, T, N, H).astype(q_BxTxNxH.dtype)


def stack_blocks_cached(block_cls, cfg, x_BxTxD, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run the blocks over ``T`` new tokens with the cache; returns the hidden states and the cache advanced by T.

    The same params as :func:`models.layers.stack_blocks` (``blocks`` scanned over a leading 'layers' axis, or
    ``block_{i}``). Each block is called ``block(x, (k_old, v_old), ctx)`` and returns ``(x, (k_new, v_new))``.
    """
    T = x_BxTxD.shape[1]
    ctx = context(cache, T)
    kv = (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH)
    if cfg.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast), length=cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxTxD, (k_new, v_new) = scanned(cfg, name="blocks")(x_BxTxD, kv, ctx)
    else:
        ks, vs = [], []
        for i in range(cfg.n_layer):
            x_BxTxD, (k, v) = block_cls(cfg, name=f"block_{i}")(x_BxTxD, (kv[0][i], kv[1][i]), ctx)
            ks.append(k)
            vs.append(v)
        k_new, v_new = jnp.stack(ks), jnp.stack(vs)
    at = (0, 0, cache.index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache.k_LxBxSxKxH, k_new.astype(cache.k_LxBxSxKxH.dtype), at)
    v = jax.lax.dynamic_update_slice(cache.v_LxBxSxKxH, v_new.astype(cache.v_LxBxSxKxH.dtype), at)
    cache = cache.replace(k_LxBxSxKxH=constrain(k, CACHE_AXES), v_LxBxSxKxH=constrain(v, CACHE_AXES),
                          index=cache.index + T)
    return x_BxTxD, cache
