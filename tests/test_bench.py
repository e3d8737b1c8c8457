"""The benchmark harness on CPU (tiny configs): the table has its fields and numbers, and the batch-fit search
reports what the compiled step needs. Nothing here is timed. (Offloaded host bytes: tests/test_offload.py.)"""
import json

import pytest

from benchmarks import bench, max_batch

TINY = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
        "data.seq_len=32", "train_batch_size=8", "train_micro_batch_size_per_gpu=1"]   # data=8 (conftest's devices)


def _table(capsys, argv):
    assert bench.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    return dict(zip(header, row))


def test_bench_prints_one_row_with_every_column(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    row = _table(capsys, ["--name", "tiny", "--steps", "2", "--warmup", "1", "--json", str(out)] + TINY)
    assert list(row) == bench.COLUMNS
    assert row["name"] == "tiny" and row["device"] == "cpu" and row["n_dev"] == "8"
    assert float(row["tokens_per_s"]) > 0 and float(row["step_ms"]) > 0 and float(row["compile_s"]) > 0
    assert row["mfu"] == "null"   # no known peak for a CPU
    # AdamW under ZeRO-1 (the default config) over data=8: two fp32 moments per fp32 param, an eighth of them on
    # each device (every leaf, however small: the persistence threshold is ZeRO-3's), nothing on the host
    assert float(row["opt_MiB_per_dev"]) == pytest.approx(2 * float(row["params_MiB_per_dev"]) / 8, abs=0.006)
    assert float(row["host_MiB_per_dev"]) == 0.0
    saved = json.loads(out.read_text().splitlines()[-1])
    assert saved["step_ms"] == float(row["step_ms"]) and len(saved["step_ms_all"]) == 3


def test_max_batch_reports_growing_needs(capsys):
    assert max_batch.main(["--config", "configs/default.yaml", "--candidates", "8,32"] + TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    needs = [int(ln.split("(")[1].split(" bytes")[0]) for ln in lines if ln.startswith("micro-batch")]
    assert len(needs) == 2 and 0 < needs[0] < needs[1]
    assert lines[-1] == "largest: 32"   # no allocator limit on CPU: every candidate fits


def test_bench_main_times_the_training_main(capsys, tmp_path):
    """--main runs train.pretrain's loop on the embedded corpus: same columns plus the loop's host/device split."""
    row = _table(capsys, ["--main", "--name", "loop", "--steps", "1", "data.default_corpus_bytes=200000"] + TINY)
    assert list(row) == bench.COLUMNS + bench.MAIN_COLUMNS and row["name"] == "loop"
    step, host, queue = (float(row[k]) for k in ("step_ms", "host_ms", "queue_wait_ms"))
    assert step > 0 and float(row["device_step_ms"]) > 0 and 0 < host and 0 <= queue and host + queue < 2 * step
    with pytest.raises(SystemExit, match="--main times the real loop"):
        bench.main(["--main", "--token-range", "10"] + TINY)


def test_bench_main_profile_traces_steps_after_the_timed_ones(capsys, tmp_path):
    """--main --profile DIR: the main traces STEPS more steps (train.profile_steps) after its 4 timed windows and
    the trace lands in DIR; the row gains the busy columns (null on a CPU: no device kernel events)."""
    row = _table(capsys, ["--main", "--steps", "2", "--profile", str(tmp_path / "p"),
                          "data.default_corpus_bytes=200000"] + TINY)
    assert list(row) == bench.COLUMNS + bench.MAIN_COLUMNS + ["device_busy_pct", "idle_ms_per_step"]
    assert row["device_busy_pct"] == "null" and float(row["step_ms"]) > 0
    assert list((tmp_path / "p").rglob("*.xplane.pb"))


def test_data_bench_row(capsys):
    from benchmarks import data_bench

    assert data_bench.main(["--tokens", "300000", "--gpus", "2", "--rows-per-gpu", "4", "--seq-len", "128",
                            "--steps", "3", "--consumer-tokens-per-s", "1000"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    row = dict(zip([c.strip() for c in lines[0].strip("|").split("|")],
                   [c.strip() for c in lines[2].strip("|").split("|")]))
    tps = float(row["tokens_per_s"])
    assert row["rows"] == "8" and tps == pytest.approx(8 * 128 / (float(row["step_ms"]) / 1e3), rel=0.01)
    assert float(row["x_one_gpu"]) == pytest.approx(tps / 1000, rel=0.01)
    assert float(row["x_node"]) == pytest.approx(tps / 2000, rel=0.01)


def test_kernel_tiles_from_the_environment(monkeypatch, tmp_path):
    """$BENCH_KERNEL_TILE (comma-separated) sets kernel constants as --kernel-tile does (benchmarks.ab_main's
    variants differ only by environment); a malformed item is a one-line error naming it."""
    from jzero.kernels import layer_norm as kln

    monkeypatch.setattr(kln, "BLOCK_M", kln.BLOCK_M)
    monkeypatch.setattr(kln, "RESIDUAL_BIAS", kln.RESIDUAL_BIAS)
    monkeypatch.setenv("BENCH_KERNEL_TILE", "layer_norm.BLOCK_M=8, layer_norm.RESIDUAL_BIAS=0")
    missing = str(tmp_path / "nope.yaml")
    assert bench.main(["--config", missing]) != 0   # stops at the config, after the tiles are set
    assert kln.BLOCK_M == 8 and kln.RESIDUAL_BIAS == 0
    monkeypatch.setenv("BENCH_KERNEL_TILE", "layer_norm.BLOCK_M")
    with pytest.raises(SystemExit, match="layer_norm.BLOCK_M"):
        bench.main(["--config", missing])
