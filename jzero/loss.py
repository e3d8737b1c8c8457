"""Loss primitives in XLA: fp32 next-token cross-entropy over low-precision logits, read once.

:func:`cross_entropy` is what every LM loss in jzero reduces to (the engine's :func:`jzero.tasks.lm_loss`, and
the XLA side of the fused head kernel, :func:`jzero.kernels.cross_entropy.head_cross_entropy`); this module
imports nothing of jzero, so both can sit above it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32 without ever materialising fp32 logits (or their fp32 gradient).

    Forward: ``logsumexp(upcast(logits)) - logits[label]``, the upcast fused into the reductions. Backward (custom
    VJP): ``(softmax - onehot) * g`` computed in fp32 inside one fusion and written straight in the logits' dtype.
    What the fp32 copies cost on GPT-2 124M: BENCHMARKS.md, "History" and "Where the time goes".
    """
    return _ce_fwd(logits_BxTxV, labels_BxT)[0]


def _lse_combine(a, b):
    """Merge two partial (max, sum of exp(x - max)) pairs; one exp per merge, empty (-inf, 0) pairs stay exact."""
    m1, s1 = a
    m2, s2 = b
    e = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """fp32 logsumexp over the last axis in ONE read of ``x`` (an online-softmax variadic reduction).

    ``jax.nn.logsumexp`` reads its input twice (a max pass, then a sum-of-exp pass); over the bf16 logits of an LM
    head that second read is a whole extra pass over the largest activation (measured: BENCHMARKS.md, "Notes:
    predictions vs measurements", one-pass logsumexp).
    """
    x32 = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x32, jnp.ones_like(x32)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), _lse_combine,
                          (x.ndim - 1,))
    return m + jnp.log(s)


def _ce_fwd(logits, labels):
    if logits.dtype != jnp.float32:
        lse = logsumexp_one_pass(logits)
    else:   # fp32 logits keep jax's two-pass logsumexp (results unchanged)
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse - picked, (logits, labels, lse)


def _ce_bwd(res, g):
    logits, labels, lse = res
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    dlogits = ((probs - onehot) * g[..., None]).astype(logits.dtype)
    return dlogits, None


cross_entropy.defvjp(_ce_fwd, _ce_bwd)
