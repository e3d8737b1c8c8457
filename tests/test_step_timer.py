"""jzero.step_timer: the loop's per-step figures from a scripted clock (no real timing)."""
import pytest

from jzero.step_timer import PHASES, StepTimer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_window_splits_wall_time_and_host_phases():
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(4):   # each iteration: 1 ms data, 2 ms placement, 3 ms dispatch
        for name, dt in zip(PHASES, (1e-3, 2e-3, 3e-3)):
            with timer.phase(name):
                clock.t += dt
        clock.t += 14e-3   # device work the host waits for
        timer.step()
    w = timer.window(steps=4)
    assert w["step_time_s"] == pytest.approx(0.020)
    assert (w["data_wait_s"], w["place_time_s"], w["dispatch_time_s"], w["log_time_s"]) == pytest.approx(
        (1e-3, 2e-3, 3e-3, 0.0))
    assert w["host_time_s"] == pytest.approx(6e-3)
    # the window restarted: the next one starts from zero at the current time
    clock.t += 0.010
    timer.step()
    assert timer.window(steps=1) == pytest.approx({"step_time_s": 0.010, "host_time_s": 0.0,
                                                   **dict.fromkeys(PHASES, 0.0)})


def test_host_phases_average_over_timed_iterations_not_window_steps():
    """Metrics are fetched one step late, so a window of n steps timed n + 1 loop iterations after a restart."""
    clock, timer = Clock(), None
    timer = StepTimer(clock)
    for _ in range(5):
        with timer.phase("dispatch_time_s"):
            clock.t += 1e-3
        timer.step()
    w = timer.window(steps=4)
    assert w["dispatch_time_s"] == pytest.approx(1e-3) and w["step_time_s"] == pytest.approx(5e-3 / 4)


def test_probe_keeps_the_median_and_drains_first():
    clock, drained = Clock(), []
    timer = StepTimer(clock)
    assert timer.device_step_s is None
    for dt in (0.030, 0.010, 0.020):
        with timer.probe(lambda: drained.append(clock.t)):
            clock.t += dt
    assert drained == pytest.approx([0.0, 0.030, 0.040]) and timer.device_step_s == pytest.approx(0.020)
