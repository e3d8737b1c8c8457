"""train.sweep: grid/random points, names, resume, failures, results.md/loss.png, SLURM script; fake trainer."""
import json
import os
import stat
import sys
import textwrap

import pytest

from jzero.errors import ConfigError
from train.sweep import format_value, load_sweep, main, plan, point_name

# A stand-in for train.pretrain: parses --config and key=value, writes the files the real one writes.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, yaml
    args = sys.argv[1:]
    assert args[0] == "--config" and os.path.isfile(args[1]), args
    resume = args[-1] == "--resume"
    kv = dict(a.split("=", 1) for a in args[2:len(args) - resume])
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({**kv, "--resume": True} if resume else kv) + "\\n")
    if kv.get("train.fail") == "true":
        print("boom: told to fail"); sys.exit(3)
    out = kv["train.output_dir"]
    ckpt = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt) and os.listdir(ckpt) and not resume:   # as train.pretrain refuses
        print("error: checkpoint directory already holds steps; pass --resume"); sys.exit(2)
    if kv.get("train.killed_after_step") and not resume:   # a checkpoint at step 1, then SIGKILL
        os.makedirs(os.path.join(ckpt, "1")); sys.exit(137)
    os.makedirs(out, exist_ok=True)
    stage = int(kv.get("zero_optimization.stage", 0))
    lr = float(kv.get("optimizer.params.lr", 1.0))
    steps = int(kv["train.steps"])
    final = None
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            final = 10.0 / s + stage + 100 * lr
            f.write(json.dumps({"step": s, "loss": final, "tokens_per_s": 1000.0 * (stage + 1)}) + "\\n")
    json.dump({k: yaml.safe_load(v) for k, v in kv.items()}, open(os.path.join(out, "config.json"), "w"))
    json.dump({"final_loss": final, "steps": steps, "tokens_per_s": 1000.0 * (stage + 1), "mfu": None,
               "n_devices": 8, "zero_stage": stage,
               "memory_per_device_bytes": {"params": 1024 * 1024, "opt_state": 2 * 1024 * 1024},
               "peak_memory_bytes": None}, open(os.path.join(out, "summary.json"), "w"))
