"""Top GPU kernels by total time from a jax.profiler perfetto trace: ``python -m benchmarks.trace_top DIR [N]``.

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes and sums the
durations of complete events per name on device (GPU) threads; prints the top N with their share, then where the
device sat idle between kernels (:func:`gaps`): the union of the events' intervals against the span they cover.
A step's time is its kernels plus those gaps; gaps of a few microseconds between hundreds of small launches are
launch latency, which CUDA graphs (XLA command buffers) shrink and no kernel change touches.
"""

import collections
import gzip
import json
import pathlib
import sys


def device_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events on the trace's GPU processes."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, name in pids.items() if "/device:GPU" in name or "GPU" in name}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]


def kernel_totals(trace_dir: str):
    """(total us per kernel name on the GPU, launches per name, steps traced: bench --profile traces 3)."""
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in device_events(trace_dir):
        tot[e["name"]] += e.get("dur", 0)
        cnt[e["name"]] += 1
    return tot, cnt, 3


#: idle-gap buckets (us): launch latency between queued kernels, host stalls inside a step, and the host work
#: between the profiled steps (bench --profile synchronises after each of its 3 steps)
GAP_BUCKETS = ((0, 2), (2, 10), (10, 100), (100, 1000), (1000, float("inf")))


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
    return {"busy_us": busy, "span_us": spans[-1][1] - spans[0][0] if spans else 0.0,
            "idle_us": dict(idle), "idle_n": dict(count)}


def print_gaps(g: dict, steps: int = 3) -> None:
    print(f"device busy {g['busy_us'] / 1e3 / steps:.2f} ms per step (union of events, {steps} steps), "
          f"span {g['span_us'] / 1e3:.1f} ms")
    for lo, hi in GAP_BUCKETS:
        us, n = g["idle_us"].get((lo, hi), 0.0), g["idle_n"].get((lo, hi), 0)
        label = f"{lo:g}-{hi:g} us" if hi != float("inf") else f">= {lo:g} us"
        print(f"  idle gaps {label:>14}: {us / 1e3 / steps:8.3f} ms per step, {n / steps:7.1f} per step")


def top(trace_dir: str, n: int = 25):
    tot, cnt, steps = kernel_totals(trace_dir)
    all_us = sum(tot.values())
    print(f"total device-event time {all_us / 1e3:.1f} ms over the traced steps, {sum(cnt.values()) / steps:.0f} "
          f"events per step")
    for name, us in tot.most_common(n):
        print(f"{us / 1e3:9.2f} ms {100 * us / max(all_us, 1):5.1f}% x{cnt[name]:<4d} {name[:110]}")
    print_gaps(gaps(device_events(trace_dir)), steps)


if __name__ == "__main__":
    top(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
