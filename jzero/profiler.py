"""A device trace of a few steps of the real training loop, and how busy the device was in it.

MaxText's ``profiler`` / ``profiler_steps`` as jzero config (``train.profile_steps``, ``train.profile_start``):
``train.pretrain`` wraps those steps of its own loop (real data, placement, asynchronous dispatch, logging) in
``jax.profiler`` and writes ``<train.output_dir>/profile`` (TensorBoard's profile plugin reads it; the
``*.trace.json.gz`` opens in Perfetto). The step alone (``benchmarks.bench --profile``) cannot show what the loop
costs the device; this can. From the trace's device events it reports the **busy fraction**: the union of the
kernels' intervals over the span from the first kernel to the last. The trace starts while earlier steps are still
queued and ends after the last traced step has finished, so the span is steady-state work with no boundary to
attribute; ``idle ms a step`` is ``(1 - busy) x`` the loop's step time. The profiler's own overhead (CUPTI) is in
the figure, and the traced steps are left out of the logged step-time windows.

``benchmarks.trace_top`` prints the same trace's kernels by time and its idle gaps by length.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from jzero.errors import ConfigError

#: idle-gap buckets (us): launch latency between queued kernels, host stalls inside a step, longer waits
GAP_BUCKETS = ((0, 2), (2, 10), (10, 100), (100, 1000), (1000, float("inf")))


def device_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events on the GPU processes of the newest ``*.trace.json.gz`` under ``trace_dir``."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, name in pids.items() if "/device:GPU" in name or "GPU" in name}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]


def gaps(events: list[dict]) -> dict:
    """Busy time (union of the events' [ts, ts + dur) intervals, so overlapping streams count once), the span from
    the first start to the last end, and the idle time between busy intervals in :data:`GAP_BUCKETS` (us)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events)
    busy, idle = 0.0, collections.Counter()
    count = collections.Counter()
    if not spans:
        return {"busy_us": 0.0, "span_us": 0.0, "idle_us": {}, "idle_n": {}}
    start, end = spans[0]
    for s, e in spans[1:]:
        if s <= end:
            end = max(end, e)
            continue
        busy += end - start
        gap = s - end
        bucket = next(b for b in GAP_BUCKETS if b[0] <= gap < b[1])
        idle[bucket] += gap
        count[bucket] += 1
        start, end = s, e
    busy += end - start
    return {"busy_us": busy, "span_us": max(e for _, e in spans) - spans[0][0],
            "idle_us": dict(idle), "idle_n": dict(count)}


def busy_summary(trace_dir: str, steps: int, step_time_s: float | None) -> dict[str, Any]:
    """The trace's busy fraction, kernels a step, and idle ms a step at the loop's ``step_time_s`` (if known)."""
    events = device_events(trace_dir)
    g = gaps(events)
    busy = g["busy_us"] / g["span_us"] if g["span_us"] else None
    return {"dir": str(trace_dir), "steps": steps, "device_busy_fraction": busy,
            "kernels_per_step": len(events) / steps if steps else None,
            "idle_ms_per_step": None if busy is None or step_time_s is None else (1 - busy) * step_time_s * 1e3}


def describe(s: dict) -> str:
    """One line for the log."""
    if s.get("device_busy_fraction") is None:
        return f"profile: {s['steps']} steps traced to {s['dir']}; no device kernel events in it (a CPU run?)"
    idle = "" if s["idle_ms_per_step"] is None else f", idle ~{s['idle_ms_per_step']:.2f} ms a step"
    return (f"profile: {s['steps']} steps traced to {s['dir']} | device busy {100 * s['device_busy_fraction']:.1f}% "
            f"of the traced span{idle} ({s['kernels_per_step']:.0f} kernels a step); kernels by time: "
            f"python -m benchmarks.trace_top {s['dir']} 25 {s['steps']}")


def overrun(first: int, n: int, total: int) -> str | None:
    """The error for a trace of steps ``first .. first + n - 1`` that runs past ``total`` steps, else None."""
    if n and first + n - 1 > total:
        return (f"train.profile_start={first} + train.profile_steps={n} runs past train.steps={total}; start "
                f"earlier or trace fewer steps")
    return None


@dataclass
class LoopProfile:
    """Which steps of the loop to trace: ``first .. first + steps - 1`` (``steps`` 0: none)."""

    first: int
    steps: int
    out_dir: pathlib.Path

    @classmethod
    def from_config(cls, train_cfg, start: int, earliest: int, out_dir) -> "LoopProfile":
        """``train.profile_start`` (0: ``earliest``, the first step clear of warm-up and probes) and
        ``train.profile_steps``, checked against the run's steps (``start`` = the step resumed from)."""
        n = train_cfg.profile_steps
        first = train_cfg.profile_start or earliest
        if n and first <= start:
            raise ConfigError(f"train.profile_start={first} is at or before the step this run resumes from "
                              f"({start}); set it after {start} (or 0 for the first steady step)")
        if overrun(first, n, train_cfg.steps):
            raise ConfigError(overrun(first, n, train_cfg.steps))
        return cls(first, n, pathlib.Path(out_dir) / "profile")

    def covers(self, step: int) -> bool:
        return bool(self.steps) and self.first <= step <= self.first + self.steps - 1

    def starts_at(self, step: int) -> bool:
        return bool(self.steps) and step == self.first

    def ends_at(self, step: int) -> bool:
        return bool(self.steps) and step == self.first + self.steps - 1

    def start(self) -> None:
        import jax

        self.out_dir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.out_dir), create_perfetto_trace=True)

    def stop(self, drain: Callable[[], Any], step_time_s: float | None) -> dict[str, Any]:
        """Wait for the traced steps (``drain``), stop the trace, and summarise it."""
        import jax

        drain()
        jax.profiler.stop_trace()
        try:
            return busy_summary(str(self.out_dir), self.steps, step_time_s)
        except FileNotFoundError:   # no perfetto file (a backend without one): the xplane trace is still there
            return {"dir": str(self.out_dir), "steps": self.steps, "device_busy_fraction": None,
                    "kernels_per_step": None, "idle_ms_per_step": None}
