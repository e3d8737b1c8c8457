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


def test_library_report_joins_gemm_kernels_to_their_custom_calls(tmp_path, capsys):
    """``fusion_report --library``: cuBLAS kernels, which carry no HLO name, are grouped by the ``hlo_op`` of their
    trace events; the report gives each op's time per step and mean, its custom call with layouts, the GEMM's
    dimension numbers and epilogue, and the operands' producers (so two GEMMs of one shape can be told apart)."""
    from benchmarks import fusion_report

    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    ev = lambda name, op, ts, dur: {"ph": "X", "pid": 7, "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                    "args": {"hlo_op": op}}
    events = meta + [ev("nvjet_NNT", "custom-call.12", 0, 45), ev("nvjet_NNT", "custom-call.12", 100, 45),
                     ev("nvjet_TNT", "custom-call.13", 200, 30), ev("loop_add_fusion", "loop_add_fusion", 300, 5),
                     ev("nvjet_NTT", "command_buffer_3", 400, 20)]
    with gzip.open(tmp_path / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    hlo = tmp_path / "hlo.txt"
    hlo.write_text(
        "ENTRY %main (p0: bf16[16384,768], p1: bf16[768,768]) -> bf16[16384,768] {\n"
        "  %fusion.3 = bf16[16384,768]{1,0} fusion(bf16[16384,768]{1,0} %p0), kind=kLoop, calls=%f3\n"
        "  %loop_add_fusion = bf16[16384,768]{1,0} fusion(bf16[16384,768]{1,0} %p0), kind=kLoop, calls=%f4\n"
        '  %custom-call.12 = (bf16[16384,768]{1,0}, s8[1024]{0}) custom-call(bf16[16384,768]{1,0} %fusion.3, '
        'bf16[768,768]{0,1} %p1), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":'
        '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
        '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"BIAS"}}\n'
        "}\n")
    fusion_report.library_report(str(tmp_path), str(hlo), 5, steps=2)
    out = capsys.readouterr().out
    assert "### nvjet_NNT <- custom-call.12: 0.045 ms/step, x1/step, 45.0 us each" in out
    assert "bf16[768,768]{0,1} %p1" in out and "backend_config" not in out
    assert "gemm: lc=[1] rc=[0] lb=[] rb=[] epilogue=BIAS" in out
    assert "<- %fusion.3 = bf16[16384,768]{1,0} fusion(" in out
    assert "### nvjet_TNT <- custom-call.13: 0.015 ms/step, x0.5/step, 30.0 us each" in out
    assert "### loop_add_fusion" not in out   # XLA's own fusions (named after an instruction) are report()'s
    # a kernel inside a CUDA graph carries the graph's thunk: said so, with the flag that names the op instead
    assert ("### nvjet_NTT <- command_buffer_3: 0.010 ms/step, x0.5/step, 20.0 us each\n  (inside a CUDA graph: the "
            "trace names the graph; XLA_FLAGS=--xla_gpu_enable_command_buffer= names the op)") in out


def test_memset_sources_group_by_hlo_op_or_the_next_kernel_on_the_stream(tmp_path, capsys):
    from benchmarks import memset_sources

    ev = lambda name, ts, dur, tid=1, **args: {"ph": "X", "pid": 7, "tid": tid, "name": name, "ts": ts,  # noqa: E731
                                               "dur": dur, "args": args}
    events = [ev("Memset 3", 0, 2, memset_size="1024"), ev("input_reduce_fusion_50", 3, 10),
              ev("Memset 3", 20, 4), ev("Memset 3", 25, 4), ev("sdpa_bwd", 30, 50),
              ev("Memset 3", 5, 3, tid=2, hlo_op="scatter.1"), ev("other", 1, 1, tid=2),
              ev("Memset 3", 90, 1)]
    rows = memset_sources.memset_sources(events)
    assert rows == {"before input_reduce_fusion_50": {"n": 1, "us": 2.0, "bytes": [1024]},
                    "before sdpa_bwd": {"n": 2, "us": 8.0, "bytes": []},
                    "hlo_op scatter.1": {"n": 1, "us": 3.0, "bytes": []},
                    "before (end of trace)": {"n": 1, "us": 1.0, "bytes": []}}
    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    with gzip.open(tmp_path / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    memset_sources.report(str(tmp_path), steps=1)
    out = capsys.readouterr().out
    assert "first memset event: name 'Memset 3', args keys ['memset_size']" in out
    assert "5 memsets per step, 0.014 ms per step, 4 sources" in out
    assert out.splitlines()[2].split()[-1] == "sdpa_bwd"   # the most time first
