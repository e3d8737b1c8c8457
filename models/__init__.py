"""Model zoo: presets and a builder from the config's ``model`` section.

Families: ``gpt2`` (learned positions, LayerNorm, GELU, tied head), ``llama`` (RoPE, RMSNorm, SwiGLU, grouped-query
attention, untied head), ``bert`` (bidirectional encoder with a masked-LM, classification or token-classification
head). All name every param with logical axes, so tensor/sequence parallelism and ZeRO come from the rules in
:mod:`jzero.sharding`, and all stack their blocks with ``models.layers.stack_blocks`` (scan, remat, pipeline).

``build_model(cfg.model, vocab_size=..., seq_len=..., dtype=...)`` returns ``(module, model_config)``; explicit
sizes in the config override the preset's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import jax.numpy as jnp

from jzero.errors import ConfigError
from models.bert import Bert, BertConfig
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig

PRESETS: dict[str, dict[str, Any]] = {
    # the embedded default: a small byte-level GPT that trains on 2 CPU cores in minutes
    "gpt2-tiny": dict(n_layer=4, n_head=4, d_model=192, d_ff=768, vocab_size=256, max_len=256),
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, vocab_size=50304, max_len=1024),   # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, d_ff=4096, vocab_size=50304, max_len=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280, d_ff=5120, vocab_size=50304, max_len=1024),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600, d_ff=6400, vocab_size=50304, max_len=1024),      # 1.5B
    # Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention (n_kv_head < n_head), no biases
    "llama-tiny": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=192, d_ff=512, vocab_size=256, max_len=256),
    "llama-1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, vocab_size=128256,   # Llama 3.2 1B
                     max_len=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama-7b": dict(n_layer=32, n_head=32, n_kv_head=32, d_model=4096, d_ff=11008, vocab_size=32000,  # Llama 2 7B
                     max_len=4096, rope_theta=10000.0),
    "llama-8b": dict(n_layer=32, n_head=32, n_kv_head=8, d_model=4096, d_ff=14336, vocab_size=128256,  # Llama 3 8B
                     max_len=8192, rope_theta=500000.0),
    # BERT encoders (vocab padded from 30522 to 30528 so tensor sizes up to 64 divide it); bert-tiny takes the
    # data's vocabulary (train.finetune's byte-level one by default)
    "bert-tiny": dict(n_layer=2, n_head=2, d_model=128, d_ff=512, max_len=128),
    "bert-mini": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024, max_len=512),
    "bert-base": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, vocab_size=30528, max_len=512),    # 110M
    "bert-large": dict(n_layer=24, n_head=16, d_model=1024, d_ff=4096, vocab_size=30528, max_len=512),  # 340M
}

FAMILIES = {"gpt2": (GPT2, GPT2Config), "llama": (Llama, LlamaConfig), "bert": (Bert, BertConfig)}

#: ``model`` keys that only some families have; setting one for another family is an error, not ignored.
FAMILY_KEYS = ("n_kv_head", "rope_theta", "norm_eps", "tie_embeddings", "head", "num_labels")


def model_config(model_cfg, vocab_size: int | None = None, seq_len: int | None = None, dtype=jnp.float32,
                 remat_policy=None, remat: bool = False):
    """Resolve the ``model`` section (+ data's vocab and sequence length) into the family's dataclass."""
    family = model_cfg.family
    if family not in FAMILIES:
        raise ConfigError(f"model.family='{family}' is unknown; choose one of {sorted(FAMILIES)}")
    _, cfg_cls = FAMILIES[family]
    sizes: dict[str, Any] = {}
    if model_cfg.preset is not None:
        if model_cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset='{model_cfg.preset}' is unknown; choose one of {sorted(PRESETS)}")
        if not model_cfg.preset.startswith(family):
            own = sorted(p for p in PRESETS if p.startswith(family))
            raise ConfigError(f"model.preset='{model_cfg.preset}' is not a {family} preset; set model.preset to one "
                              f"of {', '.join(own)} (or model.preset=null and the sizes)")
        sizes.update(PRESETS[model_cfg.preset])
    for key in ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "max_len") + FAMILY_KEYS:
        value = getattr(model_cfg, key)
        if value is not None:
            sizes[key] = value
    fields = set(cfg_cls.__dataclass_fields__)
    for key in FAMILY_KEYS:
        if key in sizes and key not in fields:
            having = [f for f, (_, c) in FAMILIES.items() if key in c.__dataclass_fields__]
            raise ConfigError(f"model.{key} does not apply to model.family='{family}'; remove it "
                              f"(families that have it: {having})")
    if "n_kv_head" in fields and "n_kv_head" not in sizes and "n_head" in sizes:
        sizes["n_kv_head"] = sizes["n_head"]   # plain multi-head attention unless grouped-query is asked for
    if "d_model" in sizes and "d_ff" not in sizes:
        sizes["d_ff"] = 4 * sizes["d_model"]
    if vocab_size is not None:
        if "vocab_size" in sizes and sizes["vocab_size"] < vocab_size:
            raise ConfigError(f"model.vocab_size={sizes['vocab_size']} is smaller than the data's vocabulary "
                              f"({vocab_size}); raise model.vocab_size to at least {vocab_size}")
        sizes.setdefault("vocab_size", vocab_size)
    if seq_len is not None:
        if sizes.get("max_len", seq_len) < seq_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_len={sizes['max_len']}; "
                              f"lower data.seq_len or raise model.max_len")
        sizes.setdefault("max_len", seq_len)
    try:
        cfg = cfg_cls(**sizes, dtype=dtype, attention=model_cfg.attention, scan_layers=model_cfg.scan_layers,
                      remat_policy=remat_policy, remat=remat)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.d_model % cfg.n_head:
        raise ConfigError(f"model.d_model={cfg.d_model} is not divisible by model.n_head={cfg.n_head}")
    return cfg


def build_model(model_cfg, **kwargs):
    """Return ``(flax_module, family_config)``."""
    cfg = model_config(model_cfg, **kwargs)
    module_cls, _ = FAMILIES[model_cfg.family]
    return module_cls(cfg), cfg


__all__ = ["PRESETS", "FAMILIES", "build_model", "model_config", "GPT2", "GPT2Config", "Llama", "LlamaConfig",
           "Bert", "BertConfig", "replace"]
