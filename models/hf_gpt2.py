"""Hugging Face GPT-2 <-> jzero GPT-2 weights, from and to a local ``model.safetensors`` + ``config.json``.

    params, cfg = load_hf_gpt2("gpt2_dir", vocab_size=50304)    # pad the vocabulary for tensor parallelism
    logits = GPT2(cfg).apply({"params": params}, tokens)          # == transformers' GPT2LMHeadModel logits[..., :50257]
    save_hf_gpt2(params, cfg, "out_dir", vocab_size=50257)       # loadable by GPT2LMHeadModel.from_pretrained

The two models compute the same function; only the layout of the weights differs:

- HF's ``Conv1D`` stores weights ``[in, out]`` (as jzero's kernels do, no transpose). ``attn.c_attn`` packs
  q, k, v along ``out`` as ``[d, 3 * n_head * head_dim]``, each head-major: exactly jzero's
  ``qkv_kernel [d, 3, n_head, head_dim]`` reshaped. ``attn.c_proj`` ``[n_head * head_dim, d]`` is jzero's
  ``out_kernel [n_head, head_dim, d]``.
- jzero stacks the layers on a leading axis (``blocks/...`` with ``[n_layer, ...]``, from ``nn.scan``); HF names
  them ``h.{i}``. With ``scan_layers=False`` jzero names them ``block_{i}``.
- LayerNorm weight/bias are jzero's scale/bias (eps 1e-5 both); ``gelu_new`` is GELU's tanh approximation, which
  jzero's MLP uses; the LM head is tied to ``wte`` in both.
- jzero's vocabulary may be padded (50257 -> 50304 so tensor parallel sizes divide it): padded rows are zero on
  import and dropped on export.

HF configs that change the function (another activation or epsilon, untied head, layer-wise attention scaling)
are refused with a :class:`ConfigError` naming the key, never converted approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jzero.errors import CheckpointError, ConfigError
from models.gpt2 import GPT2Config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal-mask buffers some older GPT-2 files carry


def check_hf_config(hf: dict) -> None:
    """Refuse GPT-2 variants jzero's GPT-2 does not compute."""
    checks = [
        ("model_type", hf.get("model_type", "gpt2"), lambda v: v == "gpt2", "gpt2"),
        ("activation_function", hf.get("activation_function", "gelu_new"), lambda v: v in TANH_GELUS, "gelu_new"),
        ("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5), lambda v: abs(v - 1e-5) < 1e-12, 1e-5),
        ("scale_attn_weights", hf.get("scale_attn_weights", True), lambda v: v is True, True),
        ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False),
         lambda v: v is False, False),
        ("reorder_and_upcast_attn", hf.get("reorder_and_upcast_attn", False), lambda v: v is False, False),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True), lambda v: v is True, True),
        ("add_cross_attention", hf.get("add_cross_attention", False), lambda v: v is False, False),
    ]
    for key, value, ok, want in checks:
        if not ok(value):
            raise ConfigError(f"HF GPT-2 config {key}={value!r} is not supported by jzero's GPT-2 (it computes {key}="
                              f"{want!r}); convert a model with {key}={want!r}")


def gpt2_config_from_hf(hf: dict, vocab_size: int | None = None, max_len: int | None = None, **kw) -> GPT2Config:
    """jzero's GPT2Config for an HF GPT-2 ``config.json`` dict (``vocab_size`` >= HF's pads the vocabulary)."""
    check_hf_config(hf)
    d, n_pos = int(hf["n_embd"]), int(hf.get("n_positions", hf.get("n_ctx", 1024)))
    v = int(hf["vocab_size"])
    if vocab_size is not None and vocab_size < v:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the HF model's vocab_size={v}; use >= {v}")
    if max_len is not None and max_len > n_pos:
        raise ConfigError(f"max_len={max_len} exceeds the HF model's n_positions={n_pos}; use <= {n_pos}")
    return GPT2Config(vocab_size=vocab_size or v, n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), d_model=d,
                      d_ff=int(hf.get("n_inner") or 4 * d), max_len=max_len or n_pos, **kw)


