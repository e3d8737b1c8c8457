"""BERT encoder in Flax Linen with a masked-LM, a sequence-classification or a token-classification head.

Post-LN blocks as in Devlin et al. (attention -> add -> LayerNorm -> GELU MLP -> add -> LayerNorm), learned
positions, bidirectional attention that ignores padded keys (``mask_BxT``: 1 = real token, padding on the right).
Single-segment inputs: there are no token-type embeddings (as RoBERTa). The blocks are scanned by
``stack_blocks`` like the decoders'; the padding mask rides along in the scan carry, unchanged by each block.

Heads (``BertConfig.head``):
  mlm                    logits ``[B, T, vocab]``: dense + GELU + LayerNorm, decoder tied to the word embedding
  classification         logits ``[B, num_labels]`` from the tanh pooler on the first token ([CLS])
  token_classification   logits ``[B, T, num_labels]`` (NER)
Every head shares the encoder's param names, so a fine-tune can start from an MLM checkpoint's encoder.
Tensor parallelism comes from the logical names (heads, MLP hidden, vocabulary over ``tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jzero.sharding import constrain
from models.layers import MLP, RESIDUAL, Attention, LayerNorm, embed_lookup, param, stack_blocks

HEADS = ("mlm", "classification", "token_classification")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30528      # BERT's 30522 padded to a multiple of 64 so tensor=2..64 divides it
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_len: int = 512
    norm_eps: float = 1e-12
    head: str = "mlm"
    num_labels: int = 2
    dtype: Any = jnp.float32
    attention: str = "auto"
    scan_layers: bool = True
    remat_policy: Callable | None = None
    remat: bool = False

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"model.head='{self.head}' is not a BERT head; choose one of {HEADS}")

    def n_params(self, include_pos: bool = True) -> int:
        d, f, L, V = self.d_model, self.d_ff, self.n_layer, self.vocab_size
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        n = V * d + 2 * d + L * block + (self.max_len * d if include_pos else 0)
        if self.head == "mlm":
            return n + d * d + d + 2 * d + V
        if self.head == "classification":
            return n + d * d + d + d * self.num_labels + self.num_labels
        return n + d * self.num_labels + self.num_labels


class BertBlock(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, carry, _=None):
        x_BxTxD, mask_BxT = carry
        cfg = self.cfg
        a = Attention(cfg.n_head, cfg.n_head, cfg.dtype, cfg.attention, 0.02, causal=False, use_bias=True,
                      name="attn")(x_BxTxD, mask_BxT)
        x = LayerNorm(cfg.dtype, cfg.norm_eps, name="attn_norm")(x_BxTxD + constrain(a, RESIDUAL))
        m = MLP(cfg.d_ff, cfg.dtype, 0.02, gelu_approximate=False, name="mlp")(x)
        x = LayerNorm(cfg.dtype, cfg.norm_eps, name="mlp_norm")(x + constrain(m, RESIDUAL))
        return (constrain(x, RESIDUAL), mask_BxT), None


def _dense(mod: nn.Module, name: str, x, d_in: int, d_out: int, names, dtype):
    w = param(mod, f"{name}_kernel", (d_in, d_out), names, nn.initializers.normal(0.02), dtype)
    b = param(mod, f"{name}_bias", (d_out,), names[1:], nn.initializers.zeros, dtype)
    return jnp.einsum("...d,de->...e", x, w) + b


class Bert(nn.Module):
    """``(tokens_BxT int32, mask_BxT int32)`` -> the head's logits in fp32 (see the module docstring)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens_BxT, mask_BxT):
        cfg = self.cfg
        T, d = tokens_BxT.shape[1], cfg.d_model
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={cfg.max_len}; raise model.max_len")
        wte = param(self, "word_embed", (cfg.vocab_size, d), ("vocab", "embed"), nn.initializers.normal(0.02),
                    cfg.dtype)
        wpe = param(self, "pos_embed", (cfg.max_len, d), (None, "embed"), nn.initializers.normal(0.02), cfg.dtype)
        x = embed_lookup(wte, tokens_BxT) + wpe[:T][None]
        x = constrain(LayerNorm(cfg.dtype, cfg.norm_eps, name="embed_norm")(x), RESIDUAL)
        x, _ = stack_blocks(BertBlock, cfg, (x, mask_BxT.astype(jnp.int32)))

        if cfg.head == "mlm":
            h = jax.nn.gelu(_dense(self, "mlm_transform", x, d, d, ("embed", None), cfg.dtype), approximate=False)
            h = LayerNorm(cfg.dtype, cfg.norm_eps, name="mlm_norm")(h)
            bias = param(self, "mlm_bias", (cfg.vocab_size,), ("vocab",), nn.initializers.zeros, jnp.float32)
            logits = jnp.einsum("btd,vd->btv", h, wte, preferred_element_type=jnp.float32) + bias
            return constrain(logits, ("batch", "length", "vocab"))
        if cfg.head == "classification":
            pooled = jnp.tanh(_dense(self, "pooler", x[:, 0], d, d, ("embed", None), cfg.dtype))
            logits = _dense(self, "classifier", pooled, d, cfg.num_labels, ("embed", None), cfg.dtype)
            return constrain(logits.astype(jnp.float32), ("batch", None))
        logits = _dense(self, "classifier", x, d, cfg.num_labels, ("embed", None), cfg.dtype)
        return constrain(logits.astype(jnp.float32), ("batch", "length", None))
