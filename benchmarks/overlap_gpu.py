"""Issue 21 item 4 on the lent GPU: is ``overlap_comm`` visible in the compiled GPU program's schedule?

One GPU cannot run an 8-way collective, but XLA:GPU can *compile* for a multi-host topology with mocked NCCL
(``jax_mock_gpu_topology`` = "slices x hosts x devices-per-host"; this process is host 0 and owns the real GPU). The
program it compiles is the one an 8-GPU run would get, scheduled by XLA:GPU's latency-hiding scheduler, so its text
says which collectives are asynchronous (``X-start`` ... ``X-done``) and how much compute lies between each pair
(:func:`jzero.overlap.async_collectives`). Nothing is executed: the engine is abstract (``initialize(abstract=True)``;
running its init on a mock cluster would wait for the 7 processes that do not exist).

    python -m benchmarks.overlap_gpu                  # on the GPU; one subprocess per (overlap_comm, mesh) variant

Each variant prints one row: async collective pairs, how many overlap compute (and the median compute instructions
between start and done), synchronous collectives left; ``--hlo DIR`` keeps each compiled text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: (name, overlap_comm value, overrides): ZeRO-3 over data=8, and tensor=2 x data=4 for collective matmul
VARIANTS = (
    ("zero3 overlap unset", None, ["zero_optimization.stage=3"]),
    ("zero3 overlap_comm=true", True, ["zero_optimization.stage=3"]),
    ("zero3 overlap_comm=false", False, ["zero_optimization.stage=3"]),
    ("zero2 overlap_comm=true", True, ["zero_optimization.stage=2"]),
    ("tp2 x dp4 zero1 overlap_comm=true", True, ["zero_optimization.stage=1", "mesh.tensor=2"]),
    ("tp2 x dp4 zero1 sequence-parallel overlap_comm=true", True,
     ["zero_optimization.stage=1", "mesh.tensor=2", "mesh.sequence_parallel=true"]),
)
MODEL = ["model.n_layer=4", "model.d_model=512", "model.n_head=8", "data.seq_len=512", "train_batch_size=16",
         "bf16.enabled=true"]


def worker(args) -> None:
    import faulthandler

    import jax

    faulthandler.dump_traceback_later(max(args.timeout - 10, 5), exit=True)   # where a slow variant is, if it is

    if args.topology:   # the flag is read from jax.config only (the environment variable is not picked up)
        jax.config.update("jax_mock_gpu_topology", args.topology)
    import jzero
    from jzero.config import load_config
    from jzero.overlap import async_collectives

    cfg = load_config(overrides=MODEL + json.loads(args.overrides))
    row = {"variant": args.variant, "devices": jax.device_count(), "local": jax.local_device_count(),
           "processes": jax.process_count(), "platform": jax.devices()[0].platform,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    engine = jzero.initialize(cfg, abstract=True)
    txt = engine.lower_train_step().compile().as_text()
    if args.hlo:
        Path(args.hlo).mkdir(parents=True, exist_ok=True)
        (Path(args.hlo) / (args.variant.replace(" ", "_").replace("=", "-") + ".hlo.txt")).write_text(txt)
    res = async_collectives(txt)
    over = sorted(p["overlapped"] for p in res["async"])
    kinds: dict[str, int] = {}
    for p in res["async"]:
        kinds[p["op"]] = kinds.get(p["op"], 0) + 1
    row |= {"async": len(over), "async_kinds": kinds, "overlapping": sum(o > 0 for o in over),
            "median_between": over[len(over) // 2] if over else 0, "sync": res["sync"],
            "collective_permutes": txt.count("collective-permute-start(") + txt.count("collective-permute(")}
    print("ROW " + json.dumps(row), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="1x8x1",
                   help="mock GPU topology: slices x hosts x devices per host ('' = the real devices)")
    p.add_argument("--hlo", help="folder to write each variant's compiled HLO text into")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per variant")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from jzero.config import load_config
    from jzero.xla_flags import flags_for

    rows = []
    for name, overlap, overrides in VARIANTS:
        if overlap is not None:
            overrides = overrides + [f"zero_optimization.overlap_comm={str(overlap).lower()}"]
        cfg = load_config(overrides=MODEL + overrides)
        # a multi-process compile shards GEMM autotuning over the processes and waits for their results in the
        # distributed store: with mocked processes it would wait forever, so autotuning is off (level 0)
        mock = ["--xla_gpu_shard_autotuning=false", "--xla_gpu_autotune_level=0"] if args.topology else []
        env = {**os.environ, "XLA_FLAGS": " ".join(list(flags_for(cfg)) + mock),
               "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "benchmarks.overlap_gpu", "--worker", "--variant", name,
               "--overrides", json.dumps(overrides), "--topology", args.topology, "--timeout", str(args.timeout)] + (["--hlo", args.hlo] if args.hlo else [])
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            got = [json.loads(ln[4:]) for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
            err = " | ".join(ln.strip() for ln in r.stderr.strip().splitlines()[-12:])[-1200:]
            rows.append(got[0] if got else {"variant": name, "error": f"exit {r.returncode}: {err}"})
        except subprocess.TimeoutExpired:
            rows.append({"variant": name, "error": f"timeout after {args.timeout:.0f} s"})
        print(json.dumps(rows[-1]), flush=True)
        if "error" in rows[-1] and len(rows) == 1:
            print("the first variant failed: the others would too; stopping", flush=True)
            break
    print("\n| variant | devices (local) | async pairs | by kind | overlapping compute | median compute between "
          "| sync collectives | collective-permutes (collective matmul) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        print(f"| {r['variant']} | {r['devices']} ({r['local']}) | {r['async']} | {r['async_kinds']} | "
              f"{r['overlapping']} | {r['median_between']} | {r['sync'] or '-'} | {r.get('collective_permutes', 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
