"""Async checkpointing cost: train-step time with a save in flight vs without.

    python benchmarks/checkpoint_bench.py [--d-model 512 --n-layer 8] [--devices 1] [--steps 6]

Builds a GPT-2 of ~25M params (byte vocabulary), trains a few steps to warm up, then measures
(1) the median step time with no save, (2) how long ``engine.save_checkpoint`` blocks (the device->host copy)
with ``checkpoint.async_save`` on (after one untimed warm-up save), (3) the median time of the steps that ran while that save was still being
written by orbax's background thread, (4) the save's total time, and (5) a synchronous save for reference.
Prints one markdown table row (plus the header). CPU numbers are what this machine gives; on a GPU the
device->host copy is the blocking part and the write overlaps with compute the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="train_batch_size (rows)")
    p.add_argument("--steps", type=int, default=6, help="steps measured without a save")
    p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0 = whatever JAX sees)")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--dir", help="checkpoint directory (default: a temporary one, removed afterwards)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import numpy as np

    import jzero
    from jzero import checkpoint
    from jzero.config import load_config

    overrides = [f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", f"model.n_head={args.d_model // 64}",
                 f"model.d_ff={4 * args.d_model}", f"model.max_len={args.seq_len}", f"data.seq_len={args.seq_len}",
                 f"train_batch_size={args.batch}", f"zero_optimization.stage={args.zero_stage}"]
    eng = jzero.initialize(load_config(base={}, overrides=overrides))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=eng.batch_shape()).astype(np.int32)

    def step() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(eng.train_step(batch)["loss"])
        return time.perf_counter() - t0

    step(), step()                                                 # compile + warm up
    plain = [step() for _ in range(args.steps)]
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(eng.state))

    with tempfile.TemporaryDirectory() as tmp:
        cc = eng.config.checkpoint
        cc.async_save = True
        # one save first, not timed: orbax's first save of a tree pays one-time costs (thread pools, tensorstore
        # contexts, the transfer programs) that every later save of the run skips
        eng.save_checkpoint(Path(args.dir or tmp) / "warmup")
        checkpoint.close()
        d = Path(args.dir or tmp) / "async"
        mgr = checkpoint.writer(d, cc.max_to_keep, cc.async_save)    # the manager save_checkpoint uses
        t0 = time.perf_counter()
        eng.save_checkpoint(d)
        blocked = time.perf_counter() - t0
        overlapped = []
        while mgr.is_saving_in_progress() and len(overlapped) < 50:
            overlapped.append(step())
        checkpoint.wait_until_finished(d)
        save_total = time.perf_counter() - t0
        checkpoint.close(d)

        eng.config.checkpoint.async_save = False
        t0 = time.perf_counter()
        eng.save_checkpoint(Path(args.dir or tmp) / "sync")
        sync_save = time.perf_counter() - t0
        checkpoint.close()

    if not overlapped:
        print("note: the async save finished before a step could run; use a bigger model (--d-model/--n-layer)")
    med = statistics.median
    row = {
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "params": f"{eng.n_params() / 1e6:.1f}M",
        "state MB": f"{state_bytes / 2**20:.0f}",
        "step s (no save)": f"{med(plain):.3f}",
        "step s (save in flight)": f"{med(overlapped):.3f} (n={len(overlapped)})" if overlapped else "-",
        "save() blocks s": f"{blocked:.3f}",
        "async save total s": f"{save_total:.2f}",
        "sync save s": f"{sync_save:.2f}",
    }
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
