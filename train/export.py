"""Export full weights from a (sharded) jzero checkpoint: ``python -m train.export CKPT_DIR --out FILE``.

DeepSpeed's ``zero_to_fp32``, without a GPU or a mesh: reads only the params of one checkpoint step into host
memory and writes them to safetensors, in jzero's names (``--format jzero``) or as a Hugging Face GPT-2 / Llama
directory that ``GPT2LMHeadModel`` / ``LlamaForCausalLM.from_pretrained`` loads (``--format hf``, ``--out`` is
then a directory).
"""

from __future__ import annotations

import sys

from train._main import ArgumentParser


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint_dir", help="checkpoint directory (checkpoint.dir of the run; holds step folders), "
                                          "or the run directory (train.output_dir) holding checkpoints/")
    p.add_argument("--out", required=True, help="output .safetensors file (--format jzero) or directory (--format hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the written weights")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest complete one)")
    p.add_argument("--format", choices=["jzero", "hf"], default="jzero",
                   help="jzero: one file, jzero param names; hf: Hugging Face GPT-2 / Llama config.json + "
                        "model.safetensors")
    p.add_argument("--vocab-size", type=int,
                   help="--format hf: the tokenizer's vocabulary (drops jzero's padded rows, e.g. 50304 -> 50257; "
                        "default: the training data's vocabulary from data.path/meta.json when the run recorded one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from jzero.errors import ConfigError, JzeroError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from jzero import export

        if args.vocab_size is not None and args.vocab_size < 1:   # 0 was ignored, -5 wrote 5 rows fewer
            raise ConfigError(f"--vocab-size {args.vocab_size}: give the tokenizer's vocabulary size (>= 1), or leave "
                              "it out to keep the model's")
        if args.format == "hf":
            path, step, n = export.export_hf(args.checkpoint_dir, args.out, args.dtype, args.step, args.vocab_size)
        else:
            if args.vocab_size is not None:
                raise ConfigError("--vocab-size applies to --format hf only; remove it")
            path, step, n = export.export_safetensors(args.checkpoint_dir, args.out, args.dtype, args.step)
    except JzeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:   # OSError, or safetensors' own SafetensorError (read-only / missing directory)
        from safetensors import SafetensorError

        if not isinstance(exc, (OSError, SafetensorError)):
            raise
        print(f"error: writing {args.out} failed ({_first_line(exc)}); pass an --out path in a writable "
              "directory", file=sys.stderr)
        return 2
    print(f"wrote {path}: {n:,} params from step {step} as {args.dtype} ({args.format} format)")
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
