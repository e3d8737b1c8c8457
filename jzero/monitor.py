"""Training monitor: metrics.jsonl, DeepSpeed-style TensorBoard and CSV monitors, console progress.

One `Monitor` per process; only the writer process (process 0) touches the disk or the console, so
multi-host runs produce one set of files. What it writes, all under the run's ``output_dir``:

- ``metrics.jsonl``: one JSON object per `log` / `log_eval` call, flushed at once so a crashed run keeps its
  curve. This is the file ``train/plot.py`` and ``train/sweep.py`` read.
- TensorBoard scalars (``tensorboard.enabled``) under ``output_path/job_name`` with tags ``Train/<metric>``
  and ``Eval/<metric>``, x axis = optimizer step, written with tensorboard's own ``EventFileWriter`` (no
  torch / tensorflow needed).
- CSV files (``csv_monitor.enabled``) as DeepSpeed's ``csvMonitor`` writes them: one file per metric under
  ``output_path/job_name``, named after the tag with ``/`` removed (``Train/loss`` -> ``Trainloss.csv``),
  header ``step,<metric>``.
- ``summary.json`` (`Monitor.summary`), written atomically: its presence marks a finished run for sweeps.

DeepSpeed resolves an empty ``output_path`` against the launch directory; jzero resolves it against the run's
``output_dir`` so every run (and every sweep point) keeps its logs next to its other outputs.

Console: when the stream is a TTY a rich progress bar shows step, loss, tokens/s and ETA. Otherwise the
monitor prints one plain line every ``steps_per_print`` steps:
``step 10/100 | loss 3.21 | lr 1.0e-03 | 12,345 tok/s | mfu 12.3% | mem 1.2 GiB (peak 4.5 GiB)``.
``wall_clock_breakdown`` (DeepSpeed's key) adds the timing metrics (keys ending in ``_time_s``, e.g.
``step_time_s``, ``data_time_s``) to those prints and to the TensorBoard/CSV monitors; metrics.jsonl always
has them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO

from pydantic import model_validator

from jzero.section import Section

TIMING_SUFFIX = "_time_s"


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed config sections (the lead's jzero.config imports these)
# ----------------------------------------------------------------------------------------------------------


class TensorboardConfig(Section):
    """DeepSpeed ``tensorboard`` section. Logs go to ``output_path/job_name`` (empty path = run output_dir)."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class CSVMonitorConfig(Section):
    """DeepSpeed ``csv_monitor`` section: one CSV per metric under ``output_path/job_name``."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class WandbConfig(Section):
    """DeepSpeed ``wandb`` section: accepted only when disabled; jzero has no W&B monitor."""

    enabled: bool = False
    group: Optional[str] = None
    team: Optional[str] = None
    project: str = "deepspeed"

    @model_validator(mode="after")
    def _not_implemented(self):
        if self.enabled:
            raise ValueError(
                "wandb.enabled: true is not implemented in jzero; set it to false and use tensorboard "
                "or csv_monitor (their files can be synced to W&B with `wandb sync`)"
            )
        return self


class CometConfig(Section):
    """DeepSpeed ``comet`` section: accepted only when disabled; jzero has no Comet monitor."""

    enabled: bool = False
    samples_log_interval: int = 100
    project: Optional[str] = None
    workspace: Optional[str] = None
    api_key: Optional[str] = None
    experiment_name: Optional[str] = None
    experiment_key: Optional[str] = None
    online: Optional[bool] = None
    mode: Optional[str] = None

    @model_validator(mode="after")
    def _not_implemented(self):
        if self.enabled:
            raise ValueError(
                "comet.enabled: true is not implemented in jzero; set it to false and use tensorboard or csv_monitor"
            )
        return self


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def device_memory_bytes(device) -> Optional[dict]:
    """``{'bytes_in_use', 'peak_bytes_in_use'}`` of one device, or None where the backend keeps no stats (CPU)."""
    stats_fn = getattr(device, "memory_stats", None)
    stats = stats_fn() if stats_fn is not None else None
    if not stats or "bytes_in_use" not in stats:
        return None
    return {
        "bytes_in_use": int(stats["bytes_in_use"]),
        "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])),
    }


def human_bytes(n: Optional[float]) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'. Binary units, one decimal."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _plain(v: Any) -> Any:
    """Make a metric value JSON-friendly: jax/numpy scalars -> Python numbers, containers recursively."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"metric value {v!r} of type {type(v).__name__} is not a number, string or None")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_section(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls.model_validate(dict(value))


