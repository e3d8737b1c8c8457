"""jzero.monitor: JSONL / CSV / TensorBoard contents, writer-only output, console lines, config sections."""
import csv
import io
import json

import jax
import pydantic
import pytest

from jzero.monitor import (CSVMonitorConfig, Monitor, TensorboardConfig, WandbConfig, device_memory_bytes,
                           format_train_line, human_bytes)

LOSSES = [4.0, 3.5, 3.25, 3.0]


def _log_four(mon):
    for i, loss in enumerate(LOSSES, start=1):
        mon.log(i, {"loss": loss, "lr": 1e-3 * i, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": None,
                    "step_time_s": 0.25})
    mon.log_eval(4, {"eval_loss": 3.1, "eval_ppl": 22.2})
    mon.summary({"final_loss": 3.0, "steps": 4})
    mon.close()


def test_jsonl_csv_tensorboard_contents(tmp_path):
    out = tmp_path / "run"
    mon = Monitor(out, 4, tensorboard={"enabled": True, "job_name": "tb"},
                  csv_monitor={"enabled": True, "output_path": str(tmp_path / "csvs"), "job_name": "job"},
                  steps_per_print=100, is_writer=True, stream=io.StringIO())
    _log_four(mon)

    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lines[:4]] == LOSSES
    assert lines[1] == {"step": 2, "loss": 3.5, "lr": 2e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": None,
                        "step_time_s": 0.25}
    assert lines[4] == {"step": 4, "eval_loss": 3.1, "eval_ppl": 22.2}
    assert json.loads((out / "summary.json").read_text()) == {"final_loss": 3.0, "steps": 4}

    # DeepSpeed csvMonitor layout: <output_path>/<job_name>/<tag without '/'>.csv, header step,<metric>
    csv_dir = tmp_path / "csvs" / "job"
    rows = list(csv.reader(open(csv_dir / "Trainloss.csv")))
    assert rows[0] == ["step", "loss"]
    assert [(int(s), float(v)) for s, v in rows[1:]] == list(enumerate(LOSSES, start=1))
    assert list(csv.reader(open(csv_dir / "Evaleval_loss.csv")))[1] == ["4", "3.1"]
    assert not (csv_dir / "Trainmfu.csv").exists()  # None is not a scalar
    assert not (csv_dir / "Trainstep_time_s.csv").exists()  # timings only with wall_clock_breakdown

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))  # empty output_path -> under the run's output_dir
    acc.Reload()
    events = acc.Scalars("Train/loss")
    assert [(e.step, e.value) for e in events] == list(enumerate(LOSSES, start=1))
    assert [e.value for e in acc.Scalars("Train/lr")] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert [(e.step, e.value) for e in acc.Scalars("Eval/eval_ppl")] == [(4, pytest.approx(22.2))]
    assert "Train/step_time_s" not in acc.Tags()["scalars"]


def test_non_writer_writes_and_prints_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    mon = Monitor(out, 4, tensorboard={"enabled": True}, csv_monitor={"enabled": True}, steps_per_print=1,
                  is_writer=False)
    _log_four(mon)
    assert not out.exists()
    assert capsys.readouterr().out == ""


def test_quiet_mode_prints_one_line_per_steps_per_print(tmp_path, capsys):
    mon = Monitor(tmp_path, 25, steps_per_print=10, is_writer=True)  # capsys stdout is not a TTY
    for i in range(1, 26):
        mon.log(i, {"loss": 3.0 + 1 / i, "lr": 1e-3, "tokens_per_s": 12345.4, "mfu": 0.123,
                    "memory_bytes": 1.2 * 2**30, **({"peak_memory_bytes": 4.5 * 2**30} if i == 20 else {})})
    mon.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 10/25 | loss 3.1 | lr 1.0e-03 | 12,345 tok/s | mfu 12.3% | mem 1.2 GiB",
        "step 20/25 | loss 3.05 | lr 1.0e-03 | 12,345 tok/s | mfu 12.3% | mem 1.2 GiB (peak 4.5 GiB)",
    ]


def test_wall_clock_breakdown_prints_and_logs_timings(tmp_path):
    stream = io.StringIO()
    mon = Monitor(tmp_path, 2, csv_monitor={"enabled": True, "job_name": "j"}, steps_per_print=2,
                  wall_clock_breakdown=True, is_writer=True, stream=stream)
    mon.log(1, {"loss": 2.0, "step_time_s": 0.5, "data_time_s": 0.001})
    mon.log(2, {"loss": 1.5, "step_time_s": 0.25, "data_time_s": 0.002})
    mon.close()
    assert stream.getvalue() == "step 2/2 | loss 1.5 | step 250.0 ms | data 2.0 ms\n"
    rows = list(csv.reader(open(tmp_path / "j" / "Trainstep_time_s.csv")))
    assert rows == [["step", "step_time_s"], ["1", "0.5"], ["2", "0.25"]]


