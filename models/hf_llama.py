"""Hugging Face Llama <-> jzero Llama weights, from a local ``config.json`` + safetensors (one file or sharded).

    params, cfg = load_hf_llama("llama_dir")                      # model.safetensors or model.safetensors.index.json
    logits = Llama(cfg).apply({"params": params}, tokens)         # == transformers' LlamaForCausalLM logits
    save_hf_llama(params, cfg, "out_dir", vocab_size=100)         # loadable by LlamaForCausalLM.from_pretrained

The same function, other layouts:

- torch ``Linear`` stores ``[out, in]``; jzero's kernels are ``[in, out]`` with the heads split out:
  ``q_proj [N*H, D]`` -> ``q_kernel [D, N, H]``, ``k_proj``/``v_proj [K*H, D]`` -> ``[D, K, H]``,
  ``o_proj [D, N*H]`` -> ``out_kernel [N, H, D]``, ``gate/up_proj [F, D]`` -> ``[D, F]``, ``down_proj [D, F]`` ->
  ``[F, D]``, ``lm_head [V, D]`` -> ``lm_head [D, V]`` (absent when ``tie_word_embeddings``: jzero's
  ``tie_embeddings`` uses ``embed``).
- HF's RoPE is the half-split ``rotate_half`` layout, jzero's too (:func:`models.layers.rope`); query head ``n``
  reads K/V head ``n // (N // K)`` in both (HF ``repeat_kv``).
- RMSNorm weights are jzero's ``attn_norm`` / ``mlp_norm`` / ``final_norm`` scales; ``rms_norm_eps`` is
  ``norm_eps``.
- Layers are stacked on a leading axis (``blocks/...``) or named ``block_{i}`` with ``scan_layers=False``.
- jzero's vocabulary may be padded (tensor parallel sizes then divide it): padded rows are zero on import and
  dropped on export (``vocab_size``). Export is the exact inverse of import (HF -> jzero -> HF gives the same
  tensors, bit for bit).

RoPE: plain (``rope_type`` default) or Llama 3.1/3.2's ``llama3`` frequency scaling (``LlamaConfig.rope_scaling``).
Configs that change the function otherwise (other RoPE scalings, biases, another activation or head size) are
refused with a :class:`ConfigError` naming the key, never converted approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jzero.errors import CheckpointError, ConfigError
from models.hf_files import CONFIG_NAME, read_state
from models.hf_gpt2 import _tree_np, layer_of
from models.llama import LlamaConfig


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """``(rope_theta, rope_scaling)`` from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    rope = dict(hf.get("rope_parameters") or {})
    rope = {**(hf.get("rope_scaling") or {}), **rope}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind in ("default", None):
        return theta, None
    if kind == "llama3":
        try:
            return theta, (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                           float(rope["original_max_position_embeddings"]))
        except KeyError as exc:
            raise ConfigError(f"HF Llama config rope type 'llama3' lacks {exc}; it needs factor, low_freq_factor, "
                              f"high_freq_factor, original_max_position_embeddings") from None
    raise ConfigError(f"HF Llama config rope type {kind!r} (rope_parameters/rope_scaling) is not supported by "
                      f"jzero's Llama, which computes plain RoPE and Llama 3.1's 'llama3'; use one of those")


