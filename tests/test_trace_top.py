"""benchmarks.trace_top: the device's busy time and idle gaps from a trace's kernel events."""

import gzip
import json

from benchmarks import trace_top


def _events(*spans, pid=7):
    return [{"ph": "X", "pid": pid, "name": f"k{i}", "ts": ts, "dur": dur} for i, (ts, dur) in enumerate(spans)]


def test_gaps_count_overlaps_once_and_bucket_the_idle_time():
    g = trace_top.gaps(_events((0, 10), (11, 5), (12, 2), (30, 1), (2000, 4)))
    # busy: [0,10) + [11,16) + [30,31) + [2000,2004) = 10 + 5 + 1 + 4; the kernel at 12 lies inside [11,16)
    assert g["busy_us"] == 20.0 and g["span_us"] == 2004.0
    assert g["idle_us"] == {(0, 2): 1.0, (10, 100): 14.0, (1000, float("inf")): 1969.0}
    assert g["idle_n"] == {(0, 2): 1, (10, 100): 1, (1000, float("inf")): 1}
    # busy + idle = span
    assert g["busy_us"] + sum(g["idle_us"].values()) == g["span_us"]


def test_gaps_of_no_events():
    assert trace_top.gaps([]) == {"busy_us": 0.0, "span_us": 0.0, "idle_us": {}, "idle_n": {}}


def test_device_events_read_the_gpu_process_of_a_trace(tmp_path, capsys):
    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
    events = meta + _events((0, 10), (12, 3)) + _events((0, 500), pid=1)
    with gzip.open(tmp_path / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert [e["name"] for e in trace_top.device_events(str(tmp_path))] == ["k0", "k1"]
    trace_top.top(str(tmp_path), 5)
    out = capsys.readouterr().out
    assert "total device-event time 0.0 ms" in out and "device busy 0.00 ms per step" in out
    assert "idle gaps        2-10 us:    0.001 ms per step" in out
