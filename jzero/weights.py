"""Weights for inference: ``(model, params, vocab_size)`` from a jzero checkpoint or a Hugging Face directory.

- jzero: a run directory (``config.json`` beside ``checkpoints/``) or a checkpoint directory (step folders).
  Params are read alone by :func:`jzero.export.load_params` as host fp32 arrays, whatever mesh, ZeRO stage,
  pipeline or offload setting wrote them (checkpoints store every array whole in logical coordinates); the model
  is rebuilt from the sizes the checkpoint's meta records. ``vocab_size`` is the training data's vocabulary
  (its ``meta.json``) when the run's ``data.path`` is readable, else the model's.
- Hugging Face: ``config.json`` ``model_type`` gpt2 (:mod:`models.hf_gpt2`) or llama (:mod:`models.hf_llama`).
  The vocabulary is padded to a multiple of ``64 * pad_to`` (tensor parallel sizes then divide it; the padded
  logits are never sampled) and ``vocab_size`` is HF's.
"""

from __future__ import annotations

import json
from pathlib import Path

from jzero.errors import CheckpointError, ConfigError


def checkpoint_dir(path) -> Path:
    """A run directory's checkpoint directory (its config.json's ``checkpoint.dir``, else ``path/checkpoints``),
    else ``path`` itself (:func:`jzero.export.checkpoint_location`)."""
    from jzero.export import checkpoint_location

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a jzero run directory or its checkpoints/ directory")
    return checkpoint_location(path)


def model_from_meta(model_meta: dict, dtype):
    """The Flax module a checkpoint's ``meta['model']`` records, computing in ``dtype``, without remat."""
    from models import FAMILIES

    meta = dict(model_meta)
    family = meta.pop("family", None)
    if family not in ("gpt2", "llama"):
        raise ConfigError(f"checkpoint model family {family!r}: generation supports gpt2 and llama (a causal LM)")
    module_cls, cfg_cls = FAMILIES[family]
    fields = cfg_cls.__dataclass_fields__
    sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()
             if k in fields and k not in ("dtype", "remat", "remat_policy")}
    return module_cls(cfg_cls(**sizes, dtype=dtype, remat=False))


def load_checkpoint(path, step: int | None = None, dtype=None):
    """``(model, params, vocab_size)`` from a jzero checkpoint (latest complete step unless ``step``)."""
    import jax.numpy as jnp

    from jzero import export

    step, params, meta = export.load_params(checkpoint_dir(path), step)
    model = model_from_meta(meta.get("model", {}), dtype or jnp.float32)
    from jzero.data import data_vocab

    vocab = data_vocab(meta.get("config", {}))
    if vocab is not None and vocab > model.cfg.vocab_size:
        vocab = None
    return model, params, vocab


def load_hf(path, dtype=None, pad_to: int = 1):
    """``(model, params, vocab_size)`` from a local HF GPT-2 or Llama directory."""
    import jax.numpy as jnp

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; pass a local Hugging Face model directory (save_pretrained)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    kind = hf.get("model_type")
    vocab = int(hf.get("vocab_size", 0))
    multiple = 64 * max(1, pad_to)
    padded = -(-vocab // multiple) * multiple
    dtype = dtype or jnp.float32
    if kind == "gpt2":
        from models.gpt2 import GPT2
        from models.hf_gpt2 import load_hf_gpt2

        params, cfg = load_hf_gpt2(path, vocab_size=padded, dtype=dtype)
        return GPT2(cfg), params, vocab
    if kind == "llama":
        from models.hf_llama import load_hf_llama
        from models.llama import Llama

        params, cfg = load_hf_llama(path, vocab_size=padded, dtype=dtype)
        return Llama(cfg), params, vocab
    raise ConfigError(f"{cfg_path}: model_type={kind!r}; generation from Hugging Face supports 'gpt2' and 'llama'")
