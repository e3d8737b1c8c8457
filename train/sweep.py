"""Hyper-parameter sweeps: a grid and/or random points over dotted config keys, run one after another.

    python -m train.sweep SWEEP.yaml [--dry-run] [--slurm] [--point I] [--report]

The sweep file::

    base: default.yaml                 # the trainer's --config, relative to this file (optional)
    output_dir: runs/my_sweep          # relative to the current directory; one sub-directory per point
    grid: {zero_optimization.stage: [1, 3], optimizer.params.lr: [1.0e-3, 3.0e-3]}
    random: {n: 4, seed: 0, params: {optimizer.params.weight_decay: {loguniform: [1.0e-4, 1.0e-1]}}}
    overrides: {train.steps: 20}       # passed to every point, not part of its name
    command: [python, -m, train.pretrain]   # default: this interpreter, -m train.pretrain
    slurm: {options: {partition: gpu, time: "01:00:00"}}   # extra #SBATCH lines for --slurm

Points are the product of the grid and the random draws (either alone is fine). Random floats are rounded to 4
significant digits so the value passed equals the value in the name. A point's name is ``key=value,...`` over
the swept keys (sanitised for file names; a name another point's values already gave once sanitised ends in a
hash of its own values); its directory is ``output_dir/<name>``; the trainer gets
``--config BASE <overrides> <point values> train.output_dir=<dir>`` with its output in ``<dir>/train.log``.

Resume: a point whose directory has summary.json is skipped, so rerunning the same command only does what is
left; a point stopped mid-run (killed, preempted) after writing checkpoints continues from them (the trainer
gets ``--resume``; the command must accept it, as train.pretrain and train.finetune do). A failed point is recorded (``<dir>/FAILED``), the sweep goes on,
and the exit code is 1 at the end.
After the points, ``output_dir/results.md`` (one row per point) and ``output_dir/loss.png`` are written.

``--slurm`` writes ``points.json`` and an array job ``sweep.sbatch`` (one point per task, ``--point
$SLURM_ARRAY_TASK_ID``) and submits it with ``sbatch`` if that is on PATH, followed by a dependent job running
``--report`` (results.md + loss.png); without sbatch it prints the commands to run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from jzero.config import apply_overrides
from jzero.errors import ConfigError, JzeroError
from train.plot import load_run, plot_losses, results_table
from train._main import ArgumentParser
from train.sweep_spec import RandomParam, RandomSpec, SlurmSpec, SweepSpec, load_sweep  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# points
# ----------------------------------------------------------------------------------------------------------
def format_value(v: Any) -> str:
    """A value as a ``key=value`` override that YAML and JSON parse back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        s = repr(v)
        mantissa, e, exp = s.partition("e")
        if e and "." not in mantissa:  # 1e-05 -> 1.0e-05: PyYAML reads 1e-05 as a string
            s = f"{mantissa}.0e{exp}"
        return s
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, str) and apply_overrides({}, [f"v={v}"])["v"] != v:
        # "", "on", "001", "null", "1:2" would reach the trainer as None, True, 1, None, 62: quoted, they stay text
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _full_name(values: dict) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in values.items())


def _hash(full: str) -> str:
    return hashlib.sha1(full.encode()).hexdigest()[:8]


def point_name(values: dict) -> str:
    """``k1=v1,k2=v2`` with file-name-unsafe characters replaced; long names end in a hash of the full one."""
    full = _full_name(values)
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", full)
    if len(name) > 150:
        name = name[:140] + "-" + _hash(full)
    return name


@dataclass
class Point:
    index: int
    name: str
    values: dict
    dir: Path
    argv: list

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "values": self.values, "dir": str(self.dir),
                "argv": self.argv}

    @classmethod
    def from_json(cls, d: dict) -> "Point":
        return cls(d["index"], d["name"], d["values"], Path(d["dir"]), list(d["argv"]))


def plan(spec: SweepSpec, sweep_file: str | Path) -> list[Point]:
    """Every point of the sweep in a stable order (grid order, then random draw order), duplicates dropped."""
    sweep_file = Path(sweep_file)
    grid = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    draws = [{}]
    if spec.random is not None:
        rng = random.Random(spec.random.seed)
        draws = [{k: p.draw(rng) for k, p in spec.random.params.items()} for _ in range(spec.random.n)]
    if spec.command is None:
        command = [sys.executable, "-m", "train.pretrain"]
    else:
        command = shlex.split(spec.command) if isinstance(spec.command, str) else list(spec.command)
    base = ["--config", str((sweep_file.parent / spec.base).resolve())] if spec.base is not None else []
    fixed = [f"{k}={format_value(v)}" for k, v in spec.overrides.items()]
    out_root = Path(spec.output_dir).resolve()
    points, seen = [], set()
    names = set()
    for g, r in itertools.product(grid, draws):
        values = {**g, **r}
        full = _full_name(values)
        if full in seen:   # the same values again (random draws repeating): run once
            continue
        seen.add(full)
        name = point_name(values)
        if name in names:   # other values, same name once sanitised (data/a and data_a): a directory of its own
            name = f"{name}-{_hash(full)}"
        names.add(name)
        pdir = out_root / name
        argv = command + base + fixed + [f"{k}={format_value(v)}" for k, v in values.items()]
        points.append(Point(len(points), name, values, pdir, argv + [f"train.output_dir={pdir}"]))
    return points


