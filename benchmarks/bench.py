"""Time the train step of named configs: ``python -m benchmarks.bench --config FILE [key=value ...] [--steps N]``.

Prints one markdown table row per config: tokens/s, MFU, step time (median over 3 windows of
back-to-back steps, each window synchronised at its end, as the training loop syncs only when it logs), compile time, peak device memory, per-device param / optimizer-state bytes (from the
real shards). Data are random tokens already on device, so the row measures the step alone. Runs on CPU
(tiny configs; MFU is then null: no known peak) and GPU.

    python -m benchmarks.bench --name gpt2-124m --config configs/gpt2_124m.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

COLUMNS = ["name", "device", "n_dev", "tokens_per_s", "mfu", "step_ms", "compile_s", "peak_mem_GiB",
           "params_MiB_per_dev", "opt_MiB_per_dev", "host_MiB_per_dev", "n_params_M"]
#: extra columns of ``--main`` rows: the loop's host overhead per step and the synchronised device step
MAIN_COLUMNS = ["host_ms", "queue_wait_ms", "device_step_ms"]


def bench(cfg, steps: int = 10, warmup: int = 2, name: str | None = None, profile_dir: str | None = None,
          hlo_path: str | None = None, token_range: int | None = None) -> dict:
    """Build the engine for ``cfg``, run ``warmup`` + ``steps`` steps on random tokens, return the row dict."""
    import jax
    import numpy as np

    import jzero
    from jzero import flops
    from jzero.monitor import device_memory_bytes

    engine = jzero.initialize(cfg)
    rc, mc = engine.config, engine.model_config
    t0 = time.perf_counter()
    engine.compile()
    compile_s = time.perf_counter() - t0
    if hlo_path:   # the optimized (fused) HLO: fusion names here are the kernel names in a profile
        with open(hlo_path, "w") as f:
            f.write(engine.compile().as_text())
    rng = np.random.default_rng(0)
    spec = engine.batch_spec()
    host = jax.tree.map(lambda s: rng.integers(0, token_range or mc.vocab_size, size=s.shape).astype(s.dtype), spec)
    batch = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), host, spec)
    for _ in range(warmup):
        jax.block_until_ready(engine.train_step(batch))
    # windows of `steps` back-to-back steps, synchronised at the end (as the training loop logs), median of 3
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            m = engine.train_step(batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / steps)
    step_s = statistics.median(times)
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(engine.train_step(batch))
    dev = jax.local_devices()[0]
    tokens = rc.train_batch_size * rc.data.seq_len
    tps = tokens / step_s
    fpt = flops.gpt_train_flops_per_token(flops.matmul_params(mc), mc.n_layer, rc.data.seq_len, mc.d_model)
    peak = flops.peak_flops(dev, flops.matmul_dtype(rc))
    mem = device_memory_bytes(dev) or {}
    per_dev = engine.memory_per_device()
    return {
        "name": name or "run",
        "device": dev.device_kind,
        "n_dev": jax.device_count(),
        "tokens_per_s": round(tps, 1),
        "mfu": None if peak is None else round(flops.mfu(tps, fpt, jax.device_count(), peak), 4),
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(compile_s, 2),
        "peak_mem_GiB": None if mem.get("peak_bytes_in_use") is None else round(mem["peak_bytes_in_use"] / 2**30, 2),
        "params_MiB_per_dev": round(per_dev["params"] / 2**20, 2),
        "opt_MiB_per_dev": round(per_dev["opt_state"] / 2**20, 2),
        "host_MiB_per_dev": round(per_dev["host"] / 2**20, 2),   # offloaded master + optimizer state
        "n_params_M": round(mc.n_params(include_pos=True) / 1e6, 2),
        "step_ms_all": [round(t * 1e3, 2) for t in times],
    }


def bench_main(path: str | None, overrides: list[str], steps: int = 10, name: str | None = None,
               profile_dir: str | None = None) -> dict:
    """Time the training main itself (``train.pretrain.run``: the data iterator over the config's ``data.path``
    or the embedded corpus, batch placement, dispatch, logging): 4 windows of ``steps`` steps, the first dropped
    (it holds the synchronised probes), median of the other 3 as in `bench`; same row plus host/device figures.
    ``profile_dir``: ``steps`` more steps after the timed ones traced by the main (``train.profile_steps``,
    :mod:`jzero.profiler`), the trace copied there; the row gains the device's busy fraction in the loop."""
    import shutil
    import tempfile

    import jax

    from jzero.config import load_config
    from train.pretrain import DEFAULT_CONFIG, run

    with tempfile.TemporaryDirectory(prefix="jzero-bench-main-") as out:
        total = 4 * steps + (steps if profile_dir else 0)
        over = [f"train.steps={total}", f"train.log_interval={steps}", f"steps_per_print={steps}",
                "train.eval_interval=0", "train.checkpoint_interval=0", f"train.output_dir={out}"]
        if profile_dir:
            over += [f"train.profile_steps={steps}", f"train.profile_start={4 * steps + 1}"]
        s = run(load_config(path, list(overrides) + over, base=None if path else DEFAULT_CONFIG))
        if profile_dir:
            shutil.copytree(f"{out}/profile", profile_dir, dirs_exist_ok=True)
        per_dev = s["memory_per_device_bytes"]
        trace = s.get("trace") or {}
        return {
            "name": name or "main",
            "device": jax.local_devices()[0].device_kind,
            "n_dev": s["n_devices"],
            "tokens_per_s": round(s["tokens_per_s"], 1),
            "mfu": None if s["mfu"] is None else round(s["mfu"], 4),
            "step_ms": round(s["step_time_s"] * 1e3, 2),
            "compile_s": round(s["compile_s"], 2),
            "peak_mem_GiB": None if s["peak_memory_bytes"] is None else round(s["peak_memory_bytes"] / 2**30, 2),
            "params_MiB_per_dev": round(per_dev["params"] / 2**20, 2),
            "opt_MiB_per_dev": round(per_dev["opt_state"] / 2**20, 2),
            "host_MiB_per_dev": round(per_dev["host"] / 2**20, 2),
            "n_params_M": round(s["n_params"] / 1e6, 2),
            "host_ms": round(s["host_time_s"] * 1e3, 2),
            "queue_wait_ms": round(s["queue_wait_s"] * 1e3, 2),
            "device_step_ms": round(s["device_step_s"] * 1e3, 2),
            **({"device_busy_pct": None if trace.get("device_busy_fraction") is None
                else round(100 * trace["device_busy_fraction"], 2),
                "idle_ms_per_step": None if trace.get("idle_ms_per_step") is None
                else round(trace["idle_ms_per_step"], 3)} if profile_dir else {}),
        }