def hf_config_from_gpt2(cfg: GPT2Config, vocab_size: int | None = None) -> dict:
    """An HF ``config.json`` dict for jzero's GPT-2 (``vocab_size`` < cfg's drops padded rows)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": int(vocab_size or cfg.vocab_size), "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- the mapping


def _block_names(i: int) -> dict[str, str]:
    """HF name of each of layer i's tensors, by jzero's ``module/param`` path inside a block."""
    h = f"h.{i}."
    return {"ln_1/scale": h + "ln_1.weight", "ln_1/bias": h + "ln_1.bias",
            "attn/qkv_kernel": h + "attn.c_attn.weight", "attn/qkv_bias": h + "attn.c_attn.bias",
            "attn/out_kernel": h + "attn.c_proj.weight", "attn/out_bias": h + "attn.c_proj.bias",
            "ln_2/scale": h + "ln_2.weight", "ln_2/bias": h + "ln_2.bias",
            "mlp/fc_kernel": h + "mlp.c_fc.weight", "mlp/fc_bias": h + "mlp.c_fc.bias",
            "mlp/proj_kernel": h + "mlp.c_proj.weight", "mlp/proj_bias": h + "mlp.c_proj.bias"}


def _jzero_shape(path: str, cfg: GPT2Config) -> tuple[int, ...]:
    n, d, f = cfg.n_head, cfg.d_model, cfg.d_ff
    hd = d // n
    return {"ln_1/scale": (d,), "ln_1/bias": (d,), "ln_2/scale": (d,), "ln_2/bias": (d,),
            "attn/qkv_kernel": (d, 3, n, hd), "attn/qkv_bias": (3, n, hd), "attn/out_kernel": (n, hd, d),
            "attn/out_bias": (d,), "mlp/fc_kernel": (d, f), "mlp/fc_bias": (f,), "mlp/proj_kernel": (f, d),
            "mlp/proj_bias": (d,)}[path]


def _strip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the ``transformer.`` prefix (GPT2LMHeadModel files) and mask buffers (older files)."""
    out = {}
    for k, v in state.items():
        if any(k.endswith(b) for b in BUFFERS):
            continue
        out[k.removeprefix("transformer.")] = v
    return out


def params_from_hf(state: dict[str, Any], cfg: GPT2Config) -> dict:
    """jzero GPT-2 params (fp32 numpy, ``cfg``'s layout: stacked or per-layer) from an HF GPT-2 state dict."""
    sd = {k: np.asarray(v, np.float32) for k, v in _strip(state).items()}
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in sd:
            raise CheckpointError(f"HF GPT-2 weights lack '{name}' (have {len(sd)} tensors, e.g. {sorted(sd)[:3]}); "
                                  f"is this a GPT-2 model.safetensors with config n_layer={cfg.n_layer}?")
        used.add(name)
        x = sd[name]
        if shape is not None:
            if x.size != int(np.prod(shape)):
                raise CheckpointError(f"HF tensor '{name}' has shape {list(x.shape)}, which cannot hold jzero's "
                                      f"{list(shape)}; the config.json does not match the weights")
            x = x.reshape(shape)
        return x

    wte = take("wte.weight")
    v_hf, d = wte.shape
    if d != cfg.d_model or v_hf > cfg.vocab_size:
        raise CheckpointError(f"HF wte.weight is {list(wte.shape)} but jzero's GPT-2 has d_model={cfg.d_model}, "
                              f"vocab_size={cfg.vocab_size}; use vocab_size >= {v_hf} and the HF n_embd")
    wte = np.concatenate([wte, np.zeros((cfg.vocab_size - v_hf, d), np.float32)])
    wpe = take("wpe.weight")
    if wpe.shape[0] < cfg.max_len:
        raise CheckpointError(f"HF wpe.weight has {wpe.shape[0]} positions, fewer than max_len={cfg.max_len}")
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if not np.array_equal(sd["lm_head.weight"], sd["wte.weight"]):
            raise CheckpointError("HF lm_head.weight differs from wte.weight (an untied head); jzero's GPT-2 ties them")
    layers = [{p: take(hf, _jzero_shape(p, cfg)) for p, hf in _block_names(i).items()} for i in range(cfg.n_layer)]
    extra = sorted(set(sd) - used - {f"ln_f.{s}" for s in ("weight", "bias")})
    if extra:
        raise CheckpointError(f"HF GPT-2 weights hold {len(extra)} tensors jzero's GPT-2 has no place for "
                              f"(e.g. '{extra[0]}'); the config.json n_layer={cfg.n_layer} may be wrong")
    params = {"wte": wte, "wpe": wpe[:cfg.max_len].copy(),
              "ln_f": {"scale": take("ln_f.weight"), "bias": take("ln_f.bias")}}
    if cfg.scan_layers:
        params["blocks"] = _nest({p: np.stack([lay[p] for lay in layers]) for p in layers[0]})
    else:
        for i, lay in enumerate(layers):
            params[f"block_{i}"] = _nest(lay)
    return params