def check_points(points: list[Point], spec: SweepSpec, sweep_file: str | Path) -> dict[int, str]:
    """``{point index: one-line error}`` for the points whose trainer config is invalid (unknown key, wrong type,
    out-of-range value), checked as ``python -m train.pretrain`` would load it, before anything runs. A custom
    ``command`` has its own config rules, so its points are not checked here."""
    from jzero.config import load_config
    from train.pretrain import DEFAULT_CONFIG

    if spec.command is not None:
        return {}
    base = (Path(sweep_file).parent / spec.base).resolve() if spec.base is not None else None
    fixed = [f"{k}={format_value(v)}" for k, v in spec.overrides.items()]
    bad, owner = {}, {}
    for p in points:
        try:
            cfg = load_config(base, fixed + [f"{k}={format_value(v)}" for k, v in p.values.items()],
                              base=None if base else DEFAULT_CONFIG)
            _check_built(cfg)
            for key, directory, why, fix in _shared_dirs(cfg):
                directory = directory.expanduser().resolve()   # relative: to the trainer's (this) directory
                first = owner.setdefault((key, directory), p.index)
                if first != p.index:
                    raise ConfigError(f"{key} puts this point's files in {directory}, as it does point "
                                      f"[{first + 1}/{len(points)}]'s, and {why}; {fix}")
        except ConfigError as exc:
            bad[p.index] = str(exc)
    return bad


def _shared_dirs(cfg) -> list[tuple[str, Path, str, str]]:
    """``(key, directory, why, fix)`` for each directory the point's config names outside its ``train.output_dir``
    (base config or overrides: the same for every point): its checkpoints, and DeepSpeed's TensorBoard / CSV
    ``output_path`` (empty = the run's own directory)."""
    out = []
    if cfg.checkpoint.dir and cfg.train.checkpoint_interval:
        out.append(("checkpoint.dir", Path(cfg.checkpoint.dir), "a point's run refuses a checkpoint directory "
                    "holding another run's steps", "leave checkpoint.dir unset (each point checkpoints into its own "
                    "<dir>/checkpoints) or sweep it per point"))
    for section in ("tensorboard", "csv_monitor"):
        sec = getattr(cfg, section)
        if sec.enabled and sec.output_path:
            out.append((f"{section}.output_path", Path(sec.output_path) / sec.job_name, "each point's run would "
                        "write its curves over the earlier points' there", f'add {section}.output_path: "" to the '
                        "sweep's overrides (each point logs into its own directory)"))
    return out


def _check_built(cfg) -> None:
    """What the trainer checks at start beyond the schema, cheaply (no arrays): the optimizer's params per type
    and the schedule (jzero.optim), the model's sizes (models.build_model: heads dividing d_model, ...)."""
    from jzero.optim import build_optimizer
    from models import build_model

    build_optimizer(cfg.optimizer.model_dump(), cfg.scheduler.model_dump() if cfg.scheduler else None,
                    cfg.gradient_clipping)
    build_model(cfg.model)


def _ran_otherwise(point: Point) -> str | None:
    """For a finished point: how the command it ran (``sweep_point.json``, written when it started) differs from
    the one it would run now (the sweep file's base or overrides changed since), else None. A point finished by
    a sweep older than that file is taken as it is."""
    record = point.dir / "sweep_point.json"
    if not (is_done(point) and record.is_file()):
        return None
    ran = json.loads(record.read_text()).get("argv", [])[1:]   # [0]: the interpreter, which may differ
    now = point.argv[1:]
    if ran == now:
        return None
    had, gives = [a for a in ran if a not in now], [a for a in now if a not in ran]
    return f"it ran {' '.join(had) or '(nothing more)'} where this file gives {' '.join(gives) or '(nothing more)'}"


