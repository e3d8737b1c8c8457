"""1-bit optimizers vs their uncompressed baselines on the embedded default GPT (8 data-parallel CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.onebit_convergence \
        [--steps 200] [--out DIR] [--only NAME[,NAME]]

Runs the default pretrain config (WarmupCosineLR, 20 warm-up steps, lr 2e-3, betas 0.9/0.99) with ZeRO 0, no
gradient clipping and no weight decay, for Adam / OneBitAdam / ZeroOneAdam / SignSGD and Lamb / OneBitLamb, and prints
each final loss (mean of the last 10 train losses, as train.pretrain's summary.json) and the gap to its
baseline. --only runs a subset; the table then takes the other optimizers' results from DIR/NAME/summary.json
of earlier runs (each optimizer takes minutes on a 2-core CPU, so they can be run one at a time).

Settings, per optimizer (freeze = 15% of steps; for --steps 200: 30):
  OneBitAdam:  freeze_step = freeze.
  ZeroOneAdam: var_freeze_step = freeze; var_update_scaler = freeze + 2 (the variance is refreshed on every
               step up to var_freeze_step, as 1-bit Adam's warm-up); local_step_scaler = (steps - freeze) // 2
               and local_step_clipper 2 (ranks sync every step for the first half of the frozen stage, every
               2nd step for the second half, while the cosine LR is below ~half its peak).
               For --steps 200: var_freeze_step 30, var_update_scaler 32, local_step_scaler 85,
               local_step_clipper 2. DeepSpeed's defaults (16 / 32678 / 16) are made for runs of ~10^5 steps;
               with DeepSpeed's var_update_scaler 16 the steps 17..31 alternate 1-bit-averaged gradients with
               exact ones, and that costs ~3% more final loss on this run (4 sequences per rank): see
               benchmarks/ONEBIT_NOTES.md for the measurements of each setting.
  SignSGD:     EF-Signum (momentum 0.9), compressed from step 1, peak lr SIGNSGD_LR (an SGD learning rate:
               its params replace the default's Adam betas/eps, which SignSGD does not take).
  OneBitLamb:  freeze_step = freeze, DeepSpeed's defaults for everything else (coeff_beta 0.9:
               1 / (1 - coeff_beta) = 10 <= freeze_step, as DeepSpeed asks).
"""

import argparse
import json
import os
import sys

NAMES = ("Adam", "OneBitAdam", "ZeroOneAdam", "SignSGD", "Lamb", "OneBitLamb")
BASELINE = {"Adam": "Adam", "OneBitAdam": "Adam", "ZeroOneAdam": "Adam", "SignSGD": "Adam", "Lamb": "Lamb",
            "OneBitLamb": "Lamb"}
#: SignSGD's peak LR: its step is a scaled sign with SGD's magnitude (jzero.optim.signsgd), so Adam's 2e-3 would
#: barely move; chosen from the short probes recorded in BENCHMARKS.md (override with --set SignSGD:...).
SIGNSGD_LR = 1.0


def zero_one_adam_params(steps: int) -> dict:
    """0/1 Adam's policy knobs for a run of `steps` steps (DeepSpeed's tutorial values scaled to the run)."""
    freeze = int(0.15 * steps)
    return {"var_freeze_step": freeze, "var_update_scaler": freeze + 2,
            "local_step_scaler": max(1, (steps - freeze) // 2), "local_step_clipper": 2}


def run_overrides(steps: int) -> dict[str, list[str]]:
    freeze = int(0.15 * steps)
    zo = [f"optimizer.params.{k}={v}" for k, v in zero_one_adam_params(steps).items()]
    return {
        "Adam": ["optimizer.type=Adam", "optimizer.params.adam_w_mode=false"],
        "OneBitAdam": ["optimizer.type=OneBitAdam", f"optimizer.params.freeze_step={freeze}"],
        "ZeroOneAdam": ["optimizer.type=ZeroOneAdam"] + zo,
        "SignSGD": ["optimizer.type=SignSGD", f"optimizer.params={{lr: {SIGNSGD_LR}, momentum: 0.9}}"],
        "Lamb": ["optimizer.type=Lamb"],
        "OneBitLamb": ["optimizer.type=OneBitLamb", f"optimizer.params.freeze_step={freeze}"],
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="runs/onebit_convergence")
    p.add_argument("--only", default=",".join(NAMES),
                   help=f"comma-separated subset of {','.join(NAMES)} to run (others are read from --out)")
    p.add_argument("--set", action="append", default=[], metavar="NAME:key=value",
                   help="extra override for one optimizer's run, e.g. ZeroOneAdam:optimizer.params."
                        "local_step_clipper=2 (repeatable)")
    args = p.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in NAMES]
    if bad:
        p.error(f"--only: unknown {bad}; choose from {NAMES}")
    extra: dict[str, list[str]] = {n: [] for n in NAMES}
    for s in args.set:
        name, _, kv = s.partition(":")
        if name not in NAMES or "=" not in kv:
            p.error(f"--set {s!r}: want NAME:key=value with NAME in {NAMES}")
        extra[name].append(kv)
    from jzero.config import load_config
    from train.pretrain import DEFAULT_CONFIG, run

    common = [f"train.steps={args.steps}", f"scheduler.params.total_num_steps={args.steps}", "zero_optimization.stage=0",
              "train.eval_interval=0", "steps_per_print=50", "gradient_clipping=0", "optimizer.params.weight_decay=0"]
    runs = run_overrides(args.steps)
    results, comm = {}, {}
    for name in NAMES:
        if name not in only:
            continue
        overrides = common + runs[name] + extra[name] + [f"train.output_dir={args.out}/{name}"]
        print(name, " ".join(runs[name] + extra[name]), flush=True)
        cfg = load_config(base=DEFAULT_CONFIG, overrides=overrides)
        summary = run(cfg)
        results[name], comm[name] = summary["final_loss"], summary.get("communication")
        print(name, results[name], flush=True)
    for name in NAMES:  # the others from earlier runs into the same --out
        path = f"{args.out}/{name}/summary.json"
        if name not in results and os.path.isfile(path):
            with open(path) as f:
                summary = json.load(f)
            if summary.get("steps") == args.steps and summary.get("final_loss") is not None:
                results[name], comm[name] = summary["final_loss"], summary.get("communication")
    print("| optimizer | final loss (mean of last 10) | baseline | relative gap | within 3% | bytes/step/device: "
          "compression stage vs fp32 all-reduce |\n|---|---|---|---|---|---|")
    for name in NAMES:
        base = BASELINE[name]
        if name not in results:
            continue
        c = comm.get(name) or {}
        if "compression" in c:
            sent = f"{c['compression']:,} vs {c['fp32_allreduce']:,} (1/{c['fp32_allreduce'] / c['compression']:.0f})"
        elif "one_program" in c:
            sent = f"all stages in one program: {c['one_program']:,} vs {c['fp32_allreduce']:,}"
        else:
            sent = ""
        if base not in results or name == base:
            print(f"| {name} | {results[name]:.4f} | | | | {sent} |")
            continue
        gap = (results[name] - results[base]) / results[base]
        print(f"| {name} | {results[name]:.4f} | {base} {results[base]:.4f} | {gap:+.2%} | "
              f"{'yes' if gap <= 0.03 else 'NO'} | {sent} |")
    os.makedirs(args.out, exist_ok=True)
    with open(f"{args.out}/results.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    sys.exit(main())
