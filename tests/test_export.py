"""Consolidated export (zero_to_fp32): full weights from a ZeRO-3 checkpoint sharded over 8 devices, written by
``python -m train.export`` in a separate one-device CPU process, equal to the engine's params bit for bit."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import jzero
from jzero import checkpoint, export
from jzero.config import load_config
from train.export import main

BASE = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
        "data.seq_len=32", "train_batch_size=16", "zero_optimization.stage=3",
        "zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Steps 1 and 2 of a ZeRO-3 engine (params stored sharded over data=8), each with distinct params."""
    d = tmp_path_factory.mktemp("export") / "ckpt"
    eng = jzero.initialize(load_config(base={}, overrides=BASE))
    assert len(eng.state.params["wte"].addressable_shards[0].data) == 256 // 8     # really sharded over data=8
    shift = jax.jit(lambda p, s: jax.tree.map(lambda x: x * 1.5 + s, p), out_shardings=eng.state_shardings.params)
    params = {}
    for step in (1, 2):
        eng.state = eng.state.replace(step=eng.state.step + 1, params=shift(eng.state.params, 0.25 * step))
        params[step] = jax.tree.map(np.asarray, jax.device_get(eng.state.params))
        eng.save_checkpoint(d)
    checkpoint.wait_until_finished(d)
    return d, params


def test_export_in_a_fresh_one_device_process(ckpt, tmp_path):
    d, params = ckpt
    out = tmp_path / "model.safetensors"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}   # one CPU device, no mesh of 8
    res = subprocess.run([sys.executable, "-m", "train.export", str(d), "--out", str(out)], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: 99,840 params from step 2 as fp32" in res.stdout
    flat, meta = export.load_safetensors(out)
    assert meta["step"] == "2" and meta["dtype"] == "fp32"
    assert sorted(export.flatten(flat)) == sorted(export.flatten(params[2]))
    for name, want in export.flatten(params[2]).items():
        got = export.flatten(flat)[name]
        assert got.dtype == np.float32 and np.array_equal(got, want), name


def test_export_bf16_and_older_step(ckpt, tmp_path):
    d, params = ckpt
    out = tmp_path / "m16.safetensors"
    assert main([str(d), "--out", str(out), "--dtype", "bf16", "--step", "1"]) == 0
    flat, meta = export.load_safetensors(out)
    assert meta["step"] == "1" and meta["dtype"] == "bf16"
    for name, want in export.flatten(params[1]).items():
        got = export.flatten(flat)[name]
        assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, want.astype(ml_dtypes.bfloat16)), name
    assert not np.array_equal(params[1]["wte"], params[2]["wte"])


def test_export_from_the_run_directory(ckpt, tmp_path, capsys):
    """The run directory (what train.generate --checkpoint takes) exports its checkpoints/: it used to fail with
    "no complete checkpoint in RUN; train with train.checkpoint_interval>0", a fix the user had already made."""
    d, params = ckpt
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(d)
    assert main([str(run), "--out", str(tmp_path / "m.safetensors"), "--step", "1"]) == 0
    assert "params from step 1" in capsys.readouterr().out
    flat, meta = export.load_safetensors(tmp_path / "m.safetensors")
    assert np.array_equal(flat["wte"], params[1]["wte"]) and meta["source"].endswith("checkpoints")
    # a run that checkpointed elsewhere (checkpoint.dir, recorded in its config.json): found there
    import json

    elsewhere = tmp_path / "run2"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"checkpoint": {"dir": str(d)}}))
    assert main([str(elsewhere), "--out", str(tmp_path / "m2.safetensors")]) == 0
    assert "params from step 2" in capsys.readouterr().out
    from jzero.weights import checkpoint_dir   # train.generate --checkpoint RUN reads the same directory

    assert checkpoint_dir(elsewhere) == d
    for cfg, err in (({"checkpoint": {"dir": None}}, "has no checkpoints/; it saved none (train with "
                                                      "train.checkpoint_interval>0), or pass its checkpoint directory"),
                     ({"checkpoint": {"dir": str(tmp_path / "gone")}}, f"checkpoint.dir={tmp_path / 'gone'}, which "
                                                                        "does not exist")):
        (elsewhere / "config.json").write_text(json.dumps(cfg))
        assert main([str(elsewhere), "--out", str(tmp_path / "m3.safetensors")]) == 2
        assert err in capsys.readouterr().err


def test_export_errors_name_the_problem(ckpt, tmp_path, capsys):
    d, _ = ckpt
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"error: checkpoint directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main([str(d), "--out", str(tmp_path / "x.safetensors"), "--step", "9"]) == 2
    assert f"error: checkpoint step 9 is not in {d} (complete steps: [1, 2])" in capsys.readouterr().err
    assert main([str(d), "--out", str(tmp_path / "x.safetensors"), "--vocab-size", "100"]) == 2
    assert "--vocab-size applies to --format hf only" in capsys.readouterr().err
    for bad in ("0", "-5"):   # 0 was ignored (the model's 256 rows), -5 wrote config vocab_size -5 and 251 rows
        assert main([str(d), "--out", str(tmp_path / "hf"), "--format", "hf", "--vocab-size", bad]) == 2
        assert capsys.readouterr().err == (f"error: --vocab-size {bad}: give the tokenizer's vocabulary size (>= 1), "
                                           "or leave it out to keep the model's\n")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(jzero.errors.ConfigError, match="vocab_size=0: give the tokenizer's vocabulary size"):
        export.export_hf(d, tmp_path / "hf", vocab_size=0)
    with pytest.raises(jzero.errors.CheckpointError, match="is not a jzero export"):
        from safetensors.numpy import save_file

        save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
        export.load_safetensors(tmp_path / "other.safetensors")


def test_unwritable_out_is_one_line_and_keeps_what_was_there(ckpt, tmp_path, capsys):
    """safetensors' own SafetensorError (a directory it cannot write its temporary into) and an OSError (a file
    where a directory should be) are one line, exit 2; an existing --out file is left as it was."""
    d, _ = ckpt
    assert main([str(d), "--out", "/proc/jzero-export-test.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: writing /proc/jzero-export-test.safetensors failed (Error while serializing: ")
    assert err.endswith("); pass an --out path in a writable directory") and "\n" not in err
    (tmp_path / "f").write_text("keep")
    assert main([str(d), "--out", str(tmp_path / "f" / "m"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: writing {tmp_path / 'f' / 'm'} failed ([Errno 20] Not a directory") and "\n" not in err
    assert (tmp_path / "f").read_text() == "keep"


def test_hf_export_keeps_the_datas_vocabulary_by_default(ckpt, tmp_path, monkeypatch):
    """A run whose data.path meta.json gives a vocabulary below the model's padded rows exports that many rows
    (HF's generate could pick a padded id otherwise); --vocab-size still decides; no data vocabulary: all rows."""
    import json

    import jzero.data

    d, params = ckpt
    rows = lambda out: json.loads((out / "config.json").read_text())["vocab_size"]  # noqa: E731
    assert main([str(d), "--out", str(tmp_path / "all"), "--format", "hf"]) == 0
    assert rows(tmp_path / "all") == 256   # the checkpoint's config names no data.path
    monkeypatch.setattr(jzero.data, "data_vocab", lambda config: 250)
    assert main([str(d), "--out", str(tmp_path / "data"), "--format", "hf"]) == 0
    assert rows(tmp_path / "data") == 250
    assert main([str(d), "--out", str(tmp_path / "given"), "--format", "hf", "--vocab-size", "253"]) == 0
    assert rows(tmp_path / "given") == 253