def format_train_line(step: int, total_steps: int, m: Mapping[str, Any], *, timings: bool = False) -> str:
    """The plain progress line printed every ``steps_per_print`` steps when stdout is not a TTY."""
    parts = [f"step {step}/{total_steps}"]
    if _is_number(m.get("loss")):
        parts.append(f"loss {m['loss']:.4g}")
    if _is_number(m.get("lr")):
        parts.append(f"lr {m['lr']:.1e}")
    if _is_number(m.get("tokens_per_s")):
        parts.append(f"{round(m['tokens_per_s']):,} tok/s")
    if _is_number(m.get("mfu")):
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if _is_number(m.get("memory_bytes")):   # in use now; the peak (the step's temporaries included) beside it
        peak = f" (peak {human_bytes(m['peak_memory_bytes'])})" if _is_number(m.get("peak_memory_bytes")) else ""
        parts.append(f"mem {human_bytes(m['memory_bytes'])}{peak}")
    shown = {"step_time_s", "host_time_s"}   # always: a host-bound loop shows as host close to step
    if _is_number(m.get("step_time_s")):
        parts.append(f"step {1000 * m['step_time_s']:.1f} ms")
    if _is_number(m.get("host_time_s")):
        parts.append(f"host {1000 * m['host_time_s']:.1f} ms")
    if _is_number(m.get("skipped_steps")) and m["skipped_steps"] > 0:   # fp16 overflow / bf16 non-finite skips
        parts.append(f"skipped {int(m['skipped_steps'])}")
    if timings:
        for k, v in m.items():
            if k.endswith(TIMING_SUFFIX) and k not in shown and _is_number(v):
                parts.append(f"{k[: -len(TIMING_SUFFIX)]} {1000 * v:.1f} ms")
    return " | ".join(parts)


