"""The pretrain main: what a run writes, and bad input as one line on stderr with exit code 2."""
import json

import pytest

from train.prepare_data import main as prepare_main
from train.pretrain import main
from helpers import assert_config_round_trip

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.seq_len=16",
        "train_batch_size=8", "data.default_corpus_bytes=200000", "train.eval_interval=2", "train.eval_batches=1",
        "train.steps=4", "scheduler.params.total_num_steps=4", "scheduler.params.warmup_num_steps=1"]


def test_run_writes_config_metrics_and_summary(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["zero_optimization.stage=3", f"train.output_dir={out}"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mesh"]["data"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert all(key in x for x in train), key
    assert any("eval_loss" in x for x in lines)
    s = json.loads((out / "summary.json").read_text())
    for key in ("final_loss", "steps", "tokens_per_s", "mfu", "n_devices", "zero_stage", "memory_per_device_bytes"):
        assert key in s, key
    assert s["n_devices"] == 8 and s["zero_stage"] == 3 and s["mfu"] is None   # no known CPU peak
    assert s["memory_per_device_bytes"]["params"] > 0 and s["memory_per_device_bytes"]["opt_state"] > 0
    # the loop's timing split (jzero.step_timer): host overhead = its four phases, and it fits inside the wall
    # time of the run's steps; steps 2-4 ran synchronised for the device step time
    phases = ("data_wait_s", "place_time_s", "dispatch_time_s", "log_time_s")
    for x in train:
        assert x["host_time_s"] == pytest.approx(sum(x[k] for k in phases)) and min(x[k] for k in phases) >= 0
    assert sum(x["host_time_s"] + x["queue_wait_s"] for x in train) < sum(x["step_time_s"] for x in train)
    assert 0 < s["device_step_s"] and 0 < s["host_time_s"] < s["step_time_s"]
    prof = s["flops_profile"]
    assert prof["device_step_s"] == s["device_step_s"] and set(prof["host_split"]) == set(phases)
    # an eval (step 2) and the synchronised probes (2-4) close windows: step 1, logged just before the closing step
    # 2, shares its window (one span over both), never a window of its own with no step finished in it; so no
    # window is far shorter than a step of the device (the audit found 0.3 ms "steps" = 370k tokens/s on CPU)
    assert train[0]["step_time_s"] == train[1]["step_time_s"]
    assert min(x["step_time_s"] for x in train) > 0.3 * s["device_step_s"], (train, s["device_step_s"])
    # no window clears the warm-up step and the 3 probes (steps 1-4) in a 4-step run: the last one is used, labelled
    assert prof["window_steps"] == [4, 4] and prof["step_time_s"] == train[-1]["step_time_s"]
    assert s["initial_loss"] == train[0]["loss"] and s["resumed_from"] == 0
    assert s["final_loss"] == pytest.approx(sum(x["loss"] for x in train) / 4)   # < 10 steps: all of them
    assert_config_round_trip(out / "config.json")


def _tiny_data(tmp_path, n_bytes):
    src = tmp_path / "src.txt"
    src.write_bytes(b"abcdefgh" * (n_bytes // 8))
    assert prepare_main(["--input", str(src), "--output-dir", str(tmp_path / "data"), "--val-fraction", "0.5"]) == 0
    return tmp_path / "data"


@pytest.mark.parametrize("args,needle", [
    (["bogus.key=1"], "unknown key 'bogus'"),
    (["train_batch_size=30", "train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=1"],
     "train_batch_size=30 != train_micro_batch_size_per_gpu (4)"),
    (["mesh.tensor=3"], "does not divide the 8 devices"),
    (["data.path=/nonexistent/data"], "/nonexistent/data"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys, tmp_path):
    assert main(TINY + args + [f"train.output_dir={tmp_path}/o"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_data_file_too_short_for_one_batch(capsys, tmp_path):
    data = _tiny_data(tmp_path, 64)
    assert main(TINY + [f"data.path={data}", f"train.output_dir={tmp_path}/o"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.bin" in err and "needs" in err and "\n" not in err, err


def test_overrides_may_follow_resume():
    from train.pretrain import parse_args

    args = parse_args(["a.b=1", "--resume", "c.d=2", "--config", "x.yaml", "e=3"])
    assert args.resume and args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.config == "x.yaml"


def test_deepspeed_config_flag_is_config():
    """A DeepSpeed launch line's --deepspeed_config names the config, as --config does."""
    from train.finetune import parse_args as finetune_args
    from train.pretrain import parse_args

    assert parse_args(["--deepspeed_config", "ds.json", "mesh.data=8"]).config == "ds.json"
    assert finetune_args(["--deepspeed_config", "ds.json"]).config == "ds.json"


def test_a_bad_flag_is_one_line_exit_2(capsys):
    """argparse's usage errors too are one `error:` line (train._main.ArgumentParser), in every main."""
    from train.launch import main as launch_main

    with pytest.raises(SystemExit) as exc:
        main(["--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: python -m train.pretrain: unrecognized arguments: --bogus; see python -m train.pretrain "
                   "--help\n")
    with pytest.raises(SystemExit) as exc:
        launch_main(["--nproc", "x", "--", "true"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1



def test_flops_profile_comes_from_an_exact_window(tmp_path, monkeypatch):
    """A host-bound loop (CPU) closes its windows inexactly (the step just dispatched still running), each off by up
    to a step: the profile took the first one after the probes and printed 'loop step 16.5 ms (steps 5-5)' beside
    8-10 ms lines. It now takes the first exact close (one span over the inexact ones before it). Readiness is
    scripted: every step is done once the next one is dispatched, the newest never is (no real timing)."""
    from jax._src.array import ArrayImpl

    import train.pretrain as pretrain
    from jzero.guard import TrainingGuard
    from jzero.step_timer import StepTimer

    newest, exact_windows, used = [None], [], []
    watch, window, flops_profile = TrainingGuard.watch, StepTimer.window, pretrain._flops_profile

    def watch_spy(self, engine, metrics):
        newest[0] = metrics["loss"]
        return watch(self, engine, metrics)

    def window_spy(self, steps, exact=True):
        out = window(self, steps, exact)
        if exact:
            exact_windows.append(out)
        return out

    monkeypatch.setattr(TrainingGuard, "watch", watch_spy)
    monkeypatch.setattr(ArrayImpl, "is_ready", lambda self: self is not newest[0])
    monkeypatch.setattr(StepTimer, "window", window_spy)
    monkeypatch.setattr(pretrain, "_flops_profile", lambda static, w, *a: used.append(w) or flops_profile(static, w, *a))
    over = [x for x in TINY if not x.startswith(("train.steps", "train.eval_interval", "scheduler.params.total"))]
    assert main(over + ["train.steps=9", "train.eval_interval=0", f"train.output_dir={tmp_path}"]) == 0
    assert len(used) == 1 and any(w is used[0] for w in exact_windows)
    prof = json.loads((tmp_path / "summary.json").read_text())["flops_profile"]
    assert prof["window_steps"] == [5, 9]   # after the warm-up step and the 3 probes: the steps its time holds