""")


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    (tmp_path / "base.yaml").write_text("train: {steps: 100}\n")
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_sweep(d, grid, extra=""):
    text = textwrap.dedent(f"""
        base: base.yaml
        output_dir: out
        command: [{sys.executable}, {d / 'fake_trainer.py'}]
        overrides: {{train.steps: 3}}
        grid: {json.dumps(grid)}
    """) + extra
    (d / "sweep.yaml").write_text(text)
    return d / "sweep.yaml"


def _calls(d):
    p = d / "calls.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def test_grid_runs_all_points_writes_table_and_plot_then_resumes(sweep_dir, capsys):
    sweep = _write_sweep(sweep_dir, {"zero_optimization.stage": [1, 3], "optimizer.params.lr": [1e-3, 3e-3]})
    assert main([str(sweep)]) == 0
    calls = _calls(sweep_dir)
    assert len(calls) == 4
    first_dir = sweep_dir / "out" / "zero_optimization.stage=1,optimizer.params.lr=0.001"
    assert calls[0] == {"train.steps": "3", "zero_optimization.stage": "1", "optimizer.params.lr": "0.001",
                        "train.output_dir": str(first_dir)}
    table = (sweep_dir / "out" / "results.md").read_text().splitlines()
    rows = [l for l in table if l.startswith("| zero_optimization")]
    assert len(rows) == 4
    assert table[2] == ("| run | zero_optimization.stage | optimizer.params.lr | final_loss | tokens/s | mfu "
                        "| memory/device | status |")
    # stage 3, lr 3e-3: loss 10/3 + 3 + 0.3 = 6.6333; 4000 tok/s; 1 MiB + 2 MiB
    assert rows[3] == ("| zero_optimization.stage=3,optimizer.params.lr=0.003 | 3 | 0.003 | 6.6333 | 4,000 | n/a "
                       "| 3.0 MiB | done |")
    png = (sweep_dir / "out" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # re-run: every point has summary.json -> nothing is invoked again
    assert main([str(sweep)]) == 0
    assert len(_calls(sweep_dir)) == 4
    assert capsys.readouterr().out.count("done earlier, skipped") == 4

    # one point lost its summary: only that one reruns
    (sweep_dir / "out" / "zero_optimization.stage=1,optimizer.params.lr=0.003" / "summary.json").unlink()
    assert main([str(sweep)]) == 0
    assert len(_calls(sweep_dir)) == 5 and _calls(sweep_dir)[-1]["optimizer.params.lr"] == "0.003"


def test_failed_point_is_reported_and_sweep_goes_on(sweep_dir, capsys):
    sweep = _write_sweep(sweep_dir, {"train.fail": [True, False]})
    assert main([str(sweep)]) == 1
    assert len(_calls(sweep_dir)) == 2  # the failure did not stop the second point
    out = capsys.readouterr().out
    assert "train.fail=true: failed (exit 3)" in out and "boom: told to fail" in out
    assert "1 of 2 points failed: train.fail=true" in out
    table = (sweep_dir / "out" / "results.md").read_text()
    assert "| train.fail=true | true | n/a | n/a | n/a | n/a | failed (exit 3) |" in table
    assert "| train.fail=false | false | 103.3333 | 1,000 | n/a | 3.0 MiB | done |" in table
    # a rerun retries only the failed point
    assert main([str(sweep)]) == 1
    assert len(_calls(sweep_dir)) == 3


def test_a_point_killed_after_a_checkpoint_resumes_from_it(sweep_dir, capsys):
    """A point killed mid-run (preempted, a time limit) left checkpoint steps: a rerun of the sweep passes the trainer
    --resume instead of starting it fresh into that directory, which the trainer refuses (every rerun failed)."""
    sweep = _write_sweep(sweep_dir, {"train.killed_after_step": [1]})
    assert main([str(sweep)]) == 1
    assert "train.killed_after_step=1: failed (exit 137)" in capsys.readouterr().out
    assert main([str(sweep)]) == 0
    assert "train.killed_after_step=1: resuming its earlier attempt (--resume)" in capsys.readouterr().out
    calls = _calls(sweep_dir)
    assert len(calls) == 2 and "--resume" not in calls[0] and calls[1]["--resume"] is True
    point = sweep_dir / "out" / "train.killed_after_step=1"
    assert (point / "summary.json").is_file() and not (point / "FAILED").exists()
    # a point whose earlier attempt ran other settings is not resumed: the trainer's refusal stands
    (point / "summary.json").unlink()
    sweep.write_text(sweep.read_text().replace("train.steps: 3", "train.steps: 4"))
    assert main([str(sweep)]) == 1 and "--resume" not in _calls(sweep_dir)[-1]


def test_a_checkpoint_dir_shared_by_points_is_refused_and_never_resumed(sweep_dir, tmp_path):
    """overrides: {checkpoint.dir: X} gives every point one checkpoint directory: the trainer refused each point
    after the first (X holds its steps), and a rerun must never --resume a point from another point's steps."""
    from train.sweep import Point, resumes

    (sweep_dir / "sweep.yaml").write_text("base: base.yaml\noutput_dir: out\ngrid: {zero_optimization.stage: [1, 3]}\n"
                                          "overrides: {checkpoint.dir: ck, train.checkpoint_interval: 5}\n")
    with pytest.raises(ConfigError) as e:
        main([str(sweep_dir / "sweep.yaml"), "--dry-run"])
    assert "1 of 2 points have an invalid config, first [2/2] zero_optimization.stage=3: checkpoint.dir puts this " \
           f"point's files in {sweep_dir / 'ck'}, as it does point [1/2]'s" in str(e.value)
    for ckpt_arg, expected in (([], True), ([f"checkpoint.dir={tmp_path / 'shared'}"], False)):
        point = Point(0, "p", {}, tmp_path / "p", ["python", "t.py"] + ckpt_arg)
        point.dir.mkdir(exist_ok=True)
        (point.dir / "sweep_point.json").write_text(json.dumps({"argv": point.argv}))
        for d in (point.dir / "checkpoints" / "4", tmp_path / "shared" / "4"):
            d.mkdir(parents=True, exist_ok=True)
        assert resumes(point) is expected


