"""models.layers: GPT-2 attention with its k/v biases folded equals the textbook formula with all three biases; the
embedding gradient; unrolled blocks handing their residual add to the next norm (switches on and off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import MultiHeadAttention, embed_lookup


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


def test_embed_lookup_gradient_is_an_fp32_sum_rounded_once():
    """The gather's gradient sums each id's rows in fp32: equal to autodiff's in fp32, and in bf16 it is the exact
    sum rounded once, where autodiff's bf16 scatter-add saturates on a repeated id (4096 x 1.0 stays at 256)."""
    rng = np.random.default_rng(0)
    V, D = 40, 8
    table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=(4, 32)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(4, 32, D)), jnp.float32)
    ref = jax.grad(lambda t: (jnp.take(t, ids, axis=0) * w).sum())(table)
    got = jax.jit(jax.grad(lambda t: (embed_lookup(t, ids) * w).sum()))(table)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert np.array_equal(np.asarray(embed_lookup(table, ids)), np.asarray(table)[np.asarray(ids)])

    same = jnp.zeros((2, 2048), jnp.int32)   # one id 4096 times, each row's cotangent 1.0
    tb = table.astype(jnp.bfloat16)
    got_b = jax.jit(jax.grad(lambda t: embed_lookup(t, same).astype(jnp.float32).sum()))(tb)
    auto_b = jax.jit(jax.grad(lambda t: jnp.take(t, same, axis=0).astype(jnp.float32).sum()))(tb)
    assert got_b.dtype == jnp.bfloat16 and float(got_b[0, 0]) == 4096.0 and float(got_b[1:].max()) == 0.0
    assert float(auto_b[0, 0]) < 4096.0   # the reason for embed_lookup: bf16 accumulation stops growing


def _tiny(family):
    from models.gpt2 import GPT2, GPT2Config
    from models.llama import Llama, LlamaConfig

    if family == "gpt2":
        return GPT2(GPT2Config(vocab_size=64, n_layer=3, n_head=4, d_model=32, d_ff=64, max_len=16,
                               dtype=jnp.bfloat16, attention="xla", scan_layers=False))
    return Llama(LlamaConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_len=16,
                             dtype=jnp.bfloat16, attention="xla", scan_layers=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unrolled_blocks_hand_the_residual_add_to_the_next_norm_kernel(family, monkeypatch):
    """Unrolled blocks return ``Residual(x, mlp_out, proj_bias)`` and the next block's input norm adds it in its
    kernel (``layer_norm.DEFER_RESIDUAL``); that norm gives q, k and v their own outputs, whose gradients its
    backward kernel sums (``MULTI_DY``). Loss and every gradient equal the switches-off model (each block adds
    its own residual, XLA sums the q/k/v gradients) to bf16 rounding, and the kernel calls are the ones meant:
    per block one ln_1 with the previous block's output (none for the first), the final norm too."""
    import models.layers as L
    from jzero.kernels import layer_norm as kln

    monkeypatch.setenv("JZERO_KERNELS", "1")   # the Pallas kernels in interpret mode
    model = _tiny(family)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
    params = model.init(jax.random.PRNGKey(1), tokens)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def loss(p):
        logits = model.apply(p, tokens).astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    calls = []
    real = kln.residual_norm

    def counted(x, r, scale, bias, rbias, eps, out_dtype, names, rms, n_y=1):
        calls.append((r is not None, rbias is not None, n_y))
        return real(x, r, scale, bias, rbias, eps, out_dtype, names, rms, n_y)

    monkeypatch.setattr(kln, "residual_norm", counted)
    got = {}
    for on in (1, 0, -1):   # -1: the defaults (on for Llama's RMSNorm blocks, off for GPT-2's LayerNorm ones)
        monkeypatch.setattr(kln, "DEFER_RESIDUAL", on)
        monkeypatch.setattr(kln, "MULTI_DY", on)
        calls.clear()
        if on >= 0:
            got[on] = jax.value_and_grad(loss)(params)
        else:   # which kernel calls the defaults make: tracing is enough
            jax.eval_shape(jax.value_and_grad(loss), params)
        got[on, "calls"] = list(calls)
    bias = family == "gpt2"
    n = 3   # layers
    first, later = (False, False, 3), (True, bias, 3)
    sub = (True, bias, 1)   # ln_2 / mlp_norm (GPT-2's attention out bias inside ln_2's kernel)
    assert got[1, "calls"] == [first, sub] + [later, sub] * (n - 1) + [(True, bias, 1)], got[1, "calls"]
    assert got[0, "calls"] == [(False, False, 1), sub] * n, got[0, "calls"]
    assert got[-1, "calls"] == got[1 if family == "llama" else 0, "calls"]
    assert isinstance(L.block_input(L.Residual(tokens)), tuple)
    (l1, g1), (l0, g0) = got[1], got[0]
    assert abs(float(l1) - float(l0)) < 1e-2 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6


def test_unrolled_model_starts_from_the_scanned_models_weights():
    """Same seed, model.scan_layers flipped: block_<i> holds layer i of the scanned stack (flax's path-derived keys
    alone would draw other weights)."""
    import flax.linen as nn

    from models import GPT2, GPT2Config, replace
    from models.layers import init_as_scanned

    c = GPT2Config(n_layer=2, n_head=2, d_model=16, d_ff=32, vocab_size=32, max_len=8, attention="xla")
    ids = jnp.arange(8, dtype=jnp.int32)[None] % 32
    scanned, unrolled = GPT2(c), GPT2(replace(c, scan_layers=False))
    key = jax.random.key(3)
    ps = jax.jit(lambda k: init_as_scanned(scanned, k, ids)["params"])(key)
    pu = jax.jit(lambda k: init_as_scanned(unrolled, k, ids)["params"])(key)
    assert set(pu) == set(ps) - {"blocks"} | {"block_0", "block_1"}
    for i in range(2):
        jax.tree.map(lambda s, u, i=i: np.testing.assert_array_equal(s[i], u), ps["blocks"], pu[f"block_{i}"])
    plain = jax.jit(lambda k: nn.unbox(unrolled.init(k, ids))["params"])(key)   # what flax alone draws: other weights
    assert not np.array_equal(plain["block_0"]["mlp"]["fc_kernel"], pu["block_0"]["mlp"]["fc_kernel"])
