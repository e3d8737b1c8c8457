"""Picking the next token from logits: greedy, temperature, top-k, top-p (nucleus); pure, jittable.

    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95)
    next_B = sample(logits_BxV, key, cfg.mode, cfg.temperature, cfg.top_p)

The order is Hugging Face's logits processors' (temperature, then top-k, then top-p), so a seeded jzero run and
an HF run keep the same candidate set for the same logits. ``temperature=0`` is greedy (argmax; ties to the
lowest id, as ``torch.argmax``), and then top-k/top-p do not apply (asking for them is an error, not ignored).
Top-p keeps the smallest set of most probable tokens whose probabilities sum to at least ``top_p`` (the most
probable token always stays).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jzero.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature} is negative; use 0 (greedy) or a positive value")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is negative; use 0 (off) or a positive count")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is outside (0, 1]; use 1 (off) or a probability mass in (0, 1)")
        if self.greedy and (self.top_k or self.top_p < 1):
            raise ConfigError(f"top_k={self.top_k} / top_p={self.top_p} need sampling: greedy decoding "
                              f"(temperature=0) always takes the most probable token; set temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def mode(self) -> tuple[bool, int, bool]:
        """What shapes the sampling program: ``(greedy, top_k, nucleus)``; temperature and top-p are traced
        values (:func:`sample`), so changing them does not recompile."""
        return self.greedy, self.top_k, self.top_p < 1


def filter_logits(logits_BxV: jax.Array, temperature, top_k: int = 0, top_p=None) -> jax.Array:
    """fp32 logits divided by ``temperature``, tokens outside top-k (static) / top-p (None: off) set to ``-inf``."""
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
    if top_p is not None:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p                          # the smallest prefix reaching top_p; always >= 1 token
        n_keep_Bx1 = keep.sum(-1, keepdims=True)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
        logits = jnp.where(logits < cutoff_Bx1, -jnp.inf, logits)
    return logits


def sample(logits_BxV: jax.Array, key: jax.Array, mode: tuple[bool, int, bool], temperature=1.0,
           top_p=1.0) -> jax.Array:
    """Next token of each row (int32 ``[B]``); ``mode`` is :attr:`SamplingConfig.mode` (static), ``temperature``
    and ``top_p`` may be traced scalars."""
    greedy, top_k, nucleus = mode
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BxV, temperature, top_k, top_p if nucleus else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a 64-bit ``seed`` (``-2**63 .. 2**64 - 1``). ``jax.random.PRNGKey`` keeps only the low 32
    bits without x64 (seeds 0 and 2**32 gave the same tokens, -1 and 2**32 - 1 too); the high 32 bits of the seed
    as an unsigned 64-bit number are folded in when not zero, so a seed below 2**32 keeps ``PRNGKey(seed)``."""
    seed = int(seed)
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ConfigError(f"seed={seed}: give an integer that fits in 64 bits")
    seed %= 2 ** 64
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, seed >> 32) if seed >> 32 else key
