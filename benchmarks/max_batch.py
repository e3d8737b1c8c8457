"""Largest micro-batch that fits one device, from XLA's buffer assignment (no step is run):

    python -m benchmarks.max_batch --config configs/gpt2_124m.yaml --candidates 16,32,48,64 [key=value ...]

The engine is built once at the config's batch; the train step is then lowered and compiled for each candidate
micro-batch (``[1, rows, seq+1]`` tokens) and ``memory_analysis()`` gives what the compiled step needs:
arguments + outputs - donated aliases + temporaries. A candidate fits when that is at most ``--fraction`` (default
0.97, headroom for allocator fragmentation) of the allocator's ``bytes_limit``. Prints one line per candidate and
``largest: N`` last (0 if none fits); the benchmark table then times that batch with ``benchmarks.bench``.
"""

from __future__ import annotations

import argparse
import sys


def step_bytes(engine, rows: int) -> int:
    """Device bytes the compiled train step needs for a micro-batch of ``rows`` sequences (one micro-batch)."""
    import jax

    spec = engine.batch_spec()
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, rows) + s.shape[2:], s.dtype, sharding=s.sharding), spec)
    m = engine._train.lower(engine.state, batch).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def main(argv=None) -> int:
    import jax

    import jzero
    from jzero import xla_flags
    from jzero.config import load_config
    from jzero.errors import JzeroError

    p = argparse.ArgumentParser(prog="python -m benchmarks.max_batch", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--candidates", required=True, help="comma-separated micro-batch sizes, e.g. 16,32,48")
    p.add_argument("--fraction", type=float, default=0.97)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        xla_flags.apply(cfg)
        engine = jzero.initialize(cfg)
    except JzeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    best = 0
    for rows in sorted(int(c) for c in args.candidates.split(",")):
        need = step_bytes(engine, rows)
        fits = limit is None or need <= args.fraction * limit
        print(f"micro-batch {rows}: needs {need / 2**30:.2f} GiB ({need} bytes) of "
              f"{limit / 2**30 if limit else float('nan'):.2f} GiB -> {'fits' if fits else 'does not fit'}", flush=True)
        if fits:
            best = rows
    print(f"largest: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
