"""Tokenize text files into flat binary token files for training (nanoGPT/Megatron style).

    python -m train.prepare_data --input PATH [PATH ...] --output-dir DIR [--tokenizer tokenizer.json]
                                 [--val-fraction 0.01]

Inputs are UTF-8 text files or directories (walked recursively in sorted order, hidden entries skipped). Byte-level
by default (vocab 256, each UTF-8 byte a token), or the ids of a local Hugging Face tokenizer.json. Writes
DIR/train.bin, DIR/val.bin (the last --val-fraction of the token stream) and DIR/meta.json. The work is
`jzero.prepare.prepare`, the same code that builds the default standard-library corpus.

Never read as input: prepared token files (train.bin, val.bin, meta.json in DIR, or in any directory holding
meta.json and train.bin), so running again with DIR inside an input directory gives the same data. A file that
is not UTF-8 text (binary, UTF-16, a NUL byte) is an error when named in --input and skipped with a `notice:`
line when found in a directory. A file reached twice (named twice, or named and inside a named directory) is an
error: its second copy would be the end of the stream, i.e. val.bin, text the model also trains on.
"""
from __future__ import annotations

import argparse
import sys

from jzero.data import prepare
from jzero.errors import JzeroError
from train._main import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m train.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files or directories (recursive, sorted)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where train.bin, val.bin, meta.json go")
    parser.add_argument("--tokenizer", default=None, metavar="tokenizer.json",
                        help="local Hugging Face tokenizer.json (default: byte-level, vocab 256)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of the token stream, taken from its end, written to val.bin")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare(args.input, args.output_dir, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
    except JzeroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {meta['n_train_tokens']} train + {meta['n_val_tokens']} val tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']}) from "
          f"{meta['sources']} files" + (f", {meta['skipped']} not-text files skipped" if meta["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
