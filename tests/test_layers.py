"""models.layers: GPT-2 attention with its k/v biases folded equals the textbook formula with all three biases."""

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import MultiHeadAttention


def _reference(p, x):
    """Causal attention with q, k and v biases all added, in float64 NumPy."""
    w, b = np.asarray(p["qkv_kernel"], np.float64), np.asarray(p["qkv_bias"], np.float64)
    wo, bo = np.asarray(p["out_kernel"], np.float64), np.asarray(p["out_bias"], np.float64)
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dnh->btnh", x, w[:, i]) + b[i] for i in range(3))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    T = x.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", a, v)
    return np.einsum("btnh,nhd->btd", o, wo) + bo


def test_folded_biases_equal_the_full_formula_and_k_bias_gets_no_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
    m = MultiHeadAttention(4, jnp.float32, "xla", 0.02)
    params = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.PRNGKey(2), t.shape),
                          m.init(jax.random.PRNGKey(1), x))   # non-zero biases
    p = {k: getattr(v, "value", v) for k, v in params["params"].items()}
    y = m.apply(params, x)
    np.testing.assert_allclose(np.asarray(y), _reference(p, x), rtol=2e-5, atol=2e-5)

    g = jax.grad(lambda prm: jnp.sum(m.apply(prm, x) ** 2))(params)["params"]["qkv_bias"]
    g = np.asarray(getattr(g, "value", g))
    assert np.all(g[1] == 0.0)   # softmax is unchanged by k's bias: exactly no gradient
    assert np.abs(g[0]).max() > 0 and np.abs(g[2]).max() > 0