def is_done(point: Point) -> bool:
    return (point.dir / "summary.json").is_file()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _checkpoint_dir(point: Point) -> Path:
    """The point's checkpoint directory: a ``checkpoint.dir=`` it passes, else ``<dir>/checkpoints`` (the
    trainers' default; a ``checkpoint.dir`` in the base config is not seen here, so such a point never resumes)."""
    given = [a.split("=", 1)[1] for a in point.argv if a.startswith("checkpoint.dir=")]
    return Path(given[-1]) if given else point.dir / "checkpoints"


def resumes(point: Point) -> bool:
    """Whether an unfinished point continues its earlier attempt (``--resume``): that attempt ran the same command
    (``sweep_point.json``) and left checkpoint steps. Without it a point killed mid-run (preempted, a time limit,
    Ctrl-C) after a checkpoint could never finish: the trainer refuses a fresh run into a checkpoint directory
    that holds steps, so every rerun of the sweep would fail it again."""
    record = point.dir / "sweep_point.json"
    if is_done(point) or not record.is_file():
        return False
    if json.loads(record.read_text()).get("argv", [])[1:] != point.argv[1:]:
        return False   # other settings: the trainer's own refusal names the directory and the fix
    ckpt = _checkpoint_dir(point)
    if not ckpt.resolve().is_relative_to(point.dir.resolve()):
        return False   # a directory outside the point's may hold another point's steps: never continue those
    from jzero import checkpoint

    return bool(checkpoint.steps(ckpt))


def run_point(point: Point, resume: Optional[bool] = None) -> str:
    """Run one point's trainer (output to <dir>/train.log, appended to when it resumes an earlier attempt:
    ``resume``, default :func:`resumes`); returns 'done' or 'failed (...)'."""
    resume = resumes(point) if resume is None else resume
    point.dir.mkdir(parents=True, exist_ok=True)
    (point.dir / "sweep_point.json").write_text(json.dumps({"argv": point.argv}))
    marker = point.dir / "FAILED"
    marker.unlink(missing_ok=True)
    log_path = point.dir / "train.log"
    with open(log_path, "a" if resume else "w") as log:
        try:
            rc = subprocess.run(point.argv + (["--resume"] if resume else []), stdout=log,
                                stderr=subprocess.STDOUT, env=_env()).returncode
        except OSError as e:
            rc, why = None, f"failed (cannot start {point.argv[0]}: {e.strerror})"
    if rc is not None:
        why = "done" if rc == 0 and is_done(point) else (
            f"failed (exit {rc})" if rc != 0 else "failed (exit 0 but no summary.json)")
    if why != "done":
        marker.write_text(why + "\n")
    return why


def _tail(path: Path, n: int = 5) -> str:
    lines = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []
    return "\n".join("    " + line for line in lines)


def status_of(point: Point) -> str:
    """A point's state from its directory: done / failed (...) / not run."""
    if is_done(point):
        return "done"
    marker = point.dir / "FAILED"
    return marker.read_text().strip() if marker.exists() else "not run"


def write_report(points: Sequence[Point], out_root: Path, statuses: Sequence[str], title: str) -> Path:
    """results.md (one row per point) and loss.png (all curves) in out_root."""
    out_root.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p.dir, p.name) for p in points]
    keys = list(points[0].values) if points else []
    table = results_table(runs, keys, [p.values for p in points], statuses)
    path = out_root / "results.md"
    path.write_text(f"# {title}\n\n{table}")
    try:
        plot_losses([r for r in runs if r.metrics], out_root / "loss.png", title=title)
    except JzeroError as e:
        print(f"loss.png skipped: {e}")
    return path


# ----------------------------------------------------------------------------------------------------------
# slurm
# ----------------------------------------------------------------------------------------------------------
def write_slurm(points: Sequence[Point], spec: SweepSpec, sweep_file: Path, out_root: Path) -> Path:
    """points.json + an sbatch array script (task i runs ``--point i``); returns the script path."""
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "points.json").write_text(json.dumps([p.to_json() for p in points], indent=1) + "\n")
    py = shlex.quote(sys.executable)
    lines = ["#!/bin/bash", "#SBATCH --job-name=jzero-sweep", f"#SBATCH --array=0-{len(points) - 1}",
             f"#SBATCH --output={out_root}/slurm-%A_%a.out"]
    lines += [f"#SBATCH --{k.lstrip('-')}={v}" for k, v in spec.slurm.options.items()]
    lines += ["", f"cd {shlex.quote(os.getcwd())}",
              f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
              f"exec {py} -m train.sweep {shlex.quote(str(sweep_file.resolve()))} --point $SLURM_ARRAY_TASK_ID", ""]
    script = out_root / "sweep.sbatch"
    script.write_text("\n".join(lines))
    return script


