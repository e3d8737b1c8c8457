"""Llama: the Flax model equals a plain numpy reference of its math (RoPE as complex rotation, RMSNorm, SwiGLU,
grouped-query attention by repeating K/V heads); it is causal; presets have the published parameter counts."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.config import load_config
from jzero.errors import ConfigError
from models import build_model
from models.layers import rope
from models.llama import Llama, LlamaConfig
from helpers import random_params

CFG = LlamaConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_len=16,
                  rope_theta=500.0, norm_eps=1e-5, attention="xla")


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def reference(p, tokens, cfg: LlamaConfig):
    """Llama forward in float64 numpy, written from the equations (not from the module)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens.shape
    N, K, H = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
    angle = np.arange(T)[:, None] / cfg.rope_theta ** (np.arange(0, H, 2) / H)[None, :]   # [T, H/2]

    def rotate(v):   # dims (i, i + H/2) as one complex number, turned by its position's angle
        c = (v[..., : H // 2] + 1j * v[..., H // 2:]) * np.exp(1j * angle)[None, :, None, :]
        return np.concatenate([c.real, c.imag], -1)

    x = p["embed"][tokens]
    causal = np.tril(np.ones((T, T), bool))
    for layer in range(cfg.n_layer):
        b = jax.tree.map(lambda a: a[layer], p["blocks"])
        h = rms(x, b["attn_norm"]["scale"], cfg.norm_eps)
        q = rotate(np.einsum("btd,dnh->btnh", h, b["attn"]["q_kernel"]))
        k = rotate(np.einsum("btd,dnh->btnh", h, b["attn"]["k_kernel"]))
        v = np.einsum("btd,dnh->btnh", h, b["attn"]["v_kernel"])
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)   # query head n reads K/V head n//G
        s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", w, v), b["attn"]["out_kernel"])
        h = rms(x, b["mlp_norm"]["scale"], cfg.norm_eps)
        gate = h @ b["mlp"]["gate_kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b["mlp"]["up_kernel"])) @ b["mlp"]["down_kernel"]
    x = rms(x, p["final_norm"]["scale"], cfg.norm_eps)
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy_reference(tie):
    cfg = LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    model = Llama(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    params = random_params(model, tokens)
    assert ("lm_head" in params) != tie
    got = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    want = reference(params, tokens, cfg)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = Llama(CFG)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 16)).astype(np.int32)
    params = random_params(model, tokens)
    changed = tokens.copy()
    changed[0, 10:] = (changed[0, 10:] + 1) % CFG.vocab_size
    apply = jax.jit(model.apply)
    a, b = (np.asarray(apply({"params": params}, t)) for t in (tokens, changed))
    np.testing.assert_array_equal(a[0, :10], b[0, :10])
    assert np.abs(a[0, 10:] - b[0, 10:]).max() > 1e-3


def test_rope_is_identity_at_position_0_and_keeps_norms():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8, 2, 16)), jnp.float32)
    y = jax.jit(rope, static_argnums=1)(x, 10000.0)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=0, atol=0)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("preset, published", [
    ("llama-7b", 6_738_415_616),    # Llama 2 7B
    ("llama-1b", 1_235_814_400),    # Llama 3.2 1B (tied embeddings)
    ("llama-8b", 8_030_261_248),    # Llama 3 8B
])
def test_presets_have_the_published_parameter_counts(preset, published):
    model, cfg = build_model(load_config(base={}, overrides=["model.family=llama", f"model.preset={preset}"]).model,
                             seq_len=128)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(nn.unbox(shapes))) == cfg.n_params() == published


def test_bad_llama_config_is_one_line_error():
    base = ["model.family=llama", "model.preset=llama-tiny"]
    with pytest.raises(ConfigError, match=r"model\.n_head=4 is not a multiple of model\.n_kv_head=3"):
        build_model(load_config(base={}, overrides=base + ["model.n_kv_head=3"]).model)
    with pytest.raises(ConfigError, match=r"model\.n_kv_head does not apply to model\.family='gpt2'"):
        build_model(load_config(base={}, overrides=["model.preset=gpt2-tiny", "model.n_kv_head=2"]).model)
    with pytest.raises(ConfigError, match="not a llama preset; set model.preset to one of llama-"):
        build_model(load_config(base={}, overrides=["model.family=llama", "model.preset=gpt2-tiny"]).model)
