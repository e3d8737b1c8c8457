"""jzero.guard in the pretrain main: divergence and a stuck fp16 loss scale stop the run with one line, exit 2,
naming the last good checkpoint, which is still on disk and finite (a nan state is never saved)."""
import json
import math
import shutil

import numpy as np
import pytest

from train.pretrain import main

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.seq_len=16",
        "train_batch_size=8", "data.default_corpus_bytes=200000", "train.eval_interval=0", "steps_per_print=1",
        "scheduler.params.total_num_steps=4", "scheduler.params.warmup_num_steps=1", "zero_optimization.stage=0"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """2 healthy fp32 steps with a checkpoint at step 2 (copied by each test that resumes from it)."""
    out = tmp_path_factory.mktemp("guard") / "good"
    assert main(TINY + [f"train.output_dir={out}", "train.steps=2", "train.checkpoint_interval=2"]) == 0
    return out


def _copy(good_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _finite_params(ckpt_dir, step) -> bool:
    from jzero.export import flatten, load_params

    return all(np.isfinite(v).all() for v in flatten(load_params(ckpt_dir, step)[1]).values())


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_divergence_is_never_checkpointed(good_run, tmp_path, capsys):
    """lr 1e6, a checkpoint every step and max_to_keep 1: the first nan state is refused (rotation would have
    deleted the last good step for it) and the run stops there, naming that step."""
    from jzero import checkpoint

    out = _copy(good_run, tmp_path)
    code = main(TINY + [f"train.output_dir={out}", "--resume", "train.steps=30", "optimizer.params.lr=1e6",
                        "train.checkpoint_interval=1", "checkpoint.max_to_keep=1"])
    err = _one_error_line(capsys)
    assert code == 2
    steps = checkpoint.steps(out / "checkpoints")
    assert len(steps) == 1 and _finite_params(out / "checkpoints", steps[-1])
    first_bad = min(r["step"] for r in _records(out) if "loss" in r and not math.isfinite(r["loss"]))
    assert steps[-1] == first_bad - 1, (steps, first_bad)
    assert f"checkpoint step {first_bad} not saved into {out / 'checkpoints'}: the train state holds inf/nan" in err
    assert f"last good checkpoint: {out / 'checkpoints'}/{steps[-1]}" in err


def test_consecutive_nonfinite_steps_stop_the_run(good_run, tmp_path, capsys):
    """No checkpoint due: after train.max_nonfinite_steps nan steps the guard stops, naming the earlier step 2."""
    out = _copy(good_run, tmp_path)
    code = main(TINY + [f"train.output_dir={out}", "--resume", "train.steps=40", "optimizer.params.lr=1e6",
                        "train.checkpoint_interval=100", "train.max_nonfinite_steps=3"])
    err = _one_error_line(capsys)
    assert code == 2
    bad = [r["step"] for r in _records(out) if "loss" in r and not math.isfinite(r["loss"])]
    assert bad == [bad[0], bad[0] + 1], bad   # logged 2 in a row, then stopped at the 3rd, before logging it
    assert (f"step {bad[-1] + 1}: training diverged: loss nan, grad_norm nan (3 consecutive non-finite steps >= "
            f"train.max_nonfinite_steps=3); last good checkpoint: {out / 'checkpoints'}/2") in err
    assert _finite_params(out / "checkpoints", 2)
    assert (out / "summary.json").is_file()   # the earlier run's summary was not overwritten


def test_fp16_stuck_at_min_loss_scale_raises(good_run, tmp_path, capsys):
    """fp16 resumed from the fp32 checkpoint: the scaler starts fresh at 2**100 (not the checkpoint's static 1.0),
    which overflows; with min_loss_scale 2**100 and no hysteresis it is stuck at once: DeepSpeed raises, so do we."""
    out = _copy(good_run, tmp_path)
    code = main(TINY + [f"train.output_dir={out}", "--resume", "train.steps=6", "fp16.enabled=true",
                        "fp16.initial_scale_power=100", f"fp16.min_loss_scale={2.0 ** 100!r}", "fp16.hysteresis=1"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "the loss scaler starts fresh from this run's fp16 section (scale 1.26765e+30)" in captured.out
    assert ("step 3: the fp16 loss scale is stuck at fp16.min_loss_scale=1.26765e+30 and the gradients still "
            "overflow (DeepSpeed: 'Current loss scale already at minimum'; 1 of 3 steps skipped); last good "
            f"checkpoint: {out / 'checkpoints'}/2") in err
    assert _finite_params(out / "checkpoints", 2)


def test_skipped_fp16_steps_show_in_the_console_and_summary(tmp_path, capsys):
    """A scale of 2**40 overflows the first steps; each skip is counted on the console line and in summary.json."""
    out = tmp_path / "fp16"
    assert main(TINY + [f"train.output_dir={out}", "train.steps=4", "fp16.enabled=true",
                        "fp16.initial_scale_power=40", "fp16.hysteresis=1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    recs = [r for r in _records(out) if "loss" in r]
    skipped = [int(r["skipped_steps"]) for r in recs]
    assert skipped[-1] >= 1 and [r["loss_scale"] for r in recs][:2] == [2.0 ** 40, 2.0 ** 39]
    for line, n in zip(lines, skipped):
        assert (f"skipped {n}" in line) == (n > 0), (line, n)
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == skipped[-1]
