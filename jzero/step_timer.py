"""Where a training loop's time goes: device step time vs host overhead, measured, not inferred.

The loop dispatches steps asynchronously and syncs only when it logs. Two things can set its pace: the device
(a step's kernels) or the host (reading the batch, placing it, dispatching the jitted step, logging).
`StepTimer` measures both without adding syncs to the steady state:

- ``step_time_s``: wall time per step between two log points, each taken when a logged step's metrics are on
  the host (ready to ready), divided by the steps that finished in between (the loop counts the step dispatched
  after the logged one too when it is already done, as when dispatch blocks). This is what the user gets.
- ``host_time_s`` = ``data_wait_s`` + ``place_time_s`` + ``dispatch_time_s`` + ``log_time_s``: the host's own
  work per step. Data, placement and logging are timed around each phase in every step. The dispatch call is
  not: once the device is busy, the runtime makes it wait for queue space (on an H200, a GPT-2 124M step's
  dispatch call returned after ~22 of the 30 ms), so the loop's time in it is split into ``dispatch_time_s``,
  the call's own cost measured on the probe steps below (nothing queued), and ``queue_wait_s``, the rest: the
  host waiting for the device. A device-bound loop has ``host_time_s`` well under ``step_time_s`` and most of
  the difference in ``queue_wait_s``; a host-bound loop has ``host_time_s`` close to ``step_time_s``.
- ``device_step_s`` (`probe`): a few real training steps run synchronised (previous work drained, dispatch,
  wait for the result), once per run: the device time of one step, printed in the flops profile.

The loop (train.pretrain) fetches a logged step's metrics one step late, after dispatching the next step, so the
device always has a step queued and the log's sync leaves no bubble.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

#: the host's own work per step, summed into ``host_time_s``
PHASES = ("data_wait_s", "place_time_s", "dispatch_time_s", "log_time_s")
_TIMED = ("data_wait_s", "place_time_s", "dispatch_call_s", "log_time_s")   # what `phase` accumulates


class StepTimer:
    """Accumulates host phase times over a window of steps; `window` closes it into per-step figures."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.device_step_s: float | None = None
        self.dispatch_cost_s: float | None = None
        self._probes: list[tuple[float, float]] = []   # (dispatch call, dispatch to ready) per probe step
        self.restart()

    def restart(self) -> None:
        """Open a new window now (after an eval or a checkpoint sync, which are not step time)."""
        self._open()
        self._inexact: tuple[float, dict[str, float], int, int] | None = None   # see `window`

    def _open(self) -> None:
        self.t_mark = self.clock()
        self.steps = 0
        self.phase_s = dict.fromkeys(_TIMED, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body into phase ``name`` (``data_wait_s``, ``place_time_s``, ``dispatch_call_s``: the
        dispatch call as the loop sees it, queue wait included; ``log_time_s``)."""
        t = self.clock()
        try:
            yield
        finally:
            self.phase_s[name] += self.clock() - t

    def step(self) -> None:
        self.steps += 1

    def window(self, steps: int, exact: bool = True) -> dict[str, float]:
        """Per-step figures of the ``steps`` steps that finished since the window opened (call when the last of
        them is ready); host phases are averaged over the loop iterations they were timed in.

        ``exact=False`` says a step was still running at this close (not counted here, so part of its time is in
        this window and the rest in the next): that happens when the loop is host-bound, and the next window
        then reads short by up to one step. The errors cancel over the windows since the last exact close, so a
        window that ends exactly (its last step waited for, nothing running after it) after inexact closes is
        returned merged with all of them: one span over the chain, its steps and host phases summed. Merging
        with the last inexact window only is not enough: a host-bound loop closes inexactly several times in a
        row, each window carrying an almost-finished step into the next, and the run's last window then read
        half a step (CPU: 5.6 ms a step beside 10.0 ms of host work, twice the real tokens/s)."""
        now = self.clock()
        span, count, iters, sums = now - self.t_mark, steps, self.steps, dict(self.phase_s)
        chain = (self.t_mark, dict(self.phase_s), self.steps, steps)   # the windows since the last exact close
        if self._inexact is not None:
            t0, p_sums, p_iters, p_steps = self._inexact
            chain = (t0, {k: v + p_sums[k] for k, v in sums.items()}, iters + p_iters, count + p_steps)
        if exact:
            span, sums, iters, count = now - chain[0], chain[1], chain[2], chain[3]
        self._inexact = None if exact else chain
        avg = {k: v / max(iters, 1) for k, v in sums.items()}
        call = avg.pop("dispatch_call_s")
        cost = call if self.dispatch_cost_s is None else min(call, self.dispatch_cost_s)
        out = {"step_time_s": span / max(count, 1), **avg, "dispatch_time_s": cost, "queue_wait_s": call - cost}
        out["host_time_s"] = sum(out[k] for k in PHASES)
        self._open()
        return out

    @contextmanager
    def probe(self, drain: Callable[[], Any], dispatch: Callable[[], Any]) -> Iterator[Any]:
        """One synchronised step: ``drain()`` (block on the device's work), time ``dispatch()`` (nothing queued,
        so its own cost), yield its result; the body blocks on it. Keeps the medians as ``dispatch_cost_s`` and
        ``device_step_s`` (dispatch to ready)."""
        drain()
        t = self.clock()
        out = dispatch()
        call = self.clock() - t
        self.phase_s["dispatch_call_s"] += call
        yield out
        self._probes.append((call, self.clock() - t))
        self.dispatch_cost_s = statistics.median(c for c, _ in self._probes)
        self.device_step_s = statistics.median(d for _, d in self._probes)
