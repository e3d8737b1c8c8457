"""Is the data pipeline ever the bottleneck? ``python -m benchmarks.data_bench [--gpus 8] [--rows-per-gpu 16]``

Times `jzero.data.BatchIterator` (grain: shuffled random access into a memory-mapped token file, batching,
thread prefetch) plus the host half of `Engine.put_batch` (the int32 copy), pinned to ONE CPU core, for the
per-host batch of a node of ``--gpus`` GPUs (``--rows-per-gpu`` x ``--seq-len``, GPT-2 124M's shape by
default), and prints one table: tokens/s the iterator delivers, and its ratio to what one GPU consumes
(``--consumer-tokens-per-s``, default the GPT-2 124M main on one H200 in BENCHMARKS.md). The file is random
uint16 tokens (a prepared GPT-2-tokenizer corpus has that dtype), ``--tokens`` long, written to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_iterator(path: Path, seq_len: int, rows: int, steps: int, prefetch: int) -> list[float]:
    """Seconds per step (batch of ``rows`` x ``seq_len + 1``) for 3 windows of ``steps`` steps, after warm-up."""
    from jzero.data import BatchIterator

    it = BatchIterator(path, seq_len, rows, 1, seed=0, prefetch=prefetch)
    for _ in range(3):
        np.asarray(next(it), np.int32)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            np.asarray(next(it), np.int32)   # what Engine.put_batch does on the host before the transfer
        times.append((time.perf_counter() - t) / steps)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_bench", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs fed by one host (its per-host batch)")
    p.add_argument("--rows-per-gpu", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=100_000_000, help="length of the random token file")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prefetch", type=int, default=2, help="grain prefetch threads (BatchIterator's default)")
    p.add_argument("--cores", default="0", help="CPU cores to pin to, e.g. 0 or 0-3 (default: one core)")
    p.add_argument("--consumer-tokens-per-s", type=float, default=539_509.0,
                   help="what one GPU consumes (default: the GPT-2 124M main on one H200, BENCHMARKS.md session 5)")
    p.add_argument("--json", help="append the row as JSON to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    lo, _, hi = args.cores.partition("-")
    cores = set(range(int(lo), int(hi or lo) + 1))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)   # the whole process, grain's threads included
    try:
        rows = args.gpus * args.rows_per_gpu
        with tempfile.TemporaryDirectory(prefix="jzero-data-bench-") as tmp:
            d = Path(tmp)
            raw = d / "train.bin"
            rng = np.random.default_rng(0)
            with open(raw, "wb") as f:
                for i in range(0, args.tokens, 1 << 24):
                    f.write(rng.integers(0, 50257, size=min(1 << 24, args.tokens - i), dtype=np.uint16).tobytes())
            (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50257}))
            times = bench_iterator(raw, args.seq_len, rows, args.steps, args.prefetch)
    finally:
        os.sched_setaffinity(0, before)   # callers in-process (tests) get their cores back
    step_s = statistics.median(times)
    tps = rows * args.seq_len / step_s
    row = {"cores": args.cores, "gpus_per_host": args.gpus, "rows": rows, "seq_len": args.seq_len,
           "step_ms": round(step_s * 1e3, 3), "tokens_per_s": round(tps), "per_gpu_consumption": args.consumer_tokens_per_s,
           "x_one_gpu": round(tps / args.consumer_tokens_per_s, 1),
           "x_node": round(tps / (args.consumer_tokens_per_s * args.gpus), 2)}
    from benchmarks.bench import emit

    emit(row, list(row), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
