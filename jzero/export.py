"""Consolidated export (DeepSpeed's ``zero_to_fp32``): full weights from a sharded checkpoint, no GPU, no mesh.

    python -m train.export CKPT_DIR --out model.safetensors [--dtype fp32|bf16|fp16] [--step N]   # or the RUN_DIR
    python -m train.export CKPT_DIR --format hf --out gpt2_dir [--vocab-size 50257]

DeepSpeed needs ``zero_to_fp32.py`` because each rank wrote its own flat fp32 partition that must be stitched
back by hand. A jzero checkpoint already stores every array whole in logical coordinates (orbax writes each
process's shards into one zarr array per leaf), so export is a read: only the ``params`` sub-tree is restored,
into host numpy arrays (``restore_type=np.ndarray``), on whatever CPU runs it; optimizer state is never read.

The jzero format names each tensor by its param path joined with dots (``blocks.attn.qkv_kernel``, layers
stacked on the first axis) and records the step and model sizes in the safetensors metadata;
:func:`load_safetensors` reads it back into a param tree. ``format='hf'`` writes a Hugging Face GPT-2 or
Llama directory (see :mod:`models.hf_gpt2`, :mod:`models.hf_llama`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jzero import checkpoint
from jzero.errors import CheckpointError, ConfigError
from models.hf_files import DTYPES, cast  # noqa: F401  (re-exported: the export dtypes)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``{'blocks.attn.qkv_kernel': array, ...}`` from a nested dict of arrays."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if "." in str(k):
            raise CheckpointError(f"param name '{name}' contains '.', which the flat export format uses as separator")
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def checkpoint_location(directory) -> Path:
    """``directory``, or when it is a run directory (``train.output_dir``, what ``python -m train.generate
    --checkpoint`` takes too) holding no steps itself, that run's checkpoint directory: the ``checkpoint.dir`` its
    ``config.json`` records (checkpoints on other storage), else its ``checkpoints/``."""
    directory = Path(directory)
    is_run = (directory / "checkpoints").is_dir() or (directory / "config.json").is_file()
    if not is_run or checkpoint.steps(directory):
        return directory
    try:
        recorded = (json.loads((directory / "config.json").read_text()).get("checkpoint") or {}).get("dir")
    except (OSError, ValueError, AttributeError):
        recorded = None   # no readable config.json: the default layout
    if recorded and not Path(recorded).expanduser().is_dir():
        raise CheckpointError(f"run directory {directory}: its config.json records checkpoint.dir={recorded}, which "
                              "does not exist (moved, or relative to where the run started?); pass the checkpoint "
                              "directory itself")
    if not recorded and not (directory / "checkpoints").is_dir():
        raise CheckpointError(f"run directory {directory} has no checkpoints/; it saved none (train with "
                              "train.checkpoint_interval>0), or pass its checkpoint directory")
    return Path(recorded).expanduser() if recorded else directory / "checkpoints"


def load_params(directory, step: int | None = None) -> tuple[int, dict, dict]:
    """``(step, params, meta)``: the checkpoint's params as host numpy arrays (fp32 masters), read alone
    (:func:`jzero.checkpoint.read_params`); ``directory`` is a checkpoint directory or a run directory."""
    return checkpoint.read_params(checkpoint_location(directory), step)


def export_safetensors(directory, out, dtype: str = "fp32", step: int | None = None) -> tuple[Path, int, int]:
    """Write the checkpoint's params to ``out`` (one safetensors file); returns (path, step, n_params)."""
    from safetensors.numpy import save_file

    step, params, meta = load_params(directory, step)
    flat = {k: cast(v, dtype) for k, v in flatten(params).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out), metadata={"format": "jzero", "step": str(step), "dtype": dtype,
                                         "model": json.dumps(meta.get("model", {})),
                                         "source": checkpoint.location(checkpoint_location(directory))})
    return out, step, int(sum(v.size for v in flat.values()))


def load_safetensors(path) -> tuple[dict, dict]:
    """``(params, metadata)`` from a file written by :func:`export_safetensors`."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; write it with python -m train.export CKPT_DIR --out {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        flat = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != "jzero":
        raise CheckpointError(f"{path} is not a jzero export (metadata format={metadata.get('format')!r}); "
                              f"for Hugging Face GPT-2 files use models.hf_gpt2.load_hf_gpt2")
    return checkpoint.unflatten(flat), metadata


def model_config_from_meta(meta: dict):
    """The family config (GPT2Config or LlamaConfig) a checkpoint's meta records."""
    model = dict(meta.get("model", {}))
    family = model.pop("family", None)
    if family not in ("gpt2", "llama"):
        raise ConfigError(f"checkpoint model family {family!r}: Hugging Face export is implemented for gpt2 and "
                          f"llama")
    from models import FAMILIES

    cfg_cls = FAMILIES[family][1]
    fields = cfg_cls.__dataclass_fields__
    # JSON keeps tuples (Llama's rope_scaling) as lists; the frozen config wants them hashable again
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k in fields})


def export_hf(directory, out_dir, dtype: str = "fp32", step: int | None = None,
              vocab_size: int | None = None) -> tuple[Path, int, int]:
    """Write an HF GPT-2 or Llama directory (config.json + model.safetensors) from a jzero checkpoint of that
    family (:func:`models.hf_gpt2.save_hf_gpt2`, :func:`models.hf_llama.save_hf_llama`).

    ``vocab_size``: the embedding rows written. None: the training data's vocabulary when the checkpoint's config
    names a prepared ``data.path`` whose meta.json is readable (jzero pads the model's vocabulary, e.g. 50257 ->
    50304; HF's generate would otherwise be free to pick a padded id, which ``jzero.generate`` masks), else all
    of the model's rows."""
    from jzero.data import data_vocab
    from models.hf_gpt2 import save_hf_gpt2
    from models.hf_llama import save_hf_llama

    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ConfigError(f"vocab_size={vocab_size!r}: give the tokenizer's vocabulary size (an int >= 1), or None "
                          "for the model's")
    step, params, meta = load_params(directory, step)
    cfg = model_config_from_meta(meta)
    if vocab_size is None:
        data = data_vocab(meta.get("config") or {})
        vocab_size = data if data is not None and data < cfg.vocab_size else None
    save = save_hf_llama if meta.get("model", {}).get("family") == "llama" else save_hf_gpt2
    path = save(params, cfg, out_dir, vocab_size=vocab_size, dtype=dtype)
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    return path, step, n
