"""jzero.monitor: JSONL / CSV / TensorBoard contents (DeepSpeed's events, names, files and x axis), writer-only
output, console lines, resume trimming, config sections."""
import csv
import io
import json
import os

import jax
import pydantic
import pytest

from jzero.monitor import (CSVMonitorConfig, Monitor, TensorboardConfig, WandbConfig, device_memory_bytes,
                           format_train_line, human_bytes)

LOSSES = [4.0, 3.5, 3.25, 3.0]
TBS = 8   # train_batch_size: DeepSpeed's global_samples after step k is k * TBS


def _log_four(mon):
    for i, loss in enumerate(LOSSES, start=1):
        mon.log(i, {"loss": loss, "lr": 1e-3 * i, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": None,
                    "loss_scale": 2.0 ** (16 - i), "step_time_s": 0.25, "data_wait_s": 0.01})
    mon.log_eval(4, {"eval_loss": 3.1, "eval_ppl": 22.2})
    mon.summary({"final_loss": 3.0, "steps": 4})
    mon.close()


def _deepspeed_csv_monitor(log_dir, event_list):
    """deepspeed/monitor/csv_monitor.py ``csvMonitor.write_events``, as it is there (less the rank check): the
    reference the CSV files are compared with byte for byte."""
    filenames = []
    for event in event_list:
        log_name, value, step = event
        if "/" in log_name:
            record_splits = log_name.split("/")
            header = record_splits[len(record_splits) - 1]
        else:
            header = log_name
        filename = log_name.replace("/", "_").replace(" ", "_")
        fname = str(log_dir) + "/" + filename + ".csv"
        with open(fname, "a+") as csv_monitor_file:
            csv_monitor_writer = csv.writer(csv_monitor_file)
            if filename not in filenames:
                filenames.append(filename)
                csv_monitor_writer.writerow(["step", header])
            csv_monitor_writer.writerow([step, value])


def _deepspeed_events(fp16=False, timings=False):
    """What deepspeed/runtime/engine.py writes for `_log_four`'s steps: train_loss in backward() at global_samples
    before the step, lr (and loss_scale under fp16) in step() after it; plus jzero's own metrics, at x = after."""
    events = []
    for k, loss in enumerate(LOSSES, start=1):
        events += [("Train/Samples/train_loss", loss, (k - 1) * TBS), ("Train/Samples/lr", 1e-3 * k, k * TBS)]
        if fp16:
            events.append(("Train/Samples/loss_scale", 2.0 ** (16 - k), k * TBS))
        events += [("jzero/Train/Samples/grad_norm", 0.5, k * TBS),
                   ("jzero/Train/Samples/tokens_per_s", 12345.6, k * TBS)]
        if timings:
            events += [("jzero/Train/Samples/step_time_s", 0.25, k * TBS),
                       ("jzero/Train/Samples/data_wait_s", 0.01, k * TBS)]
    # eval: DeepSpeed's PipelineEngine.eval_batch writes Train/Samples/eval_loss at global_samples
    return events + [("Train/Samples/eval_loss", 3.1, 4 * TBS), ("jzero/Eval/Samples/eval_ppl", 22.2, 4 * TBS)]


def _tb_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _by_tag(events):
    out = {}
    for tag, v, x in events:
        out.setdefault(tag, []).append((x, pytest.approx(v, rel=1e-6)))   # (TensorBoard keeps float32)
    return out