def test_tty_progress_bar_shows_step_and_loss(tmp_path):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    stream = TTY()
    mon = Monitor(tmp_path, 4, steps_per_print=2, is_writer=True, stream=stream)
    for i, loss in enumerate(LOSSES, start=1):
        mon.log(i, {"loss": loss, "tokens_per_s": 5000.0})
    mon.close()
    text = stream.getvalue()
    assert "4/4" in text and "loss 3 | 5,000 tok/s" in text
    assert "step 2/4 |" not in text  # no plain lines in TTY mode


def test_append_keeps_previous_lines_fresh_run_truncates(tmp_path):
    for start, append in ((1, False), (3, True), (5, False)):
        with Monitor(tmp_path, 6, csv_monitor={"enabled": True, "job_name": "c"}, is_writer=True, append=append,
                     stream=io.StringIO()) as mon:
            mon.log(start, {"loss": 1.0})
            mon.log(start + 1, {"loss": 0.5})
        steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        csv_steps = [int(r[0]) for r in list(csv.reader(open(tmp_path / "c" / "Trainloss.csv")))[1:]]
        assert steps == csv_steps == ([1, 2, 3, 4] if append else [start, start + 1])


def test_resume_drops_what_the_interrupted_run_logged_past_its_checkpoint(tmp_path):
    """A run that logged steps 1-6 and crashed after its step-4 checkpoint resumes at 4 and logs 5-8 again:
    metrics.jsonl, the CSV files and TensorBoard each show every step once, the new values for 5 and 6."""
    kw = dict(tensorboard={"enabled": True, "job_name": "tb"}, csv_monitor={"enabled": True, "job_name": "c"},
              is_writer=True, stream=io.StringIO())
    with Monitor(tmp_path, 8, **kw) as mon:
        for step in range(1, 7):
            mon.log(step, {"loss": float(step)})
    with Monitor(tmp_path, 8, append=True, resume_step=4, **kw) as mon:
        for step in range(5, 9):
            mon.log(step, {"loss": 10.0 + step})
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]
    jsonl = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in jsonl] == want
    rows = list(csv.reader(open(tmp_path / "c" / "Trainloss.csv")))
    assert rows[0] == ["step", "loss"] and [(int(s), float(v)) for s, v in rows[1:]] == want

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("Train/loss")] == want


def test_config_sections_validate():
    assert TensorboardConfig().job_name == "DeepSpeedJobName"
    assert CSVMonitorConfig.model_validate({"enabled": True}).enabled is True
    with pytest.raises(pydantic.ValidationError, match="output_dir"):
        TensorboardConfig.model_validate({"output_dir": "x"})
    with pytest.raises(pydantic.ValidationError, match="wandb.enabled: true is not implemented"):
        WandbConfig.model_validate({"enabled": True, "project": "p"})
    assert WandbConfig.model_validate({"enabled": False, "project": "p"}).project == "p"


def test_helpers():
    assert device_memory_bytes(jax.devices()[0]) is None  # CPU keeps no stats

    class Dev:
        def memory_stats(self):
            return {"bytes_in_use": 10, "peak_bytes_in_use": 20, "bytes_limit": 30}

    assert device_memory_bytes(Dev()) == {"bytes_in_use": 10, "peak_bytes_in_use": 20}
    assert [human_bytes(x) for x in (None, 512, 1536, 3 * 2**30)] == ["n/a", "512 B", "1.5 KiB", "3.0 GiB"]
    assert format_train_line(3, 9, {"loss": float("nan")}) == "step 3/9 | loss nan"
    # step time and host overhead are on every line, not only under wall_clock_breakdown
    assert (format_train_line(5, 9, {"loss": 1.0, "step_time_s": 0.03, "host_time_s": 0.001, "data_wait_s": 2e-4})
            == "step 5/9 | loss 1 | step 30.0 ms | host 1.0 ms")
    assert format_train_line(3, 9, {"loss": 2.0, "skipped_steps": 2.0}) == "step 3/9 | loss 2 | skipped 2"
    assert format_train_line(3, 9, {"loss": 2.0, "skipped_steps": 0.0}) == "step 3/9 | loss 2"   # none: not shown
