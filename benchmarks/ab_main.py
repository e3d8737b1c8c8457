"""Variants of the training main, interleaved: ``python -m benchmarks.ab_main --config FILE --variant NAME=ENV ...``.

Why: on one H200 two runs of the same program in one call differed by 10 ms of a 225 ms Llama-1B step (4%,
BENCHMARKS.md "Session 9"), and step-alone rows by +-3 ms, more than most single changes move. One run per variant
therefore ranks noise. Here each round runs every variant once (``bench --main``, a fresh process each, in the order
given), ``--rounds`` times, and the table gives every run, the median, and the median's difference from the first
variant; so a machine that drifts during the call drifts under all variants alike.

    python -m benchmarks.ab_main --config configs/llama_1b.yaml --rounds 2 \\
        --variant shipped= --variant no-copies=JZERO_WEIGHT_COPIES=0 \\
        --variant no-residual=JZERO_KERNELS=layer_norm,rms_norm,cross_entropy,gelu_gemm,swiglu

A variant is ``NAME=`` (the environment as is) or ``NAME=KEY=VALUE[;KEY=VALUE...]``; ``--bench-arg`` passes an
argument to every ``bench`` run (``--bench-arg=--kernel-tile=cross_entropy.NUM_WARPS=16``), and a variant sets
kernel constants through ``bench``'s environment (``--variant no-rbias=BENCH_KERNEL_TILE=layer_norm.RESIDUAL_BIAS=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``'name=K=V;K2=V2'`` -> ``('name', {'K': 'V', 'K2': 'V2'})``; ``'name='`` -> ``('name', {})``."""
    name, sep, env = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME= or NAME=KEY=VALUE[;KEY=VALUE...]")
    pairs = {}
    for item in filter(None, (e.strip() for e in env.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        pairs[key] = value
    return name, pairs


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per variant (in the given order): its runs' step ms and MFU, their medians, and the median step's
    difference from the first variant's (ms and %)."""
    out, base = [], None
    for name, rows in runs.items():
        ms = [r["step_ms"] for r in rows if r.get("step_ms") is not None]
        mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
        med = statistics.median(ms) if ms else None
        base = med if base is None else base
        out.append({"variant": name, "runs_ms": ms, "median_ms": med,
                    "median_mfu": statistics.median(mfu) if mfu else None,
                    "vs_first_ms": None if med is None or base is None else med - base,
                    "vs_first_pct": None if med is None or not base else 100 * (med - base) / base})
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| variant | runs (ms/step) | median ms | median MFU | vs first |", "|---|---|---|---|---|"]
    for s in summary:
        runs = ", ".join(f"{m:.2f}" for m in s["runs_ms"]) or "failed"
        mfu = "n/a" if s["median_mfu"] is None else f"{100 * s['median_mfu']:.1f}%"
        vs = "" if s is summary[0] else f"{f(s['vs_first_ms'], '+.2f')} ms ({f(s['vs_first_pct'], '+.1f')}%)"
        lines.append(f"| {s['variant']} | {runs} | {f(s['median_ms'], '.2f')} | {mfu} | {vs} |")
    return "\n".join(lines)


def run_once(name: str, env: dict[str, str], args, json_path: str) -> dict | None:
    """One ``bench --main`` process; its row, or None when it failed (the tail of its output is printed)."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--main", "--name", name, "--json", json_path,
           "--steps", str(args.steps)] + (["--config", args.config] if args.config else []) + args.bench_arg
    before = _rows(json_path)
    proc = subprocess.run(cmd + args.overrides, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=args.timeout)
    rows = _rows(json_path)[len(before):]
    if proc.returncode or not rows:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"{name}: bench failed (exit {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return None
    return rows[-1]


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_main", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (default: the embedded default of train.pretrain)")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=ENV",
                   help="NAME= or NAME=KEY=VALUE[;KEY=VALUE...]; the first is the reference")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved (default 2)")
    p.add_argument("--steps", type=int, default=50,
                   help="steps per timing window of bench --main (default 50: two runs of one GPT-2 program came "
                        "0.03 ms apart with 50-step windows, 10-step windows moved ~0.5 ms within one run; "
                        "BENCHMARKS.md, session 12)")
    p.add_argument("--bench-arg", action="append", default=[], help="an argument for every bench run")
    p.add_argument("--json", help="append every run's row (with its variant and round) to this file")
    p.add_argument("--timeout", type=float, default=600, help="seconds one bench run may take")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: give 1 or more")
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names repeat ({names}); give each its own name")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = os.path.join(tmp, "rows.jsonl")
        for r in range(args.rounds):
            for name, env in variants:
                row = run_once(name, env, args, scratch)
                if row is None:
                    continue
                runs[name].append(row)
                print(f"round {r + 1} {name}: {row['step_ms']:.2f} ms/step", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({**row, "variant": name, "round": r + 1, "env": env}) + "\n")
    print(table(summarize(runs)))
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
