"""Consolidated export (DeepSpeed's ``zero_to_fp32``): full weights from a sharded checkpoint, no GPU, no mesh.

    python -m train.export CKPT_DIR --out model.safetensors [--dtype fp32|bf16|fp16] [--step N]
    python -m train.export CKPT_DIR --format hf --out gpt2_dir [--vocab-size 50257]

DeepSpeed needs ``zero_to_fp32.py`` because each rank wrote its own flat fp32 partition that must be stitched
back by hand. A jzero checkpoint already stores every array whole in logical coordinates (orbax writes each
process's shards into one zarr array per leaf), so export is a read: only the ``params`` sub-tree is restored,
into host numpy arrays (``restore_type=np.ndarray``), on whatever CPU runs it; optimizer state is never read.

The jzero format names each tensor by its param path joined with dots (``blocks.attn.qkv_kernel``, layers
stacked on the first axis) and records the step and model sizes in the safetensors metadata;
:func:`load_safetensors` reads it back into a param tree. ``format='hf'`` writes a Hugging Face GPT-2
directory (see :mod:`models.hf_gpt2`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jzero import checkpoint
from jzero.errors import CheckpointError, ConfigError

DTYPES = ("fp32", "bf16", "fp16")


def cast(x, dtype: str) -> np.ndarray:
    """``x`` as a contiguous numpy array of ``dtype`` (fp32 | bf16 | fp16; bf16 via ml_dtypes)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {list(DTYPES)}")
    if dtype == "bf16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = {"fp32": np.float32, "fp16": np.float16}[dtype]
    return np.ascontiguousarray(np.asarray(x).astype(np_dtype))


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


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten`."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def load_params(directory, step: int | None = None) -> tuple[int, dict, dict]:
    """``(step, params, meta)``: the checkpoint's params as host numpy arrays (fp32 masters), read alone."""
    import jax
    import orbax.checkpoint as ocp

    step, meta = checkpoint.read_meta(directory, step)
    if meta.get("offload"):   # the fp32 masters are the host chunks in the optimizer state, not the device params
        return step, _load_offloaded_masters(directory, step, meta), meta
    shapes = {k.removeprefix("params."): v for k, v in meta["state"].items() if k.startswith("params.")}
    if not shapes:
        raise CheckpointError(f"checkpoint {directory}/{step} holds no params (state leaves: "
                              f"{list(meta['state'])[:3]}...)")
    item = {"params": unflatten({k: _struct(v) for k, v in shapes.items()})}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        restored = checkpoint.restore_partial(directory, step, item, restore_args)["params"]
    except Exception as exc:
        raise checkpoint.UnreadableCheckpointError(
            f"checkpoint {checkpoint._key(directory)}/{step} is unreadable: its params failed to load "
            f"({type(exc).__name__}: {checkpoint._first_line(exc)}); export an earlier --step") from None
    return step, restored, meta


def _load_offloaded_masters(directory, step: int, meta: dict) -> dict:
    """Params of a run saved under ``offload_optimizer``: its fp32 master chunks, re-stacked per leaf."""
    import jax
    import orbax.checkpoint as ocp

    from jzero.offload import restack_masters

    chunks = meta["offload"]["chunks"]
    keys = [f"opt_state.master.{i}" for i in range(len(chunks))]
    missing = [k for k in keys if k not in meta["state"]]
    if missing:
        raise CheckpointError(f"checkpoint {directory}/{step}: its meta lists {len(chunks)} offloaded master chunks "
                              f"but the state has no {missing[0]}; the checkpoint is inconsistent, export another step")
    item = {"opt_state": {"master": [_struct(meta["state"][k]) for k in keys]}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        masters = checkpoint.restore_partial(directory, step, item, restore_args)["opt_state"]["master"]
    except Exception as exc:
        raise checkpoint.UnreadableCheckpointError(
            f"checkpoint {checkpoint._key(directory)}/{step} is unreadable: its master weights failed to load "
            f"({type(exc).__name__}: {checkpoint._first_line(exc)}); export an earlier --step") from None
    return unflatten(restack_masters(chunks, masters))


def _struct(desc: str):
    """ShapeDtypeStruct from a :func:`jzero.checkpoint.describe` entry like ``float32[2,64]``."""
    import jax

    dtype, dims = desc[:-1].split("[")
    return jax.ShapeDtypeStruct(tuple(int(d) for d in dims.split(",") if d), np.dtype(dtype))


def export_safetensors(directory, out, dtype: str = "fp32", step: int | None = None) -> tuple[Path, int, int]:
    """Write the checkpoint's params to ``out`` (one safetensors file); returns (path, step, n_params)."""
    from safetensors.numpy import save_file

    step, params, meta = load_params(directory, step)
    flat = {k: cast(v, dtype) for k, v in flatten(params).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out), metadata={"format": "jzero", "step": str(step), "dtype": dtype,
                                         "model": json.dumps(meta.get("model", {})),
                                         "source": str(checkpoint._key(directory))})
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
    return unflatten(flat), metadata


def model_config_from_meta(meta: dict):
    """The family config (e.g. GPT2Config) a checkpoint's meta records."""
    model = dict(meta.get("model", {}))
    family = model.pop("family", None)
    if family != "gpt2":
        raise ConfigError(f"checkpoint model family {family!r}: Hugging Face export is implemented for gpt2 only")
    from models.gpt2 import GPT2Config

    fields = GPT2Config.__dataclass_fields__
    return GPT2Config(**{k: v for k, v in model.items() if k in fields})


def export_hf(directory, out_dir, dtype: str = "fp32", step: int | None = None,
              vocab_size: int | None = None) -> tuple[Path, int, int]:
    """Write an HF GPT-2 directory (config.json + model.safetensors) from a jzero GPT-2 checkpoint."""
    from models.hf_gpt2 import save_hf_gpt2

    step, params, meta = load_params(directory, step)
    cfg = model_config_from_meta(meta)
    path = save_hf_gpt2(params, cfg, out_dir, vocab_size=vocab_size, dtype=dtype)
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    return path, step, n