@pytest.mark.parametrize("fp16,timings", [(False, False), (True, True)])
def test_tensorboard_and_csv_write_deepspeeds_events(tmp_path, fp16, timings):
    out = tmp_path / "run"
    mon = Monitor(out, 4, tensorboard={"enabled": True, "job_name": "tb"},
                  csv_monitor={"enabled": True, "output_path": str(tmp_path / "csvs"), "job_name": "job"},
                  steps_per_print=100, wall_clock_breakdown=timings, train_batch_size=TBS, fp16=fp16,
                  is_writer=True, stream=io.StringIO())
    _log_four(mon)

    # metrics.jsonl: every metric (timings, loss_scale included) at the optimizer step, whatever the monitors take
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lines[:4]] == LOSSES
    assert lines[1] == {"step": 2, "loss": 3.5, "lr": 2e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": None,
                        "loss_scale": 2.0 ** 14, "step_time_s": 0.25, "data_wait_s": 0.01}
    assert lines[4] == {"step": 4, "eval_loss": 3.1, "eval_ppl": 22.2}
    assert json.loads((out / "summary.json").read_text()) == {"final_loss": 3.0, "steps": 4}

    want = _deepspeed_events(fp16=fp16, timings=timings)
    # CSV: <output_path>/<job_name>/, byte for byte what DeepSpeed's csvMonitor writes for the same events
    csv_dir, ref = tmp_path / "csvs" / "job", tmp_path / "deepspeed_csv"
    ref.mkdir()
    _deepspeed_csv_monitor(ref, want)
    assert sorted(os.listdir(csv_dir)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert (csv_dir / name).read_bytes() == (ref / name).read_bytes(), name
    # spelled out once: file name = tag with '/' -> '_', header step,<last part>, csv.writer's \r\n, x = samples
    assert (csv_dir / "Train_Samples_train_loss.csv").read_bytes() == \
        b"step,train_loss\r\n0,4.0\r\n8,3.5\r\n16,3.25\r\n24,3.0\r\n"
    assert (csv_dir / "Train_Samples_lr.csv").read_bytes() == \
        b"step,lr\r\n8,0.001\r\n16,0.002\r\n24,0.003\r\n32,0.004\r\n"
    assert (csv_dir / "Train_Samples_eval_loss.csv").read_bytes() == b"step,eval_loss\r\n32,3.1\r\n"
    assert (csv_dir / "Train_Samples_loss_scale.csv").exists() == fp16      # DeepSpeed: fp16 only
    assert not list(csv_dir.glob("*mfu*"))                                  # None is not a scalar
    assert (csv_dir / "jzero_Train_Samples_data_wait_s.csv").exists() == timings   # wall_clock_breakdown only
    assert (csv_dir / "jzero_Train_Samples_step_time_s.csv").exists() == timings

    # TensorBoard: empty output_path -> under the run's output_dir; the same events, tag for tag, x = event step
    assert _tb_scalars(out / "tb") == _by_tag(want)


def test_default_batch_size_puts_the_optimizer_step_on_x(tmp_path):
    with Monitor(tmp_path, 2, csv_monitor={"enabled": True, "job_name": "c"}, is_writer=True,
                 stream=io.StringIO()) as mon:
        mon.log(1, {"loss": 2.0, "lr": 0.5, "loss_scale": 1.0})
        mon.log(2, {"loss": 1.0, "lr": 0.5, "loss_scale": 1.0})
    assert (tmp_path / "c" / "Train_Samples_train_loss.csv").read_bytes() == b"step,train_loss\r\n0,2.0\r\n1,1.0\r\n"
    assert (tmp_path / "c" / "Train_Samples_lr.csv").read_bytes() == b"step,lr\r\n1,0.5\r\n2,0.5\r\n"
    assert sorted(os.listdir(tmp_path / "c")) == ["Train_Samples_lr.csv", "Train_Samples_train_loss.csv"]
    with pytest.raises(ValueError, match="train_batch_size"):
        Monitor(tmp_path, 2, train_batch_size=0, is_writer=True)


def test_event_tags_never_shadow_deepspeeds():
    mon = Monitor("unused", 1, train_batch_size=4, fp16=True, is_writer=False)
    # finetune's eval record carries train_loss / val_loss: they stay in jzero's namespace
    ev = mon.eval_events(3, {"epoch": 1, "train_loss": 0.5, "val_loss": 0.7, "accuracy": 0.9, "step_time_s": 1.0})
    assert ev == [("jzero/Eval/Samples/epoch", 1, 12), ("jzero/Eval/Samples/train_loss", 0.5, 12),
                  ("jzero/Eval/Samples/val_loss", 0.7, 12), ("jzero/Eval/Samples/accuracy", 0.9, 12)]
    tr = mon.train_events(3, {"loss": 1.5, "lr": 0.1, "loss_scale": 8.0, "skipped_steps": 0.0, "queue_wait_s": 0.2,
                              "host_time_s": 0.1, "mfu": None, "note": "x"})
    assert tr == [("Train/Samples/train_loss", 1.5, 8), ("Train/Samples/lr", 0.1, 12),
                  ("Train/Samples/loss_scale", 8.0, 12), ("jzero/Train/Samples/skipped_steps", 0.0, 12)]


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
    rows = list(csv.reader(open(tmp_path / "j" / "jzero_Train_Samples_step_time_s.csv", newline="")))
    assert rows == [["step", "step_time_s"], ["1", "0.5"], ["2", "0.25"]]
    assert sorted(os.listdir(tmp_path / "j")) == ["Train_Samples_train_loss.csv", "jzero_Train_Samples_data_time_s.csv",
                                                  "jzero_Train_Samples_step_time_s.csv"]


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


def test_append_continues_and_a_fresh_run_adds_its_own_header_never_truncating(tmp_path):
    """metrics.jsonl restarts with a fresh run (the mains move an earlier run's aside first: jzero.rundir); the CSV
    files, which a directory shared by runs may hold, are appended to as DeepSpeed's csvMonitor does."""
    header = ["step", "train_loss"]
    for start, append in ((1, False), (3, True), (5, False)):
        with Monitor(tmp_path, 6, csv_monitor={"enabled": True, "job_name": "c"}, is_writer=True, append=append,
                     train_batch_size=2, stream=io.StringIO()) as mon:
            mon.log(start, {"loss": 1.0})
            mon.log(start + 1, {"loss": 0.5})
        steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        rows = list(csv.reader(open(tmp_path / "c" / "Train_Samples_train_loss.csv", newline="")))
        assert steps == ([1, 2, 3, 4] if append else [start, start + 1])
        if start < 5:   # the resumed run continued the first run's file without a second header
            assert rows[0] == header and header not in rows[1:]
            assert [int(r[0]) for r in rows[1:]] == [2 * (s - 1) for s in steps]
    assert rows == [header, ["0", "1.0"], ["2", "0.5"], ["4", "1.0"], ["6", "0.5"], header, ["8", "1.0"],
                    ["10", "0.5"]]


def _train(step, run):
    return {"loss": 10.0 * run + step, "lr": 0.01 * step, "grad_norm": float(run)}


def test_resume_drops_what_the_interrupted_run_logged_past_its_checkpoint(tmp_path):
    """A run logs steps 1-6 (eval at 4 and 6) and crashes after its step-4 checkpoint; the second resumes at 4,
    logs 5-7 (eval at 6) and crashes after its step-6 checkpoint; the third resumes at 6 and logs 7-8 (eval at 8).
    metrics.jsonl, the CSV files and TensorBoard each show every step once, with the values of the run that kept
    it, on DeepSpeed's x axis (train_loss at (k-1)*S, the rest at k*S)."""
    S = 4
    kw = dict(tensorboard={"enabled": True, "job_name": "tb"}, csv_monitor={"enabled": True, "job_name": "c"},
              train_batch_size=S, is_writer=True, stream=io.StringIO())
    for run, (first, last, evals, resume) in enumerate(((1, 6, (4, 6), None), (5, 7, (6,), 4), (7, 8, (8,), 6))):
        with Monitor(tmp_path, 8, append=resume is not None, resume_step=resume, **kw) as mon:
            for step in range(first, last + 1):
                mon.log(step, _train(step, run))
                if step in evals:
                    mon.log_eval(step, {"eval_loss": 100.0 * run + step})
    owner = {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 2, 8: 2}   # the run whose values each step keeps
    evals = {4: 0, 6: 1, 8: 2}
    jsonl = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want_jsonl = []
    for k in range(1, 9):
        want_jsonl.append({"step": k, **_train(k, owner[k])})
        if k in evals:
            want_jsonl.append({"step": k, "eval_loss": 100.0 * evals[k] + k})
    assert jsonl == want_jsonl

    want = {"Train/Samples/train_loss": [((k - 1) * S, _train(k, owner[k])["loss"]) for k in range(1, 9)],
            "Train/Samples/lr": [(k * S, _train(k, owner[k])["lr"]) for k in range(1, 9)],
            "jzero/Train/Samples/grad_norm": [(k * S, float(owner[k])) for k in range(1, 9)],
            "Train/Samples/eval_loss": [(k * S, 100.0 * r + k) for k, r in evals.items()]}
    for tag, rows in want.items():   # (trimming keeps csv.writer's \r\n)
        name = tag.replace("/", "_") + ".csv"
        assert (tmp_path / "c" / name).read_bytes() == \
            ("step," + tag.split("/")[-1] + "\r\n" + "".join(f"{x},{v!r}\r\n" for x, v in rows)).encode(), name
    assert _tb_scalars(tmp_path / "tb") == {t: [(x, pytest.approx(v, rel=1e-6)) for x, v in rows]
                                            for t, rows in want.items()}


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


def test_a_resume_trims_only_its_own_runs_csv_rows(tmp_path):
    """An earlier run's rows (above the resumed run's header in a shared CSV directory) survive the resume's trim
    of the rows past its checkpoint, even where their steps are higher."""
    csv_cfg = {"enabled": True, "job_name": "c"}
    for start, n, append, resume in ((1, 6, False, None), (1, 4, False, None), (3, 2, True, 2)):
        with Monitor(tmp_path, 6, csv_monitor=csv_cfg, is_writer=True, append=append, resume_step=resume,
                     train_batch_size=1, stream=io.StringIO()) as mon:
            for s in range(start, start + n):
                mon.log(s, {"loss": float(s)})
    rows = list(csv.reader(open(tmp_path / "c" / "Train_Samples_train_loss.csv", newline="")))
    header = ["step", "train_loss"]
    first = [[str(s - 1), f"{float(s)}"] for s in range(1, 7)]     # run 1, steps 1-6, kept whole
    second = [[str(s - 1), f"{float(s)}"] for s in range(1, 5)]    # run 2: 1-2 kept, 3-4 logged again by run 3
    assert rows == [header] + first + [header] + second


def test_wall_clock_breakdown_line_shows_every_part_of_host_time(tmp_path):
    """The loop's host split: data wait + place + log + dispatch = host. The data wait (``data_wait_s``) and the
    queue wait were left off the line (host 12 ms beside parts summing to 9 ms)."""
    stream = io.StringIO()
    mon = Monitor(tmp_path, 4, steps_per_print=4, wall_clock_breakdown=True, is_writer=True, stream=stream)
    mon.log(4, {"loss": 1.0, "step_time_s": 0.02, "data_wait_s": 0.003, "place_time_s": 0.001, "log_time_s": 0.001,
                "dispatch_time_s": 0.007, "queue_wait_s": 0.004, "host_time_s": 0.012})
    mon.close()
    assert stream.getvalue() == ("step 4/4 | loss 1 | step 20.0 ms | host 12.0 ms | data wait 3.0 ms | place 1.0 ms | "
                                 "log 1.0 ms | dispatch 7.0 ms | queue wait 4.0 ms\n")


def test_steps_per_print_counts_steps_not_logged_steps(tmp_path, capsys):
    """The loop logs every train.log_interval steps; steps_per_print=6 with an interval of 4 printed at 12 and 24
    only (common multiples). Now each multiple of 6 prints the first logged step at or past it; a resumed run
    counts from its resume step."""
    mon = Monitor(tmp_path, 30, steps_per_print=6, is_writer=True)
    for i in (*range(4, 30, 4), 30):
        mon.log(i, {"loss": 1.0})
    mon.close()
    assert [line.split(" |")[0] for line in capsys.readouterr().out.splitlines()] == [
        "step 8/30", "step 12/30", "step 20/30", "step 24/30", "step 30/30"]
    mon = Monitor(tmp_path, 30, steps_per_print=6, is_writer=True, append=True, resume_step=12)
    for i in (16, 20):
        mon.log(i, {"loss": 1.0})
    mon.close()
    assert [line.split(" |")[0] for line in capsys.readouterr().out.splitlines()] == ["step 20/30"]
