"""DeepSpeed's ``zero_optimization.overlap_comm`` as XLA scheduler flags, and a reader of a compiled schedule that
says which collectives run asynchronously and how much compute each one overlaps.

DeepSpeed overlaps gradient reduction with the backward pass (and ZeRO-3 prefetches the next layer's parameters)
on separate CUDA streams. Under XLA the compiled step is one program whose scheduler decides that order; on GPU
the knobs are XLA flags, read once when the backend starts (:mod:`jzero.xla_flags` sets them from a main):

``overlap_comm: true``   latency-hiding scheduler on; collectives inside the layer ``scan`` (ZeRO-3's per-layer
                         all-gather, the per-layer gradient reduce-scatter / all-reduce) pipelined across loop
                         iterations, so layer i+1's gather is issued while layer i computes (DeepSpeed's stage-3
                         prefetch); the loop double-buffered so that a prefetch has a buffer to land in; with
                         tensor parallelism, XLA's collective matmul (windowed einsum: the all-gather / reduce-
                         scatter of a TP matmul split into steps overlapped with the partial matmuls; XLA finds
                         those only under ``mesh.sequence_parallel``: plain TP's matmul + all-reduce has none).
``overlap_comm: false``  every collective synchronous and the latency-hiding scheduler off: communication never
                         overlaps compute, as DeepSpeed's overlap_comm=false (useful to measure what overlap buys).
unset                    XLA's own defaults (on GPU they already make collectives async under the latency-hiding
                         scheduler). DeepSpeed's default is true for stage 3 and false otherwise; jzero does not
                         copy that default, because "false" here costs the async collectives XLA gives by default.

XLA:CPU has no asynchronous collectives: its compiled HLO holds only synchronous ``all-gather`` / ``all-reduce``
ops with or without these flags (measured on jax 0.10.2; tests/test_overlap.py), so on CPU the key changes the
flags handed to XLA and nothing in the program. :func:`async_collectives` is what to run on a GPU program's text
(``jitted.lower(...).compile().as_text()``) to see the effect; ``python -m benchmarks.overlap_gpu`` does it for an
8-GPU program compiled on one GPU (a 4-layer GPT-2, ZeRO-3, H200, BENCHMARKS.md session 7): unset 8 async pairs,
true 19 (every one with compute scheduled inside it; the layer loop's gathers double-buffered), false 0.
"""

from __future__ import annotations

import re

#: overlap_comm: true. Every name is a real XLA flag: XLA aborts at backend start on an unknown one.
OVERLAP_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
#: overlap_comm: true with mesh.tensor > 1: collective matmul for every size of TP matmul.
COLLECTIVE_MATMUL_FLAGS: tuple[str, ...] = (
    "--xla_gpu_threshold_for_windowed_einsum_mib=0",
    "--xla_gpu_multi_streamed_windowed_einsum=true",
)
#: overlap_comm: false.
NO_OVERLAP_FLAGS: tuple[str, ...] = (
    "--xla_gpu_disable_async_collectives=ALLCOLLECTIVES",
    "--xla_gpu_enable_latency_hiding_scheduler=false",
)


def overlap_flags(overlap_comm: bool | None, tensor_parallel: int = 1) -> tuple[str, ...]:
    """The XLA flags for a value of ``zero_optimization.overlap_comm`` (None = unset: XLA's defaults)."""
    if overlap_comm is None:
        return ()
    if not overlap_comm:
        return NO_OVERLAP_FLAGS
    return OVERLAP_FLAGS + (COLLECTIVE_MATMUL_FLAGS if tensor_parallel > 1 else ())


_START = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=.*?\s(?P<op>all-gather|all-reduce|reduce-scatter|"
                    r"all-to-all|collective-permute|collective-broadcast)-start\(")
_DONE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=.*?\s(?:all-gather|all-reduce|reduce-scatter|all-to-all|"
                   r"collective-permute|collective-broadcast)-done\(.*?%(?P<start>[\w.\-]+)")
_SYNC = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=.*?\s(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
                   r"collective-permute|collective-broadcast)\(")
_COMPUTE = re.compile(r"\s(?:fusion|convolution|dot|custom-call)\(")


def async_collectives(hlo_text: str) -> dict:
    """Async collective pairs of a scheduled HLO module (``is_scheduled=true``: instruction order is the schedule).

    Per computation, each ``X-start`` is paired with the ``X-done`` naming it; ``overlapped`` counts the compute
    instructions (fusions, dots, convolutions, custom calls such as cuBLAS GEMMs) scheduled between the two,
    i.e. the work that runs while the collective is in flight. Returns ``{"async": [{"op", "overlapped"}],
    "sync": {op: count}}``.
    """
    pairs, sync = [], {}
    computations = re.split(r"\n(?=\S)", hlo_text)
    for comp in computations:
        open_, lines = {}, comp.splitlines()
        for i, line in enumerate(lines):
            m = _START.match(line)
            if m:
                open_[m["name"]] = (m["op"], i)
                continue
            m = _DONE.match(line)
            if m and m["start"] in open_:
                op, j = open_.pop(m["start"])
                pairs.append({"op": op, "overlapped": sum(bool(_COMPUTE.search(x)) for x in lines[j + 1:i])})
                continue
            m = _SYNC.match(line)
            if m:
                sync[m["op"]] = sync.get(m["op"], 0) + 1
    return {"async": pairs, "sync": sync}