def params_to_hf(params: dict, cfg: GPT2Config, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """HF GPT-2 state dict (``transformer.*`` names, Conv1D layout, fp32) from jzero GPT-2 params."""
    v = int(vocab_size or cfg.vocab_size)
    if v > cfg.vocab_size:
        raise ConfigError(f"vocab_size={v} exceeds the model's vocab_size={cfg.vocab_size}")
    p = {k: _tree_np(x) for k, x in params.items()}
    d = cfg.d_model
    out = {"wte.weight": p["wte"][:v], "wpe.weight": p["wpe"],
           "ln_f.weight": p["ln_f"]["scale"], "ln_f.bias": p["ln_f"]["bias"]}
    for i in range(cfg.n_layer):
        block = layer_of(p["blocks"], i) if cfg.scan_layers else p[f"block_{i}"]
        for path, hf in _block_names(i).items():
            mod, name = path.split("/")
            x = block[mod][name]
            if path in ("attn/qkv_kernel", "attn/out_kernel"):
                x = x.reshape(d, 3 * d) if path == "attn/qkv_kernel" else x.reshape(d, d)
            elif path == "attn/qkv_bias":
                x = x.reshape(3 * d)
            out[hf] = x
    return {f"transformer.{k}": np.ascontiguousarray(x, np.float32) for k, x in out.items()}


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        mod, name = path.split("/")
        out.setdefault(mod, {})[name] = x
    return out


def _tree_np(x):
    if isinstance(x, dict):
        return {k: _tree_np(v) for k, v in x.items()}
    return np.asarray(x, np.float32)


def layer_of(tree: dict, i: int) -> dict:
    """Layer ``i`` of a stacked block tree."""
    return {k: layer_of(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


# --------------------------------------------------------------------------- files


def load_hf_gpt2(path, vocab_size: int | None = None, max_len: int | None = None, **cfg_kw) -> tuple[dict, GPT2Config]:
    """``(params, GPT2Config)`` from a local HF directory with ``config.json`` and ``model.safetensors``."""
    from models.hf_files import INDEX_NAME, read_state

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file() and not (name == WEIGHTS_NAME and (path / INDEX_NAME).is_file()):
            raise CheckpointError(f"{path / name} not found; pass a local Hugging Face GPT-2 directory "
                                  f"(save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        hf = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    cfg = gpt2_config_from_hf(hf, vocab_size, max_len, **cfg_kw)
    return params_from_hf(read_state(path), cfg), cfg   # one file or shards, fp32/fp16/bf16


def save_hf_gpt2(params: dict, cfg: GPT2Config, path, vocab_size: int | None = None, dtype: str = "fp32") -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained(path)`` loads."""
    from models.hf_files import write_hf_dir

    return write_hf_dir(path, params_to_hf(params, cfg, vocab_size), hf_config_from_gpt2(cfg, vocab_size), dtype)
