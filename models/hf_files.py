"""Reading a local Hugging Face model directory's weights: ``model.safetensors`` or the shards that
``model.safetensors.index.json`` lists, in any float dtype including bf16 (``safetensors.numpy`` cannot read
bf16, the dtype most HF Llama files are saved in; here it is ``ml_dtypes.bfloat16``), memory-mapped.
Used by :mod:`models.hf_gpt2` and :mod:`models.hf_llama`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jzero.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


DTYPES = ("fp32", "bf16", "fp16")   # the dtypes weights are written in (jzero.export, models.hf_gpt2)


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


def write_hf_dir(path, state: dict, hf_config: dict, dtype: str = "fp32") -> Path:
    """Write a Hugging Face model directory: ``state`` (HF tensor names -> fp32 arrays) cast to ``dtype`` into
    ``model.safetensors`` and ``hf_config`` (with its ``torch_dtype``) into ``config.json``; returns ``path``."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = {**hf_config, "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]}
    save_file({k: cast(v, dtype) for k, v in state.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    return path


def load_safetensors(path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as (memory-mapped) numpy arrays, bf16 included (``safetensors.numpy`` cannot
    read bf16, the dtype most HF Llama files are in; here it is ``ml_dtypes.bfloat16``)."""
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {info['dtype']}, not one of {sorted(dtypes)}")
        lo, hi = info["data_offsets"]
        out[name] = data[lo:hi].view(dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def read_state(path: Path) -> dict:
    """All tensors of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists, as numpy."""
    files = [path / WEIGHTS_NAME]
    if not files[0].is_file() and (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        files = [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
    state: dict = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} not found; pass a local Hugging Face directory (save_pretrained writes "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME} or sharded files with {INDEX_NAME})")
        try:
            state.update(load_safetensors(f))
        except (ValueError, KeyError, TypeError, OSError) as exc:   # a bad header or a truncated file
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None
    return state