def test_a_csv_or_tensorboard_path_shared_by_points_is_refused(sweep_dir, capsys):
    """DeepSpeed's csv_monitor / tensorboard output_path in the base config is one directory for every point: each
    point's CSV files were truncated by the next point's run. Refused, naming the override that fixes it."""
    (sweep_dir / "base.yaml").write_text("csv_monitor: {enabled: true, output_path: csv_logs, job_name: j}\n")
    sweep = sweep_dir / "sweep.yaml"
    sweep.write_text("base: base.yaml\noutput_dir: out\ngrid: {zero_optimization.stage: [1, 3]}\n")
    with pytest.raises(ConfigError) as e:
        main([str(sweep), "--dry-run"])
    assert f"csv_monitor.output_path puts this point's files in {sweep_dir / 'csv_logs' / 'j'}, as it does point " \
           "[1/2]'s, and each point's run would write its curves over the earlier points' there; add " \
           'csv_monitor.output_path: "" to the sweep\'s overrides' in str(e.value)
    capsys.readouterr()
    sweep.write_text(sweep.read_text() + 'overrides: {csv_monitor.output_path: ""}\n')
    assert main([str(sweep), "--dry-run"]) == 0 and capsys.readouterr().out.count("would run") == 2


def test_dry_run_runs_nothing(sweep_dir, capsys):
    sweep = _write_sweep(sweep_dir, {"zero_optimization.stage": [1, 3]})
    assert main([str(sweep), "--dry-run"]) == 0
    assert _calls(sweep_dir) == [] and not (sweep_dir / "out").exists()
    out = capsys.readouterr().out
    assert out.count("would run") == 2 and "zero_optimization.stage=3 train.output_dir=" in out


def test_random_points_are_stable_and_in_range(sweep_dir):
    sweep = _write_sweep(sweep_dir, {"zero_optimization.stage": [1, 3]}, textwrap.dedent("""
        random:
          n: 3
          seed: 7
          params:
            optimizer.params.lr: {loguniform: [1e-4, 1e-2]}
            model.act: {choice: [gelu, relu]}
    """))
    spec = load_sweep(sweep)
    a, b = plan(spec, sweep), plan(spec, sweep)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 6
    for p in a:
        lr = p.values["optimizer.params.lr"]
        assert 1e-4 <= lr <= 1e-2 and float(f"{lr:.4g}") == lr
        assert p.values["model.act"] in ("gelu", "relu")
        assert p.name == point_name(p.values) and f"optimizer.params.lr={format_value(lr)}" in p.argv


