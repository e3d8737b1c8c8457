"""Top GPU kernels by total time from a jax.profiler perfetto trace: ``python -m benchmarks.trace_top DIR [N [STEPS]]``
(STEPS: how many steps the trace holds, for the per-step figures; default 3, what ``bench --profile`` traces).

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes and sums the
durations of complete events per name on device (GPU) threads; prints the top N with their share, then where the
device sat idle between kernels (:func:`gaps`): the union of the events' intervals against the span they cover.
(The reading of a trace lives in :mod:`jzero.profiler`, which also traces steps of the training main itself.)
A step's time is its kernels plus those gaps; gaps of a few microseconds between hundreds of small launches are
launch latency, which CUDA graphs (XLA command buffers) shrink and no kernel change touches.
"""

import collections
import sys

from jzero.profiler import GAP_BUCKETS, device_events, gaps  # noqa: F401 (gaps: re-exported for callers)


def kernel_totals(trace_dir: str, steps: int = 3):
    """(total us per kernel name on the GPU, launches per name, steps traced)."""
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in device_events(trace_dir):
        tot[e["name"]] += e.get("dur", 0)
        cnt[e["name"]] += 1
    return tot, cnt, steps


def print_gaps(g: dict, steps: int = 3) -> None:
    print(f"device busy {g['busy_us'] / 1e3 / steps:.2f} ms per step (union of events, {steps} steps), "
          f"span {g['span_us'] / 1e3:.1f} ms")
    for lo, hi in GAP_BUCKETS:
        us, n = g["idle_us"].get((lo, hi), 0.0), g["idle_n"].get((lo, hi), 0)
        label = f"{lo:g}-{hi:g} us" if hi != float("inf") else f">= {lo:g} us"
        print(f"  idle gaps {label:>14}: {us / 1e3 / steps:8.3f} ms per step, {n / steps:7.1f} per step")


def top(trace_dir: str, n: int = 25, steps: int = 3):
    tot, cnt, steps = kernel_totals(trace_dir, steps)
    all_us = sum(tot.values())
    print(f"total device-event time {all_us / 1e3:.1f} ms over the traced steps, {sum(cnt.values()) / steps:.0f} "
          f"events per step")
    for name, us in tot.most_common(n):
        print(f"{us / 1e3:9.2f} ms {100 * us / max(all_us, 1):5.1f}% x{cnt[name]:<4d} {name[:110]}")
    print_gaps(gaps(device_events(trace_dir)), steps)


if __name__ == "__main__":
    try:
        top(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