def submit_slurm(script: Path, sweep_file: Path, out_root: Path) -> int:
    report = (f"cd {shlex.quote(os.getcwd())} && PYTHONPATH={shlex.quote(str(REPO_ROOT))} "
              f"{shlex.quote(sys.executable)} -m train.sweep {shlex.quote(str(sweep_file.resolve()))} --report")
    if shutil.which("sbatch") is None:
        print(f"sbatch not found on PATH; submit with:\n  sbatch {script}\nand when the array has finished:\n"
              f"  {report}")
        return 0
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if sub.returncode != 0:
        raise JzeroError(f"sbatch {script} failed: {sub.stderr.strip() or sub.stdout.strip()}")
    job = sub.stdout.strip().split(";")[0]
    rep = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", "--job-name=jzero-sweep-report",
                          f"--output={out_root}/slurm-report-%j.out", f"--wrap={report}"],
                         capture_output=True, text=True)
    if rep.returncode != 0:
        raise JzeroError(f"sbatch (report job) failed: {rep.stderr.strip()}; run later: {report}")
    print(f"submitted array job {job} and report job {rep.stdout.strip().split(';')[0]} ({script})")
    return 0


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(prog="python -m train.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="sweep YAML file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the points and commands, run nothing")
    mode.add_argument("--slurm", action="store_true", help="write and submit a SLURM array job instead")
    mode.add_argument("--point", type=int, metavar="I", help="run point I of output_dir/points.json (SLURM task)")
    mode.add_argument("--report", action="store_true", help="only (re)write results.md and loss.png")
    args = ap.parse_args(argv)

    spec = load_sweep(args.sweep)
    points = plan(spec, args.sweep)
    out_root = Path(spec.output_dir).resolve()
    title = f"sweep {args.sweep.name}"

    asked = math.prod(len(v) for v in spec.grid.values()) * (spec.random.n if spec.random is not None else 1)
    if len(points) < asked:
        print(f"note: {asked} grid points x random draws gave {len(points)} distinct points (repeats run once)")
    bad = check_points(points, spec, args.sweep) if not args.report else {}
    stale = {p.index: why for p in points if not args.report and (why := _ran_otherwise(p))}
    if stale:
        first = min(stale)
        raise ConfigError(f"{args.sweep}: {len(stale)} finished points in {out_root} ran other settings than this "
                          f"sweep file gives, first {points[first].name}: {stale[first]}; set output_dir to a new "
                          "directory (or delete those points) to run them again")
    if args.dry_run:
        for p in points:
            state = f"invalid: {bad[p.index]}" if p.index in bad else "done, would skip" if is_done(p) else "would run"
            print(f"[{p.index + 1}/{len(points)}] {p.name} ({state})\n    {shlex.join(p.argv)}")
    if bad:
        first = min(bad)
        raise ConfigError(f"{args.sweep}: {len(bad)} of {len(points)} points have an invalid config, first "
                          f"[{first + 1}/{len(points)}] {points[first].name}: {bad[first]}")
    if args.dry_run:
        return 0
    if args.slurm:
        return submit_slurm(write_slurm(points, spec, args.sweep, out_root), args.sweep, out_root)
    if args.point is not None:
        index_file = out_root / "points.json"
        if not index_file.is_file():
            raise ConfigError(f"{index_file} not found; it is written by --slurm, run that first")
        saved = [Point.from_json(d) for d in json.loads(index_file.read_text())]
        if not 0 <= args.point < len(saved):
            raise ConfigError(f"--point {args.point} out of range; {index_file} has points 0..{len(saved) - 1}")
        p = saved[args.point]
        status = "done" if is_done(p) else run_point(p)
        print(f"{p.name}: {status}")
        return 0 if status == "done" else 1
    if args.report:
        path = write_report(points, out_root, [status_of(p) for p in points], title)
        print(f"wrote {path}")
        return 0

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "points.json").write_text(json.dumps([p.to_json() for p in points], indent=1) + "\n")
    statuses = []
    for p in points:
        head = f"[{p.index + 1}/{len(points)}] {p.name}"
        if is_done(p):
            statuses.append("done")
            print(f"{head}: done earlier, skipped", flush=True)
            continue
        resume = resumes(p)
        print(f"{head}: {'resuming its earlier attempt (--resume)' if resume else 'running'}, log in "
              f"{p.dir / 'train.log'}", flush=True)
        status = run_point(p, resume)
        statuses.append(status)
        print(f"{head}: {status}" + ("" if status == "done" else f", see {p.dir / 'train.log'}:\n"
                                     f"{_tail(p.dir / 'train.log')}"), flush=True)
    path = write_report(points, out_root, statuses, title)
    failed = [p.name for p, s in zip(points, statuses) if s != "done"]
    print(f"wrote {path}" + (f"; {len(failed)} of {len(points)} points failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from train._main import exit_with

    exit_with(main)
