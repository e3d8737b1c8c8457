"""1-bit optimizers vs their uncompressed baselines on the embedded default GPT (8 data-parallel CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.onebit_convergence [--steps 200]

Runs the default pretrain config with AdamW(adam_w_mode) / OneBitAdam / ZeroOneAdam and Lamb / OneBitLamb
(freeze_step = 15% of steps, ZeRO 0, no weight decay differences), and prints final losses and the relative gap.
"""

import argparse
import json
import sys


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="runs/onebit_convergence")
    args = p.parse_args(argv)
    from jzero.config import load_config
    from train.pretrain import DEFAULT_CONFIG, run

    freeze = int(0.15 * args.steps)
    common = [f"train.steps={args.steps}", f"scheduler.params.total_num_steps={args.steps}", "zero_optimization.stage=0",
              "train.eval_interval=0", "steps_per_print=50", "gradient_clipping=0", "optimizer.params.weight_decay=0"]
    runs = {
        "Adam": ["optimizer.type=Adam", "optimizer.params.adam_w_mode=false"],
        "OneBitAdam": ["optimizer.type=OneBitAdam", f"optimizer.params.freeze_step={freeze}"],
        "ZeroOneAdam": ["optimizer.type=ZeroOneAdam", f"optimizer.params.var_freeze_step={freeze}"],
        "Lamb": ["optimizer.type=Lamb"],
        "OneBitLamb": ["optimizer.type=OneBitLamb", f"optimizer.params.freeze_step={freeze}"],
    }
    results = {}
    for name, extra in runs.items():
        cfg = load_config(base=DEFAULT_CONFIG, overrides=common + extra + [f"train.output_dir={args.out}/{name}"])
        results[name] = run(cfg)["final_loss"]
        print(name, results[name], flush=True)
    print("| optimizer | final loss (mean of last 10) | baseline | relative gap |\n|---|---|---|---|")
    for name, base in [("Adam", "Adam"), ("OneBitAdam", "Adam"), ("ZeroOneAdam", "Adam"), ("Lamb", "Lamb"),
                       ("OneBitLamb", "Lamb")]:
        gap = (results[name] - results[base]) / results[base]
        print(f"| {name} | {results[name]:.4f} | {base} {results[base]:.4f} | {gap:+.2%} |")
    json.dump(results, open(f"{args.out}/results.json", "w"))


if __name__ == "__main__":
    sys.exit(main())
