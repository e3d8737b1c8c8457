"""Reading HF weight files (models.hf_files): fp32 / bf16 / int tensors of one safetensors file or of the shards an
index lists come back exactly as torch wrote them; a truncated file or a missing shard is a CheckpointError."""
import json

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from jzero.errors import CheckpointError  # noqa: E402
from models.hf_files import load_safetensors, read_state  # noqa: E402


def test_dtypes_shards_and_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)}
    b = {"ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "h": torch.randn(2, 2, generator=g).half()}
    save_file(a, str(tmp_path / "part-1.safetensors"))
    save_file(b, str(tmp_path / "part-2.safetensors"))
    weight_map = {**{k: "part-1.safetensors" for k in a}, **{k: "part-2.safetensors" for k in b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = read_state(tmp_path)
    assert sorted(state) == ["b", "h", "ids", "w"]
    assert state["b"].dtype == ml_dtypes.bfloat16 and state["h"].dtype == np.float16
    for k, v in {**a, **b}.items():
        assert np.array_equal(np.asarray(state[k], np.float64), v.double().numpy()), k
    raw = (tmp_path / "part-1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(CheckpointError, match="single/model.safetensors is not a readable safetensors file"):
        read_state_of(tmp_path, "cut.safetensors")
    (tmp_path / "part-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="part-2.safetensors not found"):
        read_state(tmp_path)
    assert np.array_equal(load_safetensors(tmp_path / "part-1.safetensors")["w"], a["w"].numpy())


def read_state_of(tmp_path, name):
    """read_state of a directory whose model.safetensors is ``name``."""
    d = tmp_path / "single"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes((tmp_path / name).read_bytes())
    return read_state(d)