class _TensorboardWriter:
    """Scalar-only TensorBoard writer on tensorboard's EventFileWriter (readable by EventAccumulator)."""

    def __init__(self, log_dir: Path):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:  # only reached when tensorboard.enabled is true
            from jzero.errors import ConfigError

            raise ConfigError(
                f"tensorboard.enabled: true needs the tensorboard package ({e}); pip install tensorboard "
                "or set tensorboard.enabled: false"
            ) from None
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer = EventFileWriter(str(log_dir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        Summary = self._summary_pb2.Summary
        summ = Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summ))
        self._writer.flush()

    def restart_at(self, step: int) -> None:
        """A resumed run: TensorBoard drops the earlier events at ``step`` and after (a SessionLog START, as
        torch's ``SummaryWriter(purge_step=...)`` writes), so the steps logged again are not shown twice."""
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), session_log=log))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _keep_rows_until(path: Path, step: int, row_step) -> None:
    """Rewrite ``path`` without its records past ``step`` (``row_step(line)``: the line's step, None to keep it)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if (row_step(ln) or 0) <= step]
        if len(kept) != len(lines):
            path.write_text("".join(kept))


def _jsonl_step(line: str):
    return json.loads(line).get("step") if line.strip() else None


def _csv_step(line: str):
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else None


class _CSVWriter:
    """DeepSpeed csvMonitor layout: ``<dir>/<tag without '/'>.csv`` with rows ``step,value``.

    Without ``append`` a metric's file is truncated when this run first writes it; files of metrics this run
    does not log are left alone (the directory may be shared).
    """

    def __init__(self, log_dir: Path, append: bool):
        self.log_dir = log_dir
        self.append = append
        log_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, TextIO] = {}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            name = tag.replace("/", "").replace(" ", "_")
            f = self._files.get(name)
            if f is None:
                path = self.log_dir / f"{name}.csv"
                new = not self.append or not path.exists() or path.stat().st_size == 0
                f = self._files[name] = open(path, "a" if self.append else "w", newline="")
                if new:
                    f.write(f"step,{tag.split('/')[-1]}\n")
            f.write(f"{int(step)},{float(v)!r}\n")
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ----------------------------------------------------------------------------------------------------------
# the monitor
# ----------------------------------------------------------------------------------------------------------
class Monitor:
    """Writes a run's metrics to JSONL / TensorBoard / CSV and the console; a no-op on non-writer processes.

    Args:
      output_dir: the run directory (``train.output_dir``); metrics.jsonl and summary.json go here.
      total_steps: steps of the whole run, for "step i/N" and the ETA.
      tensorboard, csv_monitor: DeepSpeed sections as dicts or `TensorboardConfig` / `CSVMonitorConfig`.
      steps_per_print: DeepSpeed's key; the plain console line is printed when ``step % steps_per_print == 0``.
      wall_clock_breakdown: DeepSpeed's key; report ``*_time_s`` metrics on the console and to TB/CSV.
      is_writer: whether this process writes; default ``jax.process_index() == 0``.
      append: keep existing metrics.jsonl / CSV rows (resuming a run) instead of starting them afresh.
      resume_step: with ``append``, the step the run resumes from: records the interrupted run logged after it
        (it will log those steps again) are dropped from metrics.jsonl and the CSV files, and TensorBoard is told
        to hide its events past it.
      device: if given, each `log` adds ``memory_bytes`` (bytes in use on it) when the backend reports it.
      stream: console stream (default sys.stdout); a TTY gets the live progress bar.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        *,
        tensorboard: Mapping | TensorboardConfig | None = None,
        csv_monitor: Mapping | CSVMonitorConfig | None = None,
        steps_per_print: int = 10,
        wall_clock_breakdown: bool = False,
        is_writer: Optional[bool] = None,
        append: bool = False,
        resume_step: Optional[int] = None,
        device=None,
        stream: Optional[TextIO] = None,
    ):
        if steps_per_print < 1:
            from jzero.errors import ConfigError

            raise ConfigError(f"steps_per_print must be >= 1, got {steps_per_print}; set steps_per_print: 10")
        if is_writer is None:
            import jax

            is_writer = jax.process_index() == 0
        self.is_writer = bool(is_writer)
        self.output_dir = Path(output_dir)
        self.total_steps = int(total_steps)
        self.steps_per_print = int(steps_per_print)
        self.wall_clock_breakdown = bool(wall_clock_breakdown)
        self.device = device
        self.tensorboard_config = _as_section(tensorboard, TensorboardConfig)
        self.csv_config = _as_section(csv_monitor, CSVMonitorConfig)
        self.stream = stream if stream is not None else sys.stdout
        self._jsonl = None
        self._tb = None
        self._csv = None
        self._progress = None
        self._task = None
        self._closed = False
        if not self.is_writer:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed = append and resume_step is not None
        if resumed:
            _keep_rows_until(self.output_dir / "metrics.jsonl", resume_step, _jsonl_step)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a" if append else "w")
        if self.tensorboard_config.enabled:
            self._tb = _TensorboardWriter(self._log_dir(self.tensorboard_config))
            if resumed:
                self._tb.restart_at(resume_step + 1)
        if self.csv_config.enabled:
            if resumed:
                for path in self._log_dir(self.csv_config).glob("*.csv"):
                    _keep_rows_until(path, resume_step, _csv_step)
            self._csv = _CSVWriter(self._log_dir(self.csv_config), append)
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())

    # paths -------------------------------------------------------------------------------------------------
    def _log_dir(self, section) -> Path:
        base = Path(section.output_path) if section.output_path else self.output_dir
        return base / section.job_name

    @property
    def tensorboard_dir(self) -> Optional[Path]:
        return self._log_dir(self.tensorboard_config) if self.tensorboard_config.enabled else None

    @property
    def csv_dir(self) -> Optional[Path]:
        return self._log_dir(self.csv_config) if self.csv_config.enabled else None

    # writing -----------------------------------------------------------------------------------------------
    def _write_json(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _scalars(self, prefix: str, step: int, m: Mapping[str, Any]) -> None:
        values = {
            f"{prefix}/{k}": v
            for k, v in m.items()
            if _is_number(v) and (self.wall_clock_breakdown or not k.endswith(TIMING_SUFFIX))
        }
        if not values:
            return
        if self._tb is not None:
            self._tb.scalars(step, values)
        if self._csv is not None:
            self._csv.scalars(step, values)

    def _console(self):
        from rich.console import Console

        return Console(file=self.stream, force_terminal=True)

    def _ensure_progress(self):
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self._console(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps, info="")
        return self._progress

    def _print(self, line: str) -> None:
        if self.is_tty:
            progress = self._ensure_progress()
            progress.refresh()  # so the bar redrawn below the line shows the current step
            progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one training step's metrics (``loss``, ``lr``, ``tokens_per_s``, ``mfu``, ``*_time_s``...)."""
        if not self.is_writer:
            return
        m = {k: _plain(v) for k, v in metrics.items() if k != "step"}
        if self.device is not None and "memory_bytes" not in m:
            mem = device_memory_bytes(self.device)
            if mem is not None:
                m["memory_bytes"], m["peak_memory_bytes"] = mem["bytes_in_use"], mem["peak_bytes_in_use"]
        step = int(step)
        self._write_json({"step": step, **m})
        self._scalars("Train", step, m)
        printing = step % self.steps_per_print == 0
        if self.is_tty:
            progress = self._ensure_progress()
            info = format_train_line(step, self.total_steps, m).split(" | ", 1)[1:]
            progress.update(self._task, completed=step, info=info[0] if info else "")
            if printing and self.wall_clock_breakdown:
                self._print(format_train_line(step, self.total_steps, m, timings=True))
        elif printing:
            self._print(format_train_line(step, self.total_steps, m, timings=self.wall_clock_breakdown))

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record evaluation metrics (``eval_loss``, ``eval_ppl``); always printed, evals are rare."""
        if not self.is_writer:
            return
        m = {k: _plain(v) for k, v in metrics.items() if k != "step"}
        self._write_json({"step": int(step), **m})
        self._scalars("Eval", int(step), m)
        shown = " | ".join(f"{k} {v:.4g}" if _is_number(v) else f"{k} {v}" for k, v in m.items())
        self._print(f"eval step {int(step)} | {shown}")

    def summary(self, summary: Mapping[str, Any]) -> Optional[Path]:
        """Write summary.json atomically (tmp file + rename); returns its path, None on non-writers."""
        if not self.is_writer:
            return None
        path = self.output_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_plain(dict(summary)), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        """Stop the progress bar and close every file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        for w in (self._tb, self._csv, self._jsonl):
            if w is not None:
                w.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
