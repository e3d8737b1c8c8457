"""Scaling predictor: step time, tokens/s and efficiency of a config on 1..N x G GPUs for each candidate
(ZeRO 0-3, ZeRO++ hpZ / qwZ / qgZ, 1-bit Adam), from the train step compiled on 8 fake CPU devices (jzero.plan,
docs/plan.md).

    python -m train.plan --config configs/gpt2_124m.yaml --nodes 16 --gpus-per-node 8 \
        [--nvlink-GBps 450] [--ib-GBps 50] [--step-ms-1gpu MS] [--gpu-mem-GiB 80] [--overlap 0] [key=value ...]
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from train._main import ArgumentParser


def parse_args(argv):
    from jzero.plan import CANDIDATES

    p = ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", "--deepspeed_config", dest="config",
                   help="DeepSpeed-style JSON/YAML (default: the embedded pretrain default)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--nvlink-GBps", type=float, default=450.0, help="per-GPU NVLink bandwidth, GB/s")
    p.add_argument("--ib-GBps", type=float, default=50.0, help="per-GPU InfiniBand bandwidth, GB/s (400 Gb/s NIC)")
    p.add_argument("--step-ms-1gpu", type=float, help="measured single-GPU step at the config's micro-batch, "
                   "whole model (with mesh.tensor x mesh.pipeline > 1 the planner splits it over that group; "
                   "default: BENCHMARKS.md's for the shipped configs)")
    p.add_argument("--gpu-mem-GiB", type=float, default=80.0)
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of compute that hides communication (0-1)")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--fake-devices", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


#: the numeric flags: (attribute, flag, what a valid value is); the counts are whole numbers by their argparse type
POSITIVE = [("nodes", "--nodes", "a node count >= 1"), ("gpus_per_node", "--gpus-per-node", "a GPU count >= 1"),
            ("fake_devices", "--fake-devices", "a device count >= 1"),
            ("nvlink_GBps", "--nvlink-GBps", "a bandwidth > 0"), ("ib_GBps", "--ib-GBps", "a bandwidth > 0"),
            ("step_ms_1gpu", "--step-ms-1gpu", "a step time > 0"), ("gpu_mem_GiB", "--gpu-mem-GiB", "a size > 0")]


def check_args(args) -> None:
    """One-line errors for out-of-range numbers, before the backend starts or anything compiles."""
    from jzero.errors import ConfigError

    for attr, flag, want in POSITIVE:
        value = getattr(args, attr)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value}: give {want}")
    if not (0.0 <= args.overlap <= 1.0):
        raise ConfigError(f"--overlap {args.overlap}: give the fraction of compute that hides communication, 0..1")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from jzero.errors import ConfigError, JzeroError

    try:
        check_args(args)
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):   # before the backend starts
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={args.fake_devices}").strip()
        from jzero import plan
        from jzero.config import load_config
        from train.pretrain import DEFAULT_CONFIG

        # the config file and overrides first: a missing file or a bad key is the error, not what follows from it
        load_config(args.config, args.overrides, base=None if args.config else DEFAULT_CONFIG)
        names = [c for c in args.candidates.split(",") if c]
        bad = [c for c in names if c not in plan.CANDIDATES]
        if bad:
            raise ConfigError(f"--candidates: unknown {bad}; known: {list(plan.CANDIDATES)}")
        step_ms = args.step_ms_1gpu
        stem = Path(args.config).stem if args.config else None
        if step_ms is None:
            if stem not in plan.STEP_MS_1GPU:
                raise ConfigError(f"--step-ms-1gpu: no measured single-GPU step for {stem or 'the default config'}; "
                                  f"give it (known: {plan.STEP_MS_1GPU})")
            step_ms = plan.STEP_MS_1GPU[stem]
        links = plan.Links(nvlink_GBps=args.nvlink_GBps, ib_GBps=args.ib_GBps)
        profiles = {}
        for name in names:
            cand = plan.CANDIDATES[name]
            if not cand.built():
                print(f"{name}: not built in this tree ({cand.needs} is not a config key); left out of the table")
                continue
            try:
                over = plan.candidate_overrides(args.config, args.overrides, DEFAULT_CONFIG, args.fake_devices, cand)
                cfg = load_config(args.config, over, base=None if args.config else DEFAULT_CONFIG)
                profiles[name] = plan.profile(cfg, name)
            except ConfigError as exc:   # the candidate does not apply to this config (the engine says why)
                print(f"{name}: skipped, {exc}", flush=True)
                continue
            print(f"compiled {name}: " + plan.describe(profiles[name]), flush=True)
        if not profiles:
            raise ConfigError(f"--candidates: none of {names} compiled for this config")
        print(plan.table(profiles, plan.gpu_counts(args.nodes, args.gpus_per_node), args.gpus_per_node,
                         step_ms / 1e3, links, args.overlap, args.gpu_mem_GiB * 2 ** 30))
    except JzeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
