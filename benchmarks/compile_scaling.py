"""Compile time of the train step vs layer count, layers scanned vs unrolled (a markdown table):

    python -m benchmarks.compile_scaling --layers 2,4,8,16,32 [key=value ...]

A small GPT (default d_model 64, seq 32, batch 8, one device) so the table measures XLA's work per layer, not
the arithmetic. With ``model.scan_layers=true`` the step holds one layer body inside a while loop, so compile
time should stay flat as layers grow; unrolled, XLA compiles every layer. Each cell is one fresh lowering +
compile (no persistent compilation cache: it is switched off here).
"""

from __future__ import annotations

import argparse
import sys
import time

BASE = ["model.preset=gpt2-tiny", "model.d_model=64", "model.n_head=4", "model.d_ff=256", "data.seq_len=32",
        "train_batch_size=8", "train_micro_batch_size_per_gpu=8", "mesh.data=1"]


def compile_seconds(n_layer: int, scan: bool, overrides: list[str]) -> float:
    import jzero
    from jzero.config import load_config

    cfg = load_config(base={}, overrides=BASE + [f"model.n_layer={n_layer}", f"model.scan_layers={str(scan).lower()}"]
                      + overrides)
    engine = jzero.initialize(cfg)
    t0 = time.perf_counter()
    engine.lower_train_step().compile()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,4,8,16,32")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| n_layer | compile s, scanned | compile s, unrolled |\n|---|---|---|")
    for n in (int(x) for x in args.layers.split(",")):
        s = compile_seconds(n, True, args.overrides)
        u = compile_seconds(n, False, args.overrides)
        print(f"| {n} | {s:.2f} | {u:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