def llama_config_from_hf(hf: dict, vocab_size: int | None = None, max_len: int | None = None, **kw) -> LlamaConfig:
    """jzero's LlamaConfig for an HF Llama ``config.json`` dict (``vocab_size`` >= HF's pads the vocabulary)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"HF config model_type={hf.get('model_type')!r} is not 'llama'")
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    checks = [("hidden_act", hf.get("hidden_act", "silu"), "silu"),
              ("attention_bias", bool(hf.get("attention_bias", False)), False),
              ("mlp_bias", bool(hf.get("mlp_bias", False)), False),
              ("head_dim", int(hf.get("head_dim") or d // n), d // n),
              ("pretraining_tp", int(hf.get("pretraining_tp", 1)), 1)]
    for key, value, want in checks:
        if value != want:
            raise ConfigError(f"HF Llama config {key}={value!r} is not supported by jzero's Llama (it computes "
                              f"{key}={want!r}); convert a model with {key}={want!r}")
    v = int(hf["vocab_size"])
    if vocab_size is not None and vocab_size < v:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the HF model's vocab_size={v}; use >= {v}")
    n_pos = int(hf.get("max_position_embeddings", 4096))
    theta, scaling = _rope(hf)
    try:
        return LlamaConfig(vocab_size=vocab_size or v, n_layer=int(hf["num_hidden_layers"]), n_head=n,
                           n_kv_head=int(hf.get("num_key_value_heads") or n), d_model=d,
                           d_ff=int(hf["intermediate_size"]), max_len=max_len or n_pos, rope_theta=theta,
                           rope_scaling=scaling,
                           norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **kw)
    except ValueError as exc:
        raise ConfigError(f"HF Llama config: {exc}") from None


def params_from_hf(state: dict, cfg: LlamaConfig) -> dict:
    """jzero Llama params (fp32 numpy, ``cfg``'s layout) from an HF Llama state dict (``model.*`` names)."""
    sd = {k.removeprefix("model."): v for k, v in state.items()}
    used: set[str] = set()
    d, N, K, f = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff
    H = d // N

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in sd:
            raise CheckpointError(f"HF Llama weights lack '{name}' (have {len(sd)} tensors); is this a Llama "
                                  f"checkpoint with num_hidden_layers={cfg.n_layer}?")
        used.add(name)
        x = np.asarray(sd[name], np.float32)
        if x.shape != shape:
            raise CheckpointError(f"HF tensor '{name}' has shape {list(x.shape)}, the config.json says "
                                  f"{list(shape)}; the config does not match the weights")
        return x

    def layer(i: int) -> dict:
        p = f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        return {
            "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
            "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
            "attn": {"q_kernel": take(a + "q_proj.weight", (N * H, d)).T.reshape(d, N, H),
                     "k_kernel": take(a + "k_proj.weight", (K * H, d)).T.reshape(d, K, H),
                     "v_kernel": take(a + "v_proj.weight", (K * H, d)).T.reshape(d, K, H),
                     "out_kernel": take(a + "o_proj.weight", (d, N * H)).T.reshape(N, H, d)},
            "mlp": {"gate_kernel": take(m + "gate_proj.weight", (f, d)).T,
                    "up_kernel": take(m + "up_proj.weight", (f, d)).T,
                    "down_kernel": take(m + "down_proj.weight", (d, f)).T},
        }

    v_hf = np.shape(sd["embed_tokens.weight"])[0] if "embed_tokens.weight" in sd else 0
    embed = take("embed_tokens.weight", (v_hf, d))
    if v_hf > cfg.vocab_size:
        raise CheckpointError(f"HF embed_tokens.weight has {v_hf} rows; jzero's Llama has vocab_size={cfg.vocab_size}")
    pad = np.zeros((cfg.vocab_size - v_hf, d), np.float32)
    params = {"embed": np.concatenate([embed, pad]), "final_norm": {"scale": take("norm.weight", (d,))}}
    if cfg.tie_embeddings:
        if "lm_head.weight" in sd:
            used.add("lm_head.weight")
            if not np.array_equal(np.asarray(sd["lm_head.weight"]), np.asarray(sd["embed_tokens.weight"])):
                raise CheckpointError("HF lm_head.weight differs from embed_tokens.weight but the config sets "
                                      "tie_word_embeddings=true; the config does not match the weights")
    else:
        head = take("lm_head.weight", (v_hf, d))
        params["lm_head"] = np.concatenate([head, pad]).T.copy()
    layers = [layer(i) for i in range(cfg.n_layer)]
    extra = sorted(k for k in set(sd) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"HF Llama weights hold {len(extra)} tensors jzero's Llama has no place for (e.g. "
                              f"'{extra[0]}'); the config.json num_hidden_layers={cfg.n_layer} may be wrong")
    if cfg.scan_layers:
        import jax

        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"block_{i}": lay for i, lay in enumerate(layers)})
    return params