def test_slurm_script_submission_and_point_task(sweep_dir, monkeypatch, capsys):
    bindir = sweep_dir / "bin"
    bindir.mkdir()
    fake_sbatch = bindir / "sbatch"
    fake_sbatch.write_text(f"#!/bin/sh\necho \"$@\" >> {sweep_dir / 'sbatch_calls.txt'}\necho 4242\n")
    fake_sbatch.chmod(fake_sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    sweep = _write_sweep(sweep_dir, {"zero_optimization.stage": [1, 3], "optimizer.params.lr": [1e-3, 3e-3]},
                         "slurm: {options: {partition: gpu, time: '01:00:00'}}\n")
    assert main([str(sweep), "--slurm"]) == 0
    script = (sweep_dir / "out" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3\n" in script and "#SBATCH --partition=gpu\n" in script
    assert "--point $SLURM_ARRAY_TASK_ID" in script
    assert len(json.loads((sweep_dir / "out" / "points.json").read_text())) == 4
    sb = (sweep_dir / "sbatch_calls.txt").read_text().splitlines()
    assert sb[0].endswith("sweep.sbatch") and "--dependency=afterany:4242" in sb[1] and "--report" in sb[1]
    assert _calls(sweep_dir) == []
    # what array task 2 does, then the report job
    assert main([str(sweep), "--point", "2"]) == 0
    assert [c["zero_optimization.stage"] for c in _calls(sweep_dir)] == ["3"]
    assert main([str(sweep), "--report"]) == 0
    table = (sweep_dir / "out" / "results.md").read_text()
    assert table.count("| not run |") == 3 and table.count("| done |") == 1


@pytest.mark.parametrize("body, message", [
    ("output_dir: o\ngrid: {a.b: []}\n", "grid.a.b has no values"),
    ("output_dir: o\ngrid: {a: [1]}\nrandom: {n: 1, params: {a: {uniform: [0, 1]}}}\n", "a appears twice"),
    ("output_dir: o\ngrid: {train.output_dir: [x]}\n", "train.output_dir is set per point"),
    ("output_dir: o\nrandom: {n: 1, params: {b: {uniform: [1, 0]}}}\n", "lo < hi"),
    ("output_dir: o\ngird: {a: [1]}\n", "gird: Extra inputs are not permitted"),
    ("output_dir: o\nbase: nope.yaml\ngrid: {a: [1]}\n", "base: .*nope.yaml does not exist"),
    ("output_dir: o\ngrid: {a: [1}\n", r"s.yaml is not valid YAML at line 2, column 13: expected ',' or ']', but got '}'"),
])
def test_bad_sweep_files_name_the_key(tmp_path, body, message):
    (tmp_path / "s.yaml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_sweep(tmp_path / "s.yaml")


def test_format_value_round_trips_through_yaml():
    import yaml

    from jzero.config import apply_overrides

    for v in (1e-5, 3e-3, 0.1, 2, True, None, "gelu", [1, 2], 1.5e20):
        assert yaml.safe_load(format_value(v)) == v
    # strings the override parser would read as another type (None, True, 1, None, 62) reach the trainer as text
    for v in ("", "on", "001", "null", "1:2", "a b", "é", ["on", "x"]):
        assert apply_overrides({}, [f"k={format_value(v)}"])["k"] == v, v
    assert format_value("gelu") == "gelu" and format_value("on") == '"on"'
    assert point_name({"a.b": "x/y z"}) == "a.b=x_y_z"


def test_values_that_sanitise_to_one_name_are_separate_points(sweep_dir, capsys):
    """data/a, data_a and "data a" all sanitise to data.path=data_a: only the first used to run, the other two
    dropped as "repeats"; each now runs, in a directory of its own."""
    sweep = _write_sweep(sweep_dir, {"data.path": ["data/a", "data_a", "data a"]})
    points = plan(load_sweep(sweep), sweep)
    assert [p.values["data.path"] for p in points] == ["data/a", "data_a", "data a"]
    assert points[0].name == "data.path=data_a" and len({p.dir for p in points}) == 3
    assert all(p.name.startswith("data.path=data_a-") for p in points[1:])
    assert main([str(sweep), "--dry-run"]) == 0 and "distinct points" not in capsys.readouterr().out


def test_shipped_example_plans_a_2x2_grid(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "configs" / "sweep_example.yaml"
    (tmp_path / "sweep_example.yaml").write_text(example.read_text())
    (tmp_path / "default.yaml").write_text("{}\n")  # stands in for the shipped configs/default.yaml
    spec = load_sweep(tmp_path / "sweep_example.yaml")
    points = plan(spec, tmp_path / "sweep_example.yaml")
    assert [p.values for p in points] == [
        {"zero_optimization.stage": s, "optimizer.params.lr": lr} for s in (1, 3) for lr in (1e-3, 3e-3)]
    assert points[0].argv[1:] == ["-m", "train.pretrain", "--config", str(tmp_path / "default.yaml"),
                                  "train.steps=20", "scheduler.params.total_num_steps=20",
                                  "scheduler.params.warmup_num_steps=4", "zero_optimization.stage=1",
                                  "optimizer.params.lr=0.001",
                                  f"train.output_dir={points[0].dir}"]


def test_dry_run_checks_every_point_as_pretrain_would_load_it(sweep_dir, capsys):
    """No custom command: each point's config is validated before anything runs (dry run or not)."""
    (sweep_dir / "sweep.yaml").write_text("base: base.yaml\noutput_dir: out\n"
                                          "grid: {zero_optimization.stage: [1, 5], optimizer.params.lr: [1e-3]}\n")
    with pytest.raises(ConfigError) as e:
        main([str(sweep_dir / "sweep.yaml"), "--dry-run"])
    assert str(e.value).startswith(f"{sweep_dir / 'sweep.yaml'}: 1 of 2 points have an invalid config, first [2/2] "
                                   "zero_optimization.stage=5,optimizer.params.lr=0.001: key "
                                   "'zero_optimization.stage' in ")
    out = capsys.readouterr().out
    assert "[1/2] zero_optimization.stage=1,optimizer.params.lr=0.001 (would run)" in out
    assert "[2/2] zero_optimization.stage=5,optimizer.params.lr=0.001 (invalid: key 'zero_optimization.stage'" in out
    with pytest.raises(ConfigError, match="1 of 2 points have an invalid config"):
        main([str(sweep_dir / "sweep.yaml")])
    assert not (sweep_dir / "out").exists() and _calls(sweep_dir) == []   # nothing ran, nothing written


def test_points_are_checked_as_the_trainer_builds_them(sweep_dir):
    """An optimizer param DeepSpeed's AdamW lacks, or heads not dividing d_model, pass the schema but fail the
    trainer at start: refused before any point runs, not after the valid ones have trained."""
    for grid, message in (({"optimizer.params.lrr": [1e-3]}, "optimizer.params.lrr: not a parameter of DeepSpeed's"),
                          ({"model.n_head": [5]}, "is not divisible by model.n_head=5")):
        (sweep_dir / "sweep.yaml").write_text(f"base: base.yaml\noutput_dir: out\ngrid: {json.dumps(grid)}\n")
        with pytest.raises(ConfigError, match=message):
            main([str(sweep_dir / "sweep.yaml"), "--dry-run"])


def test_a_finished_point_that_ran_other_settings_is_not_reused(sweep_dir):
    """The sweep file's overrides changed since its points finished (3 -> 50 steps): reusing their summary.json
    would report 3-step results as the 50-step sweep's; refused, naming what differs."""
    sweep = _write_sweep(sweep_dir, {"zero_optimization.stage": [1]})
    assert main([str(sweep)]) == 0
    sweep.write_text(sweep.read_text().replace("train.steps: 3", "train.steps: 50"))
    with pytest.raises(ConfigError) as e:
        main([str(sweep)])
    assert str(e.value) == (f"{sweep}: 1 finished points in {sweep_dir / 'out'} ran other settings than this sweep "
                            "file gives, first zero_optimization.stage=1: it ran train.steps=3 where this file gives "
                            "train.steps=50; set output_dir to a new directory (or delete those points) to run them "
                            "again")
    assert len(_calls(sweep_dir)) == 1


def test_repeated_random_draws_are_said(sweep_dir, capsys):
    sweep = _write_sweep(sweep_dir, {}, "random: {n: 4, seed: 0, params: {optimizer.params.lr: {choice: [0.001]}}}\n")
    assert main([str(sweep), "--dry-run"]) == 0
    assert "note: 4 grid points x random draws gave 1 distinct points (repeats run once)" in capsys.readouterr().out
