"""Top GPU kernels by total time from a jax.profiler perfetto trace: ``python -m benchmarks.trace_top DIR [N]``.

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes and sums the
durations of complete events per name on device (GPU) threads; prints the top N with their share.
"""

import collections
import gzip
import json
import pathlib
import sys


def kernel_totals(trace_dir: str):
    """(total us per kernel name on the GPU, launches per name, steps traced: bench --profile traces 3)."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, name in pids.items() if "/device:GPU" in name or "GPU" in name}
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            tot[e["name"]] += e.get("dur", 0)
            cnt[e["name"]] += 1
    return tot, cnt, 3


def top(trace_dir: str, n: int = 25):
    tot, cnt, steps = kernel_totals(trace_dir)
    all_us = sum(tot.values())
    print(f"total device-event time {all_us / 1e3:.1f} ms over the traced steps")
    for name, us in tot.most_common(n):
        print(f"{us / 1e3:9.2f} ms {100 * us / max(all_us, 1):5.1f}% x{cnt[name]:<4d} {name[:110]}")


if __name__ == "__main__":
    top(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
