"""Where a training loop's time goes: device step time vs host overhead, measured, not inferred.

The loop dispatches steps asynchronously and syncs only when it logs. Two things can set its pace:
the device (a step's kernels) or the host (reading the batch, placing it on the devices, dispatching the jitted
step, logging). `StepTimer` measures both without adding syncs:

- ``step_time_s``: wall time per step between two log points, each taken when a logged step's metrics are on
  the host (ready to ready). This is what the user gets.
- ``host_time_s`` = ``data_wait_s`` + ``place_time_s`` + ``dispatch_time_s`` + ``log_time_s``: the host's own
  work per step, timed around each phase. When it is well under ``step_time_s`` the device sets the pace; when
  the two are close the loop is host-bound and the device idles.
- ``device_step_s`` (`probe`): a few real training steps run synchronised (previous work drained, dispatch,
  wait for the result), once per run: the device time of one step, printed in the flops profile beside
  ``step_time_s``.

The loop (train.pretrain) fetches a logged step's metrics one step late, after dispatching the next step, so the
device always has a step queued and the log's sync leaves no bubble.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PHASES = ("data_wait_s", "place_time_s", "dispatch_time_s", "log_time_s")


class StepTimer:
    """Accumulates host phase times over a window of steps; `window` closes it into per-step figures."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.device_step_s: float | None = None
        self._probes: list[float] = []
        self.restart()

    def restart(self) -> None:
        """Open a new window now (after an eval or a checkpoint sync, which are not step time)."""
        self.t_mark = self.clock()
        self.steps = 0
        self.phase_s = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = self.clock()
        try:
            yield
        finally:
            self.phase_s[name] += self.clock() - t

    def step(self) -> None:
        self.steps += 1

    def window(self, steps: int) -> dict[str, float]:
        """Per-step figures of the ``steps`` steps that finished since the window opened (call when the last of
        them is ready); host phases are averaged over the loop iterations they were timed in."""
        out = {"step_time_s": (self.clock() - self.t_mark) / max(steps, 1)}
        out.update({k: v / max(self.steps, 1) for k, v in self.phase_s.items()})
        out["host_time_s"] = sum(out[k] for k in PHASES)
        self.restart()
        return out

    @contextmanager
    def probe(self, drain: Callable[[], Any]) -> Iterator[None]:
        """Time one step synchronised: ``drain()`` (block on the device's work) before, and the body must block
        on the step's result. Keeps the median of the probes as ``device_step_s``."""
        drain()
        t = self.clock()
        yield
        self._probes.append(self.clock() - t)
        self.device_step_s = statistics.median(self._probes)
