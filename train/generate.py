"""Generate text from a jzero checkpoint or a Hugging Face model: ``python -m train.generate``.

    python -m train.generate --checkpoint runs/default --prompt "def main(" --max-new-tokens 200
    python -m train.generate --hf gpt2_dir --prompt "Hello" --prompt "The" --temperature 0.8 --top-p 0.95 --seed 1
    python -m train.generate --hf llama_dir --tensor 2 --prompt-ids 128000,9906 --max-new-tokens 32

One prompt streams its continuation as it is decoded (``--chunk`` tokens at a time); several prompts run as one
padded batch and print in order when done. Text goes through the run's tokenizer (its data's ``meta.json``:
byte-level or a tokenizer.json), the HF directory's ``tokenizer.json``, or ``--tokenizer`` (a tokenizer.json or
``bytes``); ``--prompt-ids`` skips tokenizing. Decoding stops at ``--stop`` ids (default: the HF config's
``eos_token_id``). The library call is :func:`jzero.generate` / :class:`jzero.generation.Generator`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from train._main import ArgumentParser


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="jzero run directory (with checkpoints/) or checkpoint directory")
    src.add_argument("--hf", help="local Hugging Face GPT-2 or Llama directory (config.json + safetensors)")
    p.add_argument("--step", type=int, help="--checkpoint: step to load (default: the latest complete one)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="prompt as comma-separated token ids (repeatable; these rows come before --prompt rows)")
    p.add_argument("--tokenizer", help="tokenizer.json path, or 'bytes' for byte-level (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", type=int, action="append", help="stop token id (repeatable; default: HF eos_token_id)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (devices the weights are split over)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--chunk", type=int, default=8, help="tokens decoded per program call (streaming granularity)")
    p.add_argument("--scan-layers", action="store_true",
                   help="decode with the layer scan instead of unrolled layers (faster compile, slower per token)")
    return p.parse_args(argv)


class ByteTokenizer:
    """jzero's byte-level vocabulary (train.prepare_data without --tokenizer): token = UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json."""

    def __init__(self, path):
        from jzero.data import load_tokenizer

        self.tok = load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def tokenizer_for(args, needed: bool):
    """The tokenizer ``--tokenizer`` names, else the model's own; None when not found and not ``needed``."""
    from jzero.errors import ConfigError

    if args.tokenizer == "bytes":
        return ByteTokenizer()
    if args.tokenizer:
        return FileTokenizer(args.tokenizer)
    if args.hf:
        path = Path(args.hf) / "tokenizer.json"
        if path.is_file():
            return FileTokenizer(path)
        if needed:
            raise ConfigError(f"{path} not found: pass --tokenizer TOKENIZER_JSON, or --prompt-ids instead of --prompt")
        return None
    from jzero import checkpoint
    from jzero.weights import checkpoint_dir

    _, meta = checkpoint.read_meta(checkpoint_dir(args.checkpoint), args.step)
    data_path = (meta.get("config", {}).get("data") or {}).get("path")
    if not data_path:
        return ByteTokenizer()   # the embedded default corpus is byte-level
    try:
        kind = json.loads((Path(data_path) / "meta.json").read_text())["tokenizer"]
    except (OSError, ValueError, KeyError):
        if needed:
            raise ConfigError(f"the run's data.path {data_path} has no readable meta.json naming its tokenizer; "
                              f"pass --tokenizer (a tokenizer.json, or bytes)") from None
        return None
    return ByteTokenizer() if kind == "bytes" else FileTokenizer(kind)


def default_stops(args, vocab_size: int) -> list[int]:
    """``--stop`` ids, else the HF config's ``eos_token_id`` (ids the vocabulary cannot produce never occur, so a
    config naming one, as tiny test models do, just has no stop token)."""
    if args.stop is not None or not args.hf:
        return list(args.stop or [])
    eos = json.loads((Path(args.hf) / "config.json").read_text()).get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return [e for e in eos if 0 <= e < vocab_size]


def check_args(args) -> None:
    """One-line errors for the flags alone, before a model loads; what needs the model (token ids in its vocabulary,
    prompt + new tokens within its max_len) is checked by :meth:`Generator._check` before anything is printed."""
    from jzero.errors import ConfigError
    from jzero.sampling import SamplingConfig

    if args.step is not None and args.hf:
        raise ConfigError("--step applies to --checkpoint only (a Hugging Face directory has one set of weights)")
    if not args.prompt and not args.prompt_ids:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompt-ids 1,2,3 (repeat either for a batch)")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--chunk", args.chunk),
                        ("--tensor", args.tensor)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: give a count >= 1")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step {args.step}: give a checkpoint step >= 0, or leave it out for the latest")
    if not -2 ** 63 <= args.seed < 2 ** 63:
        raise ConfigError(f"--seed {args.seed}: give an integer that fits in 64 bits")
    SamplingConfig(args.temperature, args.top_k, args.top_p)   # --temperature / --top-k / --top-p and their mix


def main(argv=None) -> int:
    from jzero.errors import ConfigError, JzeroError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = False
    try:
        check_args(args)
        tok = tokenizer_for(args, needed=bool(args.prompt))
        try:
            prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids}: give comma-separated integers like 1,2,3") from None
        prompts += [tok.encode(text) for text in args.prompt]

        from jzero.generation import Generator

        kw = dict(tensor=args.tensor, dtype=args.dtype, unroll_layers=not args.scan_layers)
        gen = (Generator.from_hf(args.hf, **kw) if args.hf else
               Generator.from_checkpoint(args.checkpoint, step=args.step, **kw))
        stops = default_stops(args, gen.vocab_size)
        gen.check(prompts, args.max_new_tokens, args.chunk, stops)   # before the prompt is printed
        stream = len(prompts) == 1 and tok is not None
        streamed: list[int] = []
        shown = [tok.decode(prompts[0]) if stream else ""]

        def show(final: bool = False):
            """Print the text of prompt + tokens so far past what is shown; a trailing incomplete character
            (a partial UTF-8 sequence decodes to U+FFFD) waits for the next chunk unless ``final``."""
            text = tok.decode(prompts[0] + _until_stop(streamed, stops))
            if not final:
                text = text.rstrip("\ufffd")
            if text.startswith(shown[0]) and len(text) > len(shown[0]):
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text

        def on_tokens(step, toks_NxB):
            streamed.extend(int(t) for t in toks_NxB[:, 0])
            show()

        if stream:
            sys.stdout.write(shown[0])
            started = True
        out = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop_tokens=stops, seed=args.seed, chunk=args.chunk,
                           on_tokens=on_tokens if stream else None)
        if stream:
            streamed[:] = out.tokens[0]
            show(final=True)
    except JzeroError as exc:
        if started:   # end the streamed text's line: the error starts on its own
            print(flush=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stream:
        print()
    else:
        for i, (p, new) in enumerate(zip(prompts, out.tokens)):
            print(f"[{i}] " + (tok.decode(p) + tok.decode(new) if tok is not None else
                               " ".join(map(str, p)) + " | " + " ".join(map(str, new))))
    n = sum(len(t) for t in out.tokens)
    rate = (out.steps * len(prompts)) / out.decode_s if out.decode_s > 0 else float("nan")
    print(f"{n} new tokens for {len(prompts)} prompt(s): prefill {out.prefill_s * 1e3:.1f} ms, "
          f"decode {out.steps} steps in {out.decode_s:.2f} s ({rate:.1f} tokens/s, first call includes compiling)",
          file=sys.stderr)
    return 0


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


if __name__ == "__main__":
    sys.exit(main())
