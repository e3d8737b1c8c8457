"""jzero.step_timer: the loop's per-step figures from a scripted clock (no real timing)."""
import pytest

from jzero.step_timer import PHASES, StepTimer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _iteration(timer, clock, data=1e-3, place=2e-3, call=3e-3, device=0.0):
    for name, dt in (("data_wait_s", data), ("place_time_s", place), ("dispatch_call_s", call)):
        with timer.phase(name):
            clock.t += dt
    clock.t += device
    timer.step()


def test_window_splits_wall_time_and_host_phases():
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(4):
        _iteration(timer, clock, device=14e-3)
    w = timer.window(steps=4)
    assert w["step_time_s"] == pytest.approx(0.020)
    # no probe yet: the whole dispatch call counts as host work
    assert (w["data_wait_s"], w["place_time_s"], w["dispatch_time_s"], w["log_time_s"], w["queue_wait_s"]) == \
        pytest.approx((1e-3, 2e-3, 3e-3, 0.0, 0.0))
    assert w["host_time_s"] == pytest.approx(6e-3)
    clock.t += 0.010   # the window restarted: the next one starts from zero now
    timer.step()
    assert timer.window(steps=1) == pytest.approx({"step_time_s": 0.010, "host_time_s": 0.0, "queue_wait_s": 0.0,
                                                   **dict.fromkeys(PHASES, 0.0)})


def test_probe_measures_device_step_and_dispatch_cost_and_splits_queue_wait():
    """Probes (nothing queued) give the dispatch call's own cost; later, a dispatch call that blocks for the
    device is split into that cost (host work) and queue wait (not host work)."""
    clock, drained = Clock(), []
    timer = StepTimer(clock)
    assert timer.device_step_s is None
    for call, device in ((0.002, 0.030), (0.001, 0.010), (0.003, 0.020)):
        def dispatch(call=call):
            clock.t += call
            return "metrics"
        with timer.probe(lambda: drained.append(clock.t), dispatch) as out:
            assert out == "metrics"
            clock.t += device   # blocking on the result
        timer.step()
    assert drained == pytest.approx([0.0, 0.032, 0.043])
    assert timer.device_step_s == pytest.approx(0.023) and timer.dispatch_cost_s == pytest.approx(0.002)
    w = timer.window(steps=3)
    assert w["dispatch_time_s"] == pytest.approx(0.002) and w["queue_wait_s"] == pytest.approx(0.0)
    for _ in range(5):   # device-bound steady state: the dispatch call blocks 25 ms beyond its cost
        _iteration(timer, clock, call=0.027)
    w = timer.window(steps=5)
    assert w["step_time_s"] == pytest.approx(0.030)
    assert w["dispatch_time_s"] == pytest.approx(0.002) and w["queue_wait_s"] == pytest.approx(0.025)
    assert w["host_time_s"] == pytest.approx(0.005) and w["host_time_s"] + w["queue_wait_s"] == pytest.approx(0.030)


def test_host_phases_average_over_timed_iterations_not_window_steps():
    """Metrics are fetched one step late, so a window of n steps timed n + 1 loop iterations after a restart."""
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(5):
        _iteration(timer, clock, data=0.0, place=0.0, call=1e-3)
    w = timer.window(steps=4)
    assert w["dispatch_time_s"] == pytest.approx(1e-3) and w["step_time_s"] == pytest.approx(5e-3 / 4)


def test_window_after_an_inexact_close_is_merged_with_it():
    """Host-bound loop: a close that finds the next step still running (exact=False) leaves part of that step's
    time to the next window, which would read short; the next exact close reports one span over both windows."""
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(3):   # 3 steps of 10 ms; the close comes 7 ms into the 4th, which is not counted
        _iteration(timer, clock, data=0.0, place=0.0, call=1e-3, device=9e-3)
    clock.t += 7e-3
    w1 = timer.window(steps=3, exact=False)
    assert w1["step_time_s"] == pytest.approx(37e-3 / 3)
    clock.t += 3e-3   # the 4th step ends: the run's last close, exact, counts it alone in 3 ms
    timer.step()
    w2 = timer.window(steps=1)
    assert w2["step_time_s"] == pytest.approx(0.010)   # (40 ms over 4 steps, not 3 ms for one)
    assert w2["dispatch_time_s"] == pytest.approx(3e-3 / 4)   # host phases over the 4 iterations of both
    clock.t += 0.010   # merged once: the next window is its own again
    timer.step()
    assert timer.window(steps=1)["step_time_s"] == pytest.approx(0.010)
    clock.t += 0.005   # an external restart (eval, save) forgets an inexact close
    timer.window(steps=1, exact=False)
    timer.restart()
    clock.t += 0.020
    assert timer.window(steps=1)["step_time_s"] == pytest.approx(0.020)


def test_window_after_several_inexact_closes_is_merged_with_all_of_them():
    """Host-bound loop (CPU): each close finds the step just dispatched not yet ready, twice in a row, and the run's
    last (exact) close then counts that step in a fraction of a step; merged with the one inexact window before it
    only, the last line read 5.6 ms a step beside 10 ms of host work (twice the real tokens/s)."""
    clock = Clock()
    timer = StepTimer(clock)
    _iteration(timer, clock, data=0.0, place=0.0, call=10e-3)   # step 1, 10 ms of host work a step; its close
    clock.t += 10e-3                                                # comes before it is ready (dispatch ends it)
    _iteration(timer, clock, data=0.0, place=0.0, call=0.0)     # step 2 dispatched; step 1 ready, step 2 not
    assert timer.window(steps=1, exact=False)["step_time_s"] == pytest.approx(20e-3)   # 2 steps' time, 1 counted
    clock.t += 10e-3
    _iteration(timer, clock, data=0.0, place=0.0, call=0.0)     # step 3 dispatched; step 2 ready, step 3 not
    assert timer.window(steps=1, exact=False)["step_time_s"] == pytest.approx(10e-3)
    clock.t += 1e-3                                                 # step 3 ends: the run's last close, exact
    last = timer.window(steps=1)
    assert last["step_time_s"] == pytest.approx(31e-3 / 3)         # the chain: 31 ms over 3 steps (not 5.5 ms)
    assert last["dispatch_time_s"] == pytest.approx(10e-3 / 3)
    clock.t += 10e-3   # merged once: the next window is its own again
    timer.step()
    assert timer.window(steps=1)["step_time_s"] == pytest.approx(10e-3)
