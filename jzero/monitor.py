r"""Training monitor: metrics.jsonl, DeepSpeed's TensorBoard and CSV monitors, console progress.

One `Monitor` per process; only the writer process (process 0) touches the disk or the console, so
multi-host runs produce one set of files. What it writes, all under the run's ``output_dir`` unless a monitor's
``output_path`` says otherwise:

- ``metrics.jsonl``: one JSON object per `log` / `log_eval` call (``{"step": <optimizer step>, **metrics}``, every
  metric, timings included), flushed at once so a crashed run keeps its curve. This is the file ``train/plot.py``
  and ``train/sweep.py`` read (train lines carry ``loss``, eval lines do not).
- ``summary.json`` (`Monitor.summary`), written atomically: its presence marks a finished run for sweeps.
- TensorBoard (``tensorboard.enabled``) and CSV (``csv_monitor.enabled``): the same events, each a
  ``(tag, value, x)``, in ``output_path/job_name`` (an empty ``output_path`` = the run's ``output_dir``).

The events are DeepSpeed's (``deepspeed/runtime/engine.py``), with its x axis: DeepSpeed's ``global_samples``,
the samples trained so far, = optimizer steps x ``train_batch_size`` (``S`` below; ``k`` = the step logged):

====================================  ======================  ======================================================
tag                                   x                       value
====================================  ======================  ======================================================
``Train/Samples/train_loss``          ``(k - 1) * S``         metric ``loss``. DeepSpeed writes it in ``backward()``,
                                                              before the step adds its samples, so step 1 is at 0
``Train/Samples/lr``                  ``k * S``               metric ``lr`` (written in ``step()``, after the update)
``Train/Samples/loss_scale``          ``k * S``               metric ``loss_scale``; only with ``fp16=True``
                                                              (DeepSpeed: ``fp16.enabled``), as DeepSpeed
``Train/Samples/eval_loss``           ``k * S``               `log_eval`'s ``eval_loss`` (DeepSpeed's
                                                              ``PipelineEngine.eval_batch``; its base engine logs no
                                                              eval)
====================================  ======================  ======================================================

jzero's other numeric metrics (``grad_norm``, ``tokens_per_s``, ``mfu``, ``memory_bytes``, ``skipped_steps``, eval's
``eval_ppl`` ...) go under tags of their own, ``jzero/Train/Samples/<metric>`` and ``jzero/Eval/Samples/<metric>``, at
``x = k * S``, so no DeepSpeed tag is shadowed. Timing metrics (keys ending in ``_time_s`` or ``_wait_s``:
``step_time_s``, ``host_time_s``, ``data_wait_s``, ``queue_wait_s`` ...) are written only with
``wall_clock_breakdown`` (DeepSpeed writes its timers, ``Train/Samples/elapsed_time_ms_<timer>``, only then; jzero's
timers measure other spans, so they keep their own names and seconds). ``None`` values (``mfu`` on CPU) are not
written.

TensorBoard: scalar events (``simple_value``, event step = ``x``) written with tensorboard's own
``EventFileWriter`` (no torch / tensorflow needed), as torch's ``SummaryWriter.add_scalar`` writes them.

CSV, as DeepSpeed's ``csvMonitor`` (``deepspeed/monitor/csv_monitor.py``) writes it: one file per tag,
``tag.replace('/', '_').replace(' ', '_') + '.csv'`` (``Train/Samples/train_loss`` ->
``Train_Samples_train_loss.csv``, ``jzero/Train/Samples/grad_norm`` -> ``jzero_Train_Samples_grad_norm.csv``);
rows by ``csv.writer`` (``\r\n`` line ends), the first ``step,<last part of the tag>`` (``step,train_loss``), then
``<x>,<value>``. As DeepSpeed's, files are appended to, never truncated, and a fresh run writes the header again
when it first writes a file (so a directory shared by runs keeps every run's rows, each under its header); a
resumed run (``append``) continues them without a second header.

Resuming (``append`` + ``resume_step`` R): records of steps after R (the interrupted run logged them; the resumed
run logs them again) are dropped from metrics.jsonl and the CSV files (``train_loss`` rows with ``x > (R - 1) * S``,
other rows with ``x > R * S``); TensorBoard gets a ``SessionLog.START`` at ``x = R * S`` (it hides every earlier
event at ``x >= R * S``, as torch's ``SummaryWriter(purge_step=...)``) followed by step R's own events at
``R * S``, rebuilt from metrics.jsonl, so each step shows once. ``train_batch_size`` must be the interrupted run's.

DeepSpeed resolves an empty ``output_path`` against the launch directory; jzero resolves it against the run's
``output_dir`` so every run (and every sweep point) keeps its logs next to its other outputs.

Console: when the stream is a TTY a rich progress bar shows step, loss, tokens/s and ETA. Otherwise the
monitor prints one plain line every ``steps_per_print`` steps:
``step 10/100 | loss 3.21 | lr 1.0e-03 | 12,345 tok/s | mfu 12.3% | mem 1.2 GiB (peak 4.5 GiB)``.
``wall_clock_breakdown`` (DeepSpeed's key) adds the timing metrics (keys ending in ``_time_s`` or ``_wait_s``) to
those prints: the loop's host split ``data wait | place | log | dispatch`` (which sums to ``host``) and ``queue
wait`` (dispatch blocked on the device).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO

from pydantic import model_validator

from jzero.monitor_files import (_CSVWriter, _TensorboardWriter, _csv_step, _jsonl_step,  # noqa: F401
                                 _keep_rows_until, csv_filename)
from jzero.section import Section

TIMING_SUFFIX = "_time_s"   # what the console line adds under wall_clock_breakdown
#: timing metrics: written to TensorBoard / CSV only with wall_clock_breakdown
TIMING_SUFFIXES = (TIMING_SUFFIX, "_wait_s")

#: DeepSpeed's event tags (deepspeed/runtime/engine.py) and the jzero metrics they carry
TRAIN_LOSS_TAG, LR_TAG, LOSS_SCALE_TAG, EVAL_LOSS_TAG = (
    "Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/loss_scale", "Train/Samples/eval_loss")
#: prefixes of jzero's own metrics' tags (no DeepSpeed tag starts with them)
JZERO_TRAIN_PREFIX, JZERO_EVAL_PREFIX = "jzero/Train/Samples/", "jzero/Eval/Samples/"


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


class TrackioConfig(Section):
    """DeepSpeed ``trackio`` section (``deepspeed/monitor/config.py``: ``enabled``, ``project``): accepted only when
    disabled, as ``wandb`` and ``comet`` (:mod:`jzero.monitor`); jzero has no Trackio monitor."""

    enabled: bool = False
    project: str | None = None

    @model_validator(mode="after")
    def _not_implemented(self):
        if self.enabled:
            raise ValueError("trackio.enabled: true is not implemented in jzero; set it to false and use tensorboard "
                             "or csv_monitor")
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
    if timings:   # every timing metric: the loop's data wait (``data_wait_s``) is a part of ``host`` too
        for k, v in m.items():
            if _is_timing(k) and k not in shown and _is_number(v):
                name = k[: -len(TIMING_SUFFIX)] if k.endswith(TIMING_SUFFIX) else k[: -len("_s")].replace("_", " ")
                parts.append(f"{name} {1000 * v:.1f} ms")
    return " | ".join(parts)


def _is_timing(key: str) -> bool:
    return key.endswith(TIMING_SUFFIXES)


# ----------------------------------------------------------------------------------------------------------
# the monitor
# ----------------------------------------------------------------------------------------------------------
class Monitor:
    """Writes a run's metrics to JSONL / TensorBoard / CSV and the console; a no-op on non-writer processes.

    Args:
      output_dir: the run directory (``train.output_dir``); metrics.jsonl and summary.json go here.
      total_steps: steps of the whole run, for "step i/N" and the ETA.
      tensorboard, csv_monitor: DeepSpeed sections as dicts or `TensorboardConfig` / `CSVMonitorConfig`.
      steps_per_print: DeepSpeed's key; the plain console line is printed every ``steps_per_print`` steps: for the
        first logged step at or past each multiple (the loop logs every ``train.log_interval`` steps; a test of
        ``step % steps_per_print == 0`` printed only at common multiples, every 12 steps for 6 with an interval of 4).
      wall_clock_breakdown: DeepSpeed's key; print ``*_time_s`` metrics on the console, and write the timing
        metrics (``*_time_s``, ``*_wait_s``) to TensorBoard / CSV.
      train_batch_size: samples per optimizer step (DeepSpeed's ``train_batch_size``): the TensorBoard / CSV x axis
        is ``step * train_batch_size``, DeepSpeed's ``global_samples``. The default 1 makes it the optimizer step.
      fp16: whether fp16 (loss scaling) is on (DeepSpeed's ``fp16.enabled``): only then is ``loss_scale`` written
        to TensorBoard / CSV (``Train/Samples/loss_scale``), as DeepSpeed does.
      is_writer: whether this process writes; default ``jax.process_index() == 0``.
      append: keep existing metrics.jsonl / CSV rows (resuming a run) instead of starting them afresh.
      resume_step: with ``append``, the step the run resumes from: records the interrupted run logged after it
        (it will log those steps again) are dropped from metrics.jsonl and the CSV files, and TensorBoard is told
        to hide its events past it (see the module docstring).
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
        train_batch_size: int = 1,
        fp16: bool = False,
        is_writer: Optional[bool] = None,
        append: bool = False,
        resume_step: Optional[int] = None,
        device=None,
        stream: Optional[TextIO] = None,
    ):
        if steps_per_print < 1:
            from jzero.errors import ConfigError

            raise ConfigError(f"steps_per_print must be >= 1, got {steps_per_print}; set steps_per_print: 10")
        if int(train_batch_size) < 1:
            raise ValueError(f"Monitor(train_batch_size={train_batch_size}): the samples per optimizer step, >= 1")
        if is_writer is None:
            import jax

            is_writer = jax.process_index() == 0
        self.is_writer = bool(is_writer)
        self.output_dir = Path(output_dir)
        self.total_steps = int(total_steps)
        self.steps_per_print = int(steps_per_print)
        self._last_logged = int(resume_step or 0) if append else 0   # the step `log` saw last (console prints)
        self.wall_clock_breakdown = bool(wall_clock_breakdown)
        self.train_batch_size = int(train_batch_size)
        self.fp16 = bool(fp16)
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
        jsonl = self.output_dir / "metrics.jsonl"
        if resumed:
            _keep_rows_until(jsonl, resume_step, _jsonl_step)
        if self.tensorboard_config.enabled:
            self._tb = _TensorboardWriter(self._log_dir(self.tensorboard_config))
            if resumed:   # hide everything at x >= R*S, then show step R's own events at R*S again
                self._tb.restart_at(self._samples(resume_step))
                self._tb.write_events([e for e in self._events_of_step(jsonl, resume_step)
                                       if e[2] >= self._samples(resume_step)])
        if self.csv_config.enabled:
            if resumed:
                loss_file = csv_filename(TRAIN_LOSS_TAG)
                for path in self._log_dir(self.csv_config).glob("*.csv"):
                    last = self._samples(resume_step - 1 if path.name == loss_file else resume_step)
                    _keep_rows_until(path, last, _csv_step, from_last="step,")
            self._csv = _CSVWriter(self._log_dir(self.csv_config), append)
        self._jsonl = open(jsonl, "a" if append else "w")
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

    def _samples(self, step: int) -> int:
        """DeepSpeed's ``global_samples`` after ``step`` optimizer steps."""
        return int(step) * self.train_batch_size

    def _extra(self, prefix: str, m: Mapping[str, Any], skip: tuple[str, ...], x: int) -> list:
        return [(prefix + k, v, x) for k, v in m.items()
                if k not in skip and _is_number(v) and (self.wall_clock_breakdown or not _is_timing(k))]

    def train_events(self, step: int, m: Mapping[str, Any]) -> list[tuple[str, float, int]]:
        """The ``(tag, value, x)`` events `log` writes to TensorBoard / CSV for step ``step``'s metrics ``m``."""
        before, after = self._samples(step - 1), self._samples(step)
        events = []
        if _is_number(m.get("loss")):   # DeepSpeed's backward(): before the step adds its samples
            events.append((TRAIN_LOSS_TAG, m["loss"], before))
        if _is_number(m.get("lr")):     # DeepSpeed's step(): after
            events.append((LR_TAG, m["lr"], after))
        if self.fp16 and _is_number(m.get("loss_scale")):
            events.append((LOSS_SCALE_TAG, m["loss_scale"], after))
        return events + self._extra(JZERO_TRAIN_PREFIX, m, ("loss", "lr", "loss_scale"), after)

    def eval_events(self, step: int, m: Mapping[str, Any]) -> list[tuple[str, float, int]]:
        """The ``(tag, value, x)`` events `log_eval` writes to TensorBoard / CSV for an evaluation after ``step``."""
        x = self._samples(step)
        events = [(EVAL_LOSS_TAG, m["eval_loss"], x)] if _is_number(m.get("eval_loss")) else []
        return events + self._extra(JZERO_EVAL_PREFIX, m, ("eval_loss",), x)

    def _events_of_step(self, jsonl: Path, step: int) -> list:
        """Step ``step``'s events, rebuilt from its metrics.jsonl records (train lines carry ``loss``)."""
        events = []
        if jsonl.is_file():
            for line in jsonl.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                if r.get("step") == step:
                    m = {k: v for k, v in r.items() if k != "step"}
                    events += self.train_events(step, m) if "loss" in m else self.eval_events(step, m)
        return events

    def _write_events(self, events: list) -> None:
        if not events:
            return
        if self._tb is not None:
            self._tb.write_events(events)
        if self._csv is not None:
            self._csv.write_events(events)

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
        self._write_events(self.train_events(step, m))
        printing = step // self.steps_per_print > self._last_logged // self.steps_per_print   # a multiple reached
        self._last_logged = step
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
        self._write_events(self.eval_events(int(step), m))
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