def format_row(row: dict, columns=COLUMNS) -> str:
    return "| " + " | ".join("null" if row.get(c) is None else str(row[c]) for c in columns) + " |"


def header(columns=COLUMNS) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def set_kernel_tile(item: str) -> None:
    """``layer_norm.BLOCK_M=8`` -> ``jzero.kernels.layer_norm.BLOCK_M = 8`` (an existing int constant only); a
    dotted module path names any module's switch (``models.layers.NAME=0``)."""
    import importlib

    try:
        target, value = item.split("=")
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(module if "." in module else f"jzero.kernels.{module}")
        if not isinstance(getattr(mod, name), int):
            raise AttributeError(name)
        setattr(mod, name, int(value))
    except (ValueError, ImportError, AttributeError):
        raise SystemExit(f"--kernel-tile {item!r}: expected MODULE.NAME=INT naming an int constant of a "
                         f"jzero.kernels module, e.g. layer_norm.BLOCK_M=8 (or of a module by its dotted path, e.g. "
                         f"models.layers.NAME=0)") from None


def main(argv=None) -> int:
    from jzero.config import load_config
    from jzero.errors import JzeroError

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (default: the embedded default of train.pretrain)")
    p.add_argument("--name", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="append the row as JSON to this file")
    p.add_argument("--profile", help="write a jax.profiler trace of 3 more steps here (see benchmarks/trace_top.py); "
                        "with --main, of STEPS more steps of the main's own loop, and the row gains the device's "
                        "busy share of them (jzero.profiler)")
    p.add_argument("--hlo", help="write the compiled step's optimized HLO text here")
    p.add_argument("--kernel-tile", action="append", default=[], metavar="MODULE.NAME=INT",
                   help="set a tile constant of a jzero.kernels module for this run, e.g. layer_norm.BLOCK_M=8; "
                        "also read from $BENCH_KERNEL_TILE (comma-separated), so benchmarks.ab_main variants, "
                        "which differ by environment, can set them")
    p.add_argument("--main", action="store_true",
                   help="time the training main's loop (real data iterator, placement, logging) instead of the "
                        "step alone; adds host_ms, queue_wait_ms and device_step_ms columns")
    p.add_argument("--token-range", type=int, default=None,
                   help="draw the random tokens from [0, N) instead of the whole vocabulary")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from_env = [t for t in os.environ.get("BENCH_KERNEL_TILE", "").split(",") if t.strip()]
    for item in from_env + args.kernel_tile:
        set_kernel_tile(item.strip())
    try:
        from train.pretrain import DEFAULT_CONFIG

        cfg = load_config(args.config, args.overrides, base=None if args.config else DEFAULT_CONFIG)
        from jzero import xla_flags

        xla_flags.apply(cfg)   # before the backend starts (jzero.initialize)
        from jzero import compile_cache

        compile_cache.apply(cfg)   # as the mains do (train.compile_cache_dir)
        name = args.name or args.config or "default"
        if args.main:
            if args.hlo or args.token_range:
                raise SystemExit("--main times the real loop on real data; --hlo and --token-range apply to the "
                                 "step-alone mode only")
            row = bench_main(args.config, args.overrides, args.steps, name, args.profile)
        else:
            row = bench(cfg, args.steps, args.warmup, name, args.profile, args.hlo, args.token_range)
    except JzeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    traced = ["device_busy_pct", "idle_ms_per_step"] if args.main and args.profile else []
    emit(row, COLUMNS + (MAIN_COLUMNS + traced if args.main else []), args.json)
    return 0


def emit(row: dict, columns: list[str], json_path: str | None = None) -> None:
    """Print the table header and ``row``; append it as JSON to ``json_path`` if given."""
    print(header(columns))
    print(format_row(row, columns))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
