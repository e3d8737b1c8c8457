"""BERT: every head equals a plain numpy reference of post-LN BERT with a key padding mask; padding never changes
the outputs at real tokens; the encoder tasks' losses and MLM corruption do what they say."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.config import load_config
from jzero.errors import ConfigError
from jzero.tasks import IGNORE, masked_cross_entropy, mlm_corrupt
from models import build_model
from models.bert import Bert, BertConfig
from helpers import random_params

CFG = dict(vocab_size=64, n_layer=2, n_head=4, d_model=32, d_ff=48, max_len=16, norm_eps=1e-12, num_labels=5,
           attention="xla")
erf = np.vectorize(math.erf)




def ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def reference(p, tokens, mask, cfg: BertConfig):
    """Post-LN BERT in float64 numpy from the equations; padded keys get no attention weight."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens.shape
    N, H = cfg.n_head, cfg.d_model // cfg.n_head
    x = ln(p["word_embed"][tokens] + p["pos_embed"][:T], p["embed_norm"], cfg.norm_eps)
    for layer in range(cfg.n_layer):
        b = jax.tree.map(lambda a: a[layer], p["blocks"])
        a = b["attn"]
        q, k, v = (np.einsum("btd,dnh->btnh", x, a[f"{n}_kernel"]) + a[f"{n}_bias"] for n in "qkv")
        s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
        s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", w, v), a["out_kernel"]) + a["out_bias"]
        x = ln(x + o, b["attn_norm"], cfg.norm_eps)
        m = b["mlp"]
        f = gelu(x @ m["fc_kernel"] + m["fc_bias"]) @ m["proj_kernel"] + m["proj_bias"]
        x = ln(x + f, b["mlp_norm"], cfg.norm_eps)
    if cfg.head == "mlm":
        h = ln(gelu(x @ p["mlm_transform_kernel"] + p["mlm_transform_bias"]), p["mlm_norm"], cfg.norm_eps)
        return h @ p["word_embed"].T + p["mlm_bias"]
    if cfg.head == "classification":
        pooled = np.tanh(x[:, 0] @ p["pooler_kernel"] + p["pooler_bias"])
        return pooled @ p["classifier_kernel"] + p["classifier_bias"]
    return x @ p["classifier_kernel"] + p["classifier_bias"]


def inputs(seed=1, B=3, T=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG["vocab_size"], (B, T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array([[T], [9], [4]])[:B]).astype(np.int32)   # right padding
    return tokens, mask


@pytest.mark.parametrize("head", ["mlm", "classification", "token_classification"])
def test_heads_match_numpy_reference_and_ignore_padding(head):
    cfg = BertConfig(**CFG, head=head)
    model = Bert(cfg)
    tokens, mask = inputs()
    params = random_params(model, tokens, mask)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.n_params()
    apply = jax.jit(model.apply)
    got = np.asarray(apply({"params": params}, tokens, mask))
    want = reference(params, tokens, mask, cfg)
    assert got.shape == want.shape == {"mlm": (3, 16, 64), "classification": (3, 5),
                                       "token_classification": (3, 16, 5)}[head]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # other tokens in the padding change nothing at the real positions (nor the [CLS]-pooled class)
    noisy = np.where(mask > 0, tokens, (tokens + 7) % CFG["vocab_size"])
    again = np.asarray(apply({"params": params}, noisy, mask))
    real = mask > 0 if got.ndim == 3 else np.ones(got.shape[0], bool)
    np.testing.assert_allclose(again[real], got[real], rtol=1e-5, atol=1e-5)
    assert not np.allclose(again, got) or head == "classification"


def test_masked_cross_entropy_averages_over_labelled_positions_only():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
    labels = jnp.array([[1, IGNORE, 3], [IGNORE, IGNORE, 0]])
    logp = jax.nn.log_softmax(logits)
    want = -(logp[0, 0, 1] + logp[0, 2, 3] + logp[1, 2, 0]) / 3
    ce = jax.jit(masked_cross_entropy)
    assert float(ce(logits, labels)) == pytest.approx(float(want), rel=1e-6)
    assert float(ce(logits, jnp.full((2, 3), IGNORE))) == 0.0


def test_mlm_corrupt_is_berts_80_10_10_on_real_non_special_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 100, (64, 128)).astype(np.int32)
    tokens[:, 0] = 1                                                   # a special ([CLS]) never picked
    mask = (np.arange(128)[None] < 100).astype(np.int32).repeat(64, 0)
    out = mlm_corrupt(tokens, mask, np.random.default_rng(1), mask_id=3, vocab_size=100, special_ids=(0, 1, 2, 3))
    picked = out["labels"] != IGNORE
    assert not picked[:, 0].any() and not picked[:, 100:].any()
    np.testing.assert_array_equal(out["labels"][picked], tokens[picked])
    np.testing.assert_array_equal(out["tokens"][~picked], tokens[~picked])
    rate = picked.sum() / (64 * 99)
    masked = (out["tokens"][picked] == 3).mean()
    kept = (out["tokens"][picked] == tokens[picked]).mean()
    assert abs(rate - 0.15) < 0.01 and abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03, (rate, masked, kept)


def test_bert_config_errors():
    with pytest.raises(ConfigError, match=r"model\.head does not apply to model\.family='llama'"):
        build_model(load_config(base={}, overrides=["model.family=llama", "model.head=mlm"]).model)
    with pytest.raises(ConfigError, match="model.head"):
        load_config(base={}, overrides=["model.family=bert", "model.head=regression"])
    _, cfg = build_model(load_config(base={}, overrides=["model.family=bert", "model.preset=bert-base"]).model)
    assert cfg.vocab_size % 64 == 0 and cfg.head == "mlm"
