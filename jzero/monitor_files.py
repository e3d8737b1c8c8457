"""The files behind jzero's TensorBoard and CSV monitors (:mod:`jzero.monitor` decides what goes in them): a
scalar-only TensorBoard event writer, DeepSpeed csvMonitor's file layout, and the trimming of a resumed run's
records past its checkpoint (metrics.jsonl lines, CSV rows)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, TextIO


def csv_filename(tag: str) -> str:
    """DeepSpeed csvMonitor's file name for a tag: ``Train/Samples/train_loss`` -> ``Train_Samples_train_loss.csv``."""
    return tag.replace("/", "_").replace(" ", "_") + ".csv"


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

    def write_events(self, events) -> None:
        """``[(tag, value, x)]``, one event each (as DeepSpeed's ``add_scalar(tag, value, x)``), then a flush."""
        Summary, Event = self._summary_pb2.Summary, self._event_pb2.Event
        now = time.time()
        for tag, v, x in events:
            summ = Summary(value=[Summary.Value(tag=tag, simple_value=float(v))])
            self._writer.add_event(Event(wall_time=now, step=int(x), summary=summ))
        self._writer.flush()

    def restart_at(self, x: int) -> None:
        """A resumed run: TensorBoard drops the earlier events at ``x`` and after (a SessionLog START, as
        torch's ``SummaryWriter(purge_step=...)`` writes), so the events logged again are not shown twice."""
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(x), session_log=log))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _keep_rows_until(path: Path, step: int, row_step, from_last: str | None = None) -> None:
    """Rewrite ``path`` without its records past ``step`` (``row_step(line)``: the line's step, None to keep it).
    ``from_last``: only the lines after the last one starting with it are the resumed run's (a CSV file that
    earlier runs appended to holds their rows above that run's header: those are never touched)."""
    if path.is_file():
        with open(path, newline="") as f:   # (\r\n stays \r\n)
            lines = f.read().splitlines(keepends=True)
        first = max((i for i, ln in enumerate(lines) if from_last and ln.startswith(from_last)), default=0)
        kept = lines[:first] + [ln for ln in lines[first:] if (s := row_step(ln)) is None or s <= step]
        if len(kept) != len(lines):
            with open(path, "w", newline="") as f:
                f.write("".join(kept))


def _jsonl_step(line: str):
    return json.loads(line).get("step") if line.strip() else None


def _csv_step(line: str):
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else None


class _CSVWriter:
    """DeepSpeed csvMonitor layout: ``<dir>/<csv_filename(tag)>``, header ``step,<last part of tag>``, rows ``x,value``.

    Rows are appended, never truncated (the directory may be shared by runs, as DeepSpeed's csvMonitor allows):
    without ``append`` (a fresh run) a tag's file gets a ``step,<name>`` header when this run first writes it, as
    DeepSpeed's does, so each run's rows start under their own header; with ``append`` (a resumed run) the rows
    continue the file without a second header.
    """

    def __init__(self, log_dir: Path, append: bool):
        self.log_dir = log_dir
        self.append = append
        log_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[TextIO, Any]] = {}

    def write_events(self, events) -> None:
        for tag, v, x in events:
            name = csv_filename(tag)
            entry = self._files.get(name)
            if entry is None:
                path = self.log_dir / name
                new = not self.append or not path.exists() or path.stat().st_size == 0
                f = open(path, "a", newline="")
                entry = self._files[name] = (f, csv.writer(f))   # csv.writer's \r\n, as csvMonitor's
                if new:
                    entry[1].writerow(["step", tag.split("/")[-1]])
            entry[1].writerow([int(x), float(v)])
        for name in {csv_filename(tag) for tag, _, _ in events}:
            self._files[name][0].flush()

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()
