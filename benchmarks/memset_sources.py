"""Where a step's memsets come from: ``python -m benchmarks.memset_sources TRACE_DIR [N [STEPS]]``.

XLA's GPU runtime zero-fills some buffers before the kernel that writes them (a reduction that accumulates with
atomics, a scatter's output, a cuDNN attention backward's dQ accumulator, an aliased kernel output initialised to
zeros). In a trace (``bench --profile``, CUDA graphs off so each op is named) they show up as events named
``Memset ...`` that ``trace_top`` can only count: GPT-2 124M on an H100 ran 243 a step, 0.79 ms (BENCHMARKS.md,
session 16). This groups them by what they serve: the ``hlo_op`` the event carries when XLA annotated it, else the
next non-memset kernel on the same stream (the buffer's first writer, nearly always), with launches and time a step
and the mean bytes when the trace records a size. It prints the argument keys of the first memset too, so a trace
format that records more than assumed here shows it.
"""

from __future__ import annotations

import collections
import sys

from jzero.profiler import device_events


def is_memset(event: dict) -> bool:
    return "memset" in event.get("name", "").lower()


def _bytes(args: dict) -> int | None:
    for key, value in args.items():
        if any(w in key.lower() for w in ("bytes", "size")):
            try:
                return int(str(value).split()[0])
            except ValueError:
                continue
    return None


def memset_sources(events: list[dict]) -> dict[str, dict]:
    """``{source: {"n": launches, "us": total time, "bytes": [sizes recorded]}}`` for the memset events of
    ``events``; source = ``hlo_op <op>`` when the event names one, else ``before <next kernel on its stream>``
    (``before (end of trace)`` for a trailing one)."""
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[(e.get("pid"), e.get("tid"))].append(e)
    out: dict[str, dict] = {}
    for stream in by_stream.values():
        stream.sort(key=lambda e: float(e["ts"]))
        for i, e in enumerate(stream):
            if not is_memset(e):
                continue
            args = e.get("args") or {}
            if args.get("hlo_op"):
                source = f"hlo_op {args['hlo_op']}"
            else:
                nxt = next((x for x in stream[i + 1:] if not is_memset(x)), None)
                source = f"before {nxt['name'] if nxt else '(end of trace)'}"
            row = out.setdefault(source, {"n": 0, "us": 0.0, "bytes": []})
            row["n"] += 1
            row["us"] += float(e.get("dur", 0))
            size = _bytes(args)
            if size is not None:
                row["bytes"].append(size)
    return out


def report(trace_dir: str, n: int = 30, steps: int = 3) -> None:
    events = device_events(trace_dir)
    first = next((e for e in events if is_memset(e)), None)
    if first is None:
        print("no memset events in the trace")
        return
    print(f"first memset event: name {first['name']!r}, args keys {sorted((first.get('args') or {}))}")
    rows = memset_sources(events)
    total_n = sum(r["n"] for r in rows.values())
    total_us = sum(r["us"] for r in rows.values())
    print(f"{total_n / steps:g} memsets per step, {total_us / 1e3 / steps:.3f} ms per step, "
          f"{len(rows)} sources")
    for source, r in sorted(rows.items(), key=lambda kv: -kv[1]["us"])[:n]:
        size = f", {sum(r['bytes']) / len(r['bytes']) / 2**20:.2f} MiB each" if r["bytes"] else ""
        print(f"{r['us'] / 1e3 / steps:8.3f} ms x{r['n'] / steps:<6g} {r['us'] / r['n']:6.1f} us each{size}  "
              f"{source[:110]}")


if __name__ == "__main__":
    try:
        report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
