"""models.norms: the residual form of LayerNorm/RMSNorm equals the add then the norm (XLA, unfused and fused
kernels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.parametrize("norm_cls", ["LayerNorm", "RMSNorm"])
def test_norm_with_the_residual_stream_equals_add_then_norm(norm_cls, monkeypatch):
    """``norm(x, delta) == (x + delta, norm(x + delta))`` and ``norm(x, with_sum=True) == (x, norm(x))``, values and
    gradients: the XLA formula (bit for bit), the unfused kernels (``JZERO_KERNELS`` without residual_norm: the
    same XLA add), and the fused kernel (residual_norm, interpret mode: to bf16 rounding)."""
    import models.norms as L

    mod = getattr(L, norm_cls)(jnp.bfloat16)
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    x = (jax.random.normal(k[0], (2, 5, 48)) + 0.2).astype(jnp.bfloat16)
    delta = jax.random.normal(k[1], (2, 5, 48)).astype(jnp.bfloat16)
    params = mod.init(k[2], x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k[3], p.shape), params)
    cts = tuple(jax.random.normal(kk, x.shape).astype(jnp.bfloat16) for kk in jax.random.split(k[4], 2))

    def fused(p, x, delta):
        return mod.apply(p, x, delta) if delta is not None else mod.apply(p, x, with_sum=True)

    def unfused(p, x, delta):
        s = x if delta is None else x + delta
        return s, mod.apply(p, s)

    def vjp(f, delta):
        out, pull = jax.vjp(lambda p, x, d: f(p, x, d), params, x, delta)
        return out, pull(cts)

    for flag, exact in (("0", True), ("layer_norm,rms_norm", True), ("1", False)):
        monkeypatch.setenv("JZERO_KERNELS", flag)
        for d in (delta, None):
            got, want = vjp(fused, d), vjp(unfused, d)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                if exact:
                    assert np.array_equal(a, b), (flag, d is None)
                else:
                    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), (flag, d is None)