def load_hf_llama(path, vocab_size: int | None = None, max_len: int | None = None,
                  **cfg_kw) -> tuple[dict, LlamaConfig]:
    """``(params, LlamaConfig)`` from a local HF Llama directory."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path / CONFIG_NAME} not found; pass a local Hugging Face Llama directory")
    try:
        hf = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    cfg = llama_config_from_hf(hf, vocab_size, max_len, **cfg_kw)
    return params_from_hf(read_state(path), cfg), cfg


# --------------------------------------------------------------------------- export


def hf_config_from_llama(cfg: LlamaConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for jzero's Llama (``vocab_size`` < cfg's drops padded rows).

    RoPE is written both as transformers 5's ``rope_parameters`` and as the older ``rope_theta`` /
    ``rope_scaling`` keys, so either version reads the same frequencies. ``bos_token_id`` / ``eos_token_id`` are
    null: jzero does not know the tokenizer's, and transformers' defaults (1, 2) would make ``generate`` stop at
    token 2, an ordinary token of a byte-level or other vocabulary."""
    theta = float(cfg.rope_theta)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = None
    if cfg.rope_scaling is not None:
        factor, low, high, original = (float(v) for v in cfg.rope_scaling)
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": int(original)}
        rope = {**scaling, "rope_theta": theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab_size or cfg.vocab_size), "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_model // cfg.n_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": float(cfg.norm_eps),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
        "pretraining_tp": 1, "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": None,
        "eos_token_id": None,
        "rope_parameters": rope, "rope_theta": theta, "rope_scaling": scaling, "torch_dtype": "float32",
    }


def params_to_hf(params: dict, cfg: LlamaConfig, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """HF Llama state dict (``model.*`` names, torch ``Linear`` ``[out, in]`` layout, fp32) from jzero Llama
    params (stacked or ``block_{i}``): the inverse of :func:`params_from_hf`."""
    v = int(vocab_size or cfg.vocab_size)
    if v > cfg.vocab_size:
        raise ConfigError(f"vocab_size={v} exceeds the model's vocab_size={cfg.vocab_size}")
    p = _tree_np(params)
    d, N, K, H = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
    out = {"model.embed_tokens.weight": p["embed"][:v], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(cfg.n_layer):
        lay = layer_of(p["blocks"], i) if cfg.scan_layers else p[f"block_{i}"]
        pre, a, m = f"model.layers.{i}.", lay["attn"], lay["mlp"]
        out |= {pre + "input_layernorm.weight": lay["attn_norm"]["scale"],
                pre + "post_attention_layernorm.weight": lay["mlp_norm"]["scale"],
                pre + "self_attn.q_proj.weight": a["q_kernel"].reshape(d, N * H).T,
                pre + "self_attn.k_proj.weight": a["k_kernel"].reshape(d, K * H).T,
                pre + "self_attn.v_proj.weight": a["v_kernel"].reshape(d, K * H).T,
                pre + "self_attn.o_proj.weight": a["out_kernel"].reshape(N * H, d).T,
                pre + "mlp.gate_proj.weight": m["gate_kernel"].T, pre + "mlp.up_proj.weight": m["up_kernel"].T,
                pre + "mlp.down_proj.weight": m["down_kernel"].T}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"][:, :v].T
    return {k: np.ascontiguousarray(x, np.float32) for k, x in out.items()}


def save_hf_llama(params: dict, cfg: LlamaConfig, path, vocab_size: int | None = None, dtype: str = "fp32") -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``LlamaForCausalLM.from_pretrained(path)`` loads."""
    from models.hf_files import write_hf_dir

    return write_hf_dir(path, params_to_hf(params, cfg, vocab_size), hf_config_from_llama(cfg, vocab_size), dtype)
