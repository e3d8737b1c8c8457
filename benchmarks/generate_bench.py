"""Decode speed: jzero's KV-cache generation vs Hugging Face transformers' generate, one markdown table.

    python -m benchmarks.generate_bench                 # GPU: GPT-2 124M + Llama-1B, batch 1 and 32, bf16
    python -m benchmarks.generate_bench --tiny          # CPU check of the whole harness on tiny models

Rows (random weights, greedy, prompt 128 random ids, exactly 256 new tokens: no stop token, HF with
``min_new_tokens``): ``jzero`` (layer scan inside each decode step), ``jzero unrolled`` (one program per layer,
:class:`jzero.generation.Generator` ``unroll_layers``), ``hf eager`` (``model.generate``, PyTorch eager, SDPA
attention, dynamic cache) and ``hf static+compile`` (``cache_implementation="static"``, which transformers
auto-compiles with ``torch.compile`` on CUDA; the note says whether it did); last, if time is left, the two jzero
rows again with XLA command buffers around while loops (``+cmdbuf``, an experiment). tokens/s = batch x 256 / the
wall time of one whole generate call (prefill included), best of ``--runs`` after warm-up runs (compiles);
ms/token = that time / 256.

Each implementation runs in its own subprocess (JAX and PyTorch never share the GPU's memory; a crash or hang
costs only its rows) under a timeout taken from one overall ``--budget-s``, in priority order (jzero, HF eager,
HF static), so the whole run stays within the budget; a variant that fails or runs out of time prints its
error or ``timeout`` in its rows instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: XLA:GPU command buffers (CUDA graphs) also around while loops (the decode chunk's and the layer scan's), which
#: XLA's default leaves out: an experiment row, run last, only if the budget has time left
CMDBUF = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
IMPLS = ("jzero", "jzero unrolled", "jzero +cmdbuf", "jzero unrolled +cmdbuf", "hf eager", "hf static+compile")
#: subprocess groups in priority order: (worker, impls it produces, cap in seconds on the GPU, XLA_FLAGS added)
GROUPS = (("jzero", ("jzero", "jzero unrolled"), 150, ""), ("hf_eager", ("hf eager",), 100, ""),
          ("hf_static", ("hf static+compile",), 170, ""),
          ("jzero", ("jzero +cmdbuf", "jzero unrolled +cmdbuf"), 150, CMDBUF))


def sizes(model: str, tiny: bool) -> dict:
    """Architecture of each benchmarked model (HF Llama-3.2-1B's shape; GPT-2 124M), or a tiny stand-in."""
    if model == "gpt2":
        return (dict(n_layer=2, n_head=4, d_model=64, vocab=512, max_len=512) if tiny else
                dict(n_layer=12, n_head=12, d_model=768, vocab=50257, max_len=1024))
    return (dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, vocab=512, max_len=512) if tiny else
            dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, vocab=128256, max_len=8192))


# --------------------------------------------------------------------------- workers (one subprocess each)


def jzero_worker(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jzero import kernels
    from jzero.generation import Generator
    from models.gpt2 import GPT2, GPT2Config
    from models.llama import Llama, LlamaConfig

    s = sizes(args.model, args.tiny)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    if args.model == "gpt2":
        padded = -(-s["vocab"] // 64) * 64
        model = GPT2(GPT2Config(vocab_size=padded, n_layer=s["n_layer"], n_head=s["n_head"], d_model=s["d_model"],
                                d_ff=4 * s["d_model"], max_len=s["max_len"], dtype=dtype))
    else:
        model = Llama(LlamaConfig(vocab_size=s["vocab"], n_layer=s["n_layer"], n_head=s["n_head"],
                                  n_kv_head=s["n_kv_head"], d_model=s["d_model"], d_ff=s["d_ff"],
                                  max_len=s["max_len"], rope_theta=500000.0, tie_embeddings=True, dtype=dtype))
    with kernels.suspended():
        params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.key(0))
    suffix = " +cmdbuf" if CMDBUF in os.environ.get("XLA_FLAGS", "") else ""
    for impl, unroll in ((f"jzero{suffix}", False), (f"jzero unrolled{suffix}", True)):
        gen = Generator(model, params, vocab_size=s["vocab"], unroll_layers=unroll)
        for batch in args.batches:
            prompts = np.random.default_rng(batch).integers(0, s["vocab"], (batch, args.prompt)).tolist()

            def run():
                out = gen.generate(prompts, args.new, chunk=args.chunk)
                assert all(len(t) == args.new for t in out.tokens)
                return out

            t0 = time.perf_counter()
            run()
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t0)
            emit(args, impl, batch, min(times), f"first call {compile_s:.1f} s (compile); prefill "
                                                 f"{out.prefill_s * 1e3:.1f} ms; {jax.devices()[0].device_kind}")
        del gen


