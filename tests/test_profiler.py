"""jzero.profiler: a trace of steps of the training main, its device busy fraction, and the config's checks."""
import gzip
import json
import statistics
import types

import pytest

from jzero import profiler
from jzero.errors import ConfigError
from train.pretrain import main

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.seq_len=16",
        "train_batch_size=8", "data.default_corpus_bytes=200000", "train.eval_interval=0",
        "scheduler.params.total_num_steps=12", "scheduler.params.warmup_num_steps=1"]


def _trace(path, spans, pid=7):
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
    events = meta + [{"ph": "X", "pid": pid, "name": f"k{i}", "ts": ts, "dur": d} for i, (ts, d) in enumerate(spans)]
    events += [{"ph": "X", "pid": 1, "name": "host", "ts": 0, "dur": 10_000}]   # host events are not the device's
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "h.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_busy_fraction_is_the_union_of_kernels_over_their_span(tmp_path):
    # kernels [0,30) [40,70) [65,90) [100,100+0): busy 30 + 50 = 80 of a 100 us span; 4 kernels over 2 steps
    _trace(tmp_path / "p", [(0, 30), (40, 30), (65, 25), (95, 5)])
    s = profiler.busy_summary(str(tmp_path / "p"), steps=2, step_time_s=0.010)
    assert s["device_busy_fraction"] == pytest.approx(85 / 100)
    assert s["kernels_per_step"] == 2
    assert s["idle_ms_per_step"] == pytest.approx(0.15 * 10.0)
    line = profiler.describe(s)
    assert "device busy 85.0%" in line and "idle ~1.50 ms a step" in line and "trace_top" in line


def test_a_trace_without_device_events_says_so(tmp_path):
    _trace(tmp_path / "p", [])
    s = profiler.busy_summary(str(tmp_path / "p"), steps=3, step_time_s=None)
    assert s["device_busy_fraction"] is None and "no device kernel events" in profiler.describe(s)
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        profiler.device_events(str(tmp_path / "empty"))


@pytest.mark.parametrize("steps,first,total,start,needle", [
    (4, 20, 22, 0, "runs past train.steps=22"),
    (2, 3, 40, 5, "resumes from"),
])
def test_profile_steps_that_do_not_fit_the_run_are_config_errors(steps, first, total, start, needle, tmp_path):
    cfg = types.SimpleNamespace(profile_steps=steps, profile_start=first, steps=total)
    with pytest.raises(ConfigError, match=needle):
        profiler.LoopProfile.from_config(cfg, start, 5, tmp_path)
    off = types.SimpleNamespace(profile_steps=0, profile_start=first, steps=total)
    lp = profiler.LoopProfile.from_config(off, start, 5, tmp_path)
    assert not any(f(first) for f in (lp.covers, lp.starts_at, lp.ends_at))


def test_the_main_traces_its_steps_and_keeps_them_out_of_the_timed_windows(tmp_path):
    """train.profile_steps=3 from the first steady step (5: after the warm-up and the 3 probes): the trace is
    written, summary.json reports it, and the window holding traced steps (4 is closed before the trace, 5-6 ends
    inside it, 7 closes it) is logged but left out of the run's median step time (windows 4, 8, 10, 12)."""
    out = tmp_path / "run"
    assert main(TINY + ["train.steps=12", "train.log_interval=2", "train.profile_steps=3",
                        f"train.output_dir={out}"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["trace"]["steps"] == 3 and s["trace"]["dir"] == str(out / "profile")
    assert list((out / "profile").rglob("*.xplane.pb")), "the TensorBoard profile is written"
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in train] == [2, 4, 6, 8, 10, 12]
    timed = [x["tokens_per_s"] for x in train if x["step"] in (4, 8, 10, 12)]   # window 2 (warm-up) dropped
    assert s["tokens_per_s"] == pytest.approx(statistics.median(timed))
    # the first exact timed window after the trace starts at step 8; on this host-bound CPU loop it may hold the
    # steps of inexact closes after it (jzero.step_timer), so it ends at 8 or later
    first, last = s["flops_profile"]["window_steps"]
    assert first == 8 and 8 <= last <= 12, s["flops_profile"]["window_steps"]


def test_a_trace_past_the_last_step_is_rejected_before_anything_compiles(capsys, tmp_path):
    assert main(TINY + ["train.steps=10", "train.profile_steps=4", "train.profile_start=9",
                        f"train.output_dir={tmp_path}/o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.profile_start=9 + train.profile_steps=4 runs past train.steps=10" in err[0]