def hf_worker(args) -> None:
    import torch
    import transformers

    s = sizes(args.model, args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    if args.model == "gpt2":
        cfg = transformers.GPT2Config(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["d_model"],
                                      vocab_size=s["vocab"], n_positions=s["max_len"])
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.LlamaConfig(hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                                       num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                                       num_key_value_heads=s["n_kv_head"], vocab_size=s["vocab"],
                                       max_position_embeddings=s["max_len"], rope_theta=500000.0,
                                       tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    static = args.worker == "hf_static"
    impl = "hf static+compile" if static else "hf eager"
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, s["vocab"], (batch, args.prompt), generator=g).to(device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                  do_sample=False, pad_token_id=0)
        if static:
            kw["cache_implementation"] = "static"

        def run():
            with torch.inference_mode():
                out = model.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (batch, args.prompt + args.new), out.shape
            return out

        try:
            t0 = time.perf_counter()
            for _ in range(3 if static else 1):   # reduce-overhead records its CUDA graphs on the first calls
                run()
            warm_s = time.perf_counter() - t0
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        except Exception as exc:   # one failing variant must not lose the other rows
            emit(args, impl, batch, None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        compiled = hasattr(model, "_compiled_call")
        note = f"warm-up {warm_s:.1f} s; transformers {transformers.__version__}, torch {torch.__version__}"
        if static:
            note += "; torch.compile used" if compiled else "; NOT compiled (transformers compiles on CUDA only)"
        emit(args, impl, batch, min(times), note)


def emit(args, impl: str, batch: int, seconds: float | None, note: str) -> None:
    print("ROW " + json.dumps({"model": args.label, "batch": batch, "impl": impl, "seconds": seconds,
                               "note": note}), flush=True)


# --------------------------------------------------------------------------- the parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate_bench", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, short sequences (a CPU check of the harness)")
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int)
    p.add_argument("--new", type=int)
    p.add_argument("--runs", type=int, default=2, help="timed runs per row (best is reported)")
    p.add_argument("--chunk", type=int, default=32, help="jzero decode steps per program call")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    p.add_argument("--groups", default="jzero,hf_eager,hf_static,jzero_cmdbuf",
                   help="which implementations to run, in this priority (jzero_cmdbuf: jzero with XLA command buffers "
                        "around while loops)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--label", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.prompt = args.prompt or (16 if args.tiny else 128)
    args.new = args.new or (16 if args.tiny else 256)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    return args


LABELS = {"gpt2": ("GPT-2 124M", "GPT-2 tiny"), "llama": ("Llama-1B", "Llama tiny")}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        (jzero_worker if args.worker == "jzero" else hf_worker)(args)
        return 0
    start = time.monotonic()
    rows: dict[tuple, dict] = {}
    models = args.models.split(",")
    chosen = args.groups.split(",")
    groups = [g for g in GROUPS if (g[0] + ("_cmdbuf" if g[3] else "")) in chosen]
    root = Path(__file__).resolve().parents[1]
    for worker, impls, cap, flags in groups:
        for model in models:
            label = LABELS[model][1 if args.tiny else 0]
            left = args.budget_s - (time.monotonic() - start) - 5
            timeout = min(cap * (3 if args.tiny else 1), left)
            missing = {"seconds": None}
            if timeout < 15:
                for impl in impls:
                    for b in args.batches:
                        rows[(label, b, impl)] = {**missing, "note": "skipped: time budget spent"}
                continue
            cmd = [sys.executable, "-m", "benchmarks.generate_bench", "--worker", worker, "--model", model,
                   "--label", label, "--batches", ",".join(map(str, args.batches)), "--prompt", str(args.prompt),
                   "--new", str(args.new), "--runs", str(args.runs), "--chunk", str(args.chunk),
                   "--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
            env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "TOKENIZERS_PARALLELISM": "false"}
            if flags:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
            t0 = time.monotonic()
            try:
                res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
                out, err, why = res.stdout, res.stderr, None if res.returncode == 0 else f"exit {res.returncode}"
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
                why = f"timeout after {timeout:.0f} s"
            for line in out.splitlines():
                if line.startswith("ROW "):
                    r = json.loads(line[4:])
                    rows[(r["model"], r["batch"], r["impl"])] = r
            last_err = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")[:200]
            for impl in impls:
                for b in args.batches:
                    rows.setdefault((label, b, impl), {**missing, "note": f"{why or 'no row'}: {last_err}"})
            print(f"# {impls[0]} {model}: {time.monotonic() - t0:.0f} s{' (' + why + ')' if why else ''}",
                  file=sys.stderr, flush=True)
    print(table(rows, args))
    print(f"\ntotal wall time {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0


def table(rows: dict, args) -> str:
    lines = ["| model | batch | impl | prompt | new | tokens/s | ms/token | note |", "|---|---|---|---|---|---|---|---|"]
    for (label, b, impl), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], IMPLS.index(kv[0][2]))):
        s = r.get("seconds")
        tps = f"{b * args.new / s:,.0f}" if s else "-"
        mspt = f"{s / args.new * 1e3:.2f}" if s else "-"
        lines.append(f"| {label} | {b} | {impl} | {args.prompt} | {args.new} | {tps} | {mspt} | {r.get('note', '')} |")
    lines += ["", *speedups(rows, args)]
    return "\n".join(lines)


def speedups(rows: dict, args) -> list[str]:
    """The issue's goals: >= 2x HF eager at batch 1, >= 1.5x HF static+compile at batch 32 (best jzero row)."""
    out = []
    for label in sorted({k[0] for k in rows}):
        for b, ref, goal in ((min(args.batches), "hf eager", 2.0), (max(args.batches), "hf static+compile", 1.5)):
            ours = [(rows[k]["seconds"], k[2]) for k in rows if k[0] == label and k[1] == b
                    and k[2].startswith("jzero") and rows[k].get("seconds")]
            theirs = rows.get((label, b, ref), {}).get("seconds")
            if ours and theirs:
                best, impl = min(ours)
                x = theirs / best
                out.append(f"- {label} batch {b}: {impl} {x:.2f}x {ref} (goal >= {goal}x: "
                           f"{'met' if x >= goal else 'NOT met'})")
            else:
                out.append(f"- {label} batch {b}: no comparison with {ref} (a row is missing)")
    return out


if __name__ == "__main__":
    sys.exit(main())
