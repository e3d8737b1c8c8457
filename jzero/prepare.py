"""Preparing token data: list the input files, check they are text, tokenize them into train.bin / val.bin.

The writing side of `jzero.data` (which re-exports `prepare`, `default_corpus_dir`, `load_tokenizer`, ...), shared
by train/prepare_data.py and the default standard-library corpus. Layout written: `DIR/train.bin`, `DIR/val.bin`
(flat token ids, uint16 when the vocabulary fits, else uint32) and `DIR/meta.json`.

What is read, and why (so that running prepare again, or on a folder that holds odd files, is never silently
wrong):

* Prepared token files are never input. A directory walk skips train.bin, val.bin, meta.json (and prepare's
  own temporaries) in the --output-dir and in every directory that holds both meta.json and train.bin (a
  prepared dataset). Otherwise an output dir inside the input dir is read back at every run and the data grows
  with each one. Only those files are skipped, not the whole directory: with `--output-dir` equal to the
  input directory the text files beside them are still the input.
* Only UTF-8 text is tokenized, in byte mode as in tokenizer mode: a file that does not decode as UTF-8 or
  holds a NUL byte (binaries, UTF-16 text, token files) is not text. A file named explicitly is refused with a
  DataError (the user asked for exactly that file); one found by walking a directory is a stray in a corpus
  folder, so it is skipped with a one-line notice naming it, its partial tokens are removed, and meta.json
  counts it under "skipped".
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
from fractions import Fraction
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from jzero.errors import DataError

DEFAULT_CORPUS_MAX_BYTES = 8_000_000
_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
_BLOCK_BYTES = 1 << 20  # byte-level streaming block
_PIECE_CHARS = 1 << 20  # tokenizer mode: files larger than this are encoded in pieces (tokenizers needs
                        # ~220 bytes per character of a piece: 1M characters ~ 230 MB)
_DATASET_FILES = ("train.bin", "val.bin", "meta.json")
_TMP_PREFIXES = ("all.bin.tmp-", "val.bin.tmp-", "meta.json.tmp-")  # what prepare writes before the renames


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _print_notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def _walk_files(root: Path, excluded_dirs: Iterable[str] = (), suffix: str | None = None,
                output_dir: Path | None = None, notice: Callable[[str], None] | None = None) -> list[Path]:
    """Regular files under `root`, sorted by relative path; hidden entries, `__pycache__` and `excluded_dirs`
    are pruned, and so are prepared token files (train.bin, val.bin, meta.json, prepare's temporaries) in
    `output_dir` and in any directory holding meta.json and train.bin; `notice` hears about the latter."""
    excluded = {"__pycache__", *excluded_dirs}
    out = output_dir.resolve() if output_dir is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        is_dataset = "meta.json" in filenames and "train.bin" in filenames
        if is_dataset or (out is not None and Path(dirpath).resolve() == out):
            filenames = [n for n in filenames if n not in _DATASET_FILES and not n.startswith(_TMP_PREFIXES)]
            if is_dataset and notice is not None and Path(dirpath).resolve() != out:
                notice(f"skipped train.bin, val.bin, meta.json in {dirpath}: a prepared dataset is token ids, "
                       "not text")
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class InputFile(NamedTuple):
    """One input file; `walked` when found by walking a directory rather than named explicitly."""
    path: Path
    walked: bool


def list_input_files(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike | None = None,
                     notice: Callable[[str], None] | None = _print_notice) -> list[InputFile]:
    """Expand `inputs` (files, or directories walked recursively in sorted order, skipping hidden entries,
    `__pycache__` and prepared token files, see the module docstring) into a list of files.

    A file reached twice (named twice, named and inside a named directory, two overlapping directories, or two
    links to one file) is a DataError naming both ways: read twice, its second copy lands at the end of the
    stream, i.e. in val.bin, and evaluation would score text the model trained on."""
    files: list[InputFile] = []
    origins: list[str] = []   # how each file was reached, for the error on a file reached twice
    out = Path(output_dir) if output_dir is not None else None
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(InputFile(path, False))
            origins.append(f"named as {path}")
        elif path.is_dir():
            found = _walk_files(path, output_dir=out, notice=notice)
            if not found:
                raise DataError(f"input directory {path} holds no files to read (hidden entries, __pycache__ and "
                                "prepared train.bin/val.bin/meta.json are skipped); pass a directory with text files")
            files.extend(InputFile(p, True) for p in found)
            origins.extend(f"as {p} in directory {path}" for p in found)
        else:
            raise DataError(f"input {path} not found; pass existing text files or directories to --input")
    if not files:
        raise DataError("no input files given; pass text files or directories to --input")
    first: dict[Path, int] = {}   # resolved path -> index of its first appearance
    for i, f in enumerate(files):
        j = first.setdefault(f.path.resolve(), i)
        if j != i:
            raise DataError(f"input file {f.path.resolve()} is reached twice by --input, {origins[j]} and "
                            f"{origins[i]}; pass each file once (a directory includes every file under it)")
    return files


class _NotText(DataError):
    """An input file is not UTF-8 text; `reason` and `at` (byte offset in the file) say where."""

    def __init__(self, path: Path, reason: str, at: int):
        self.path, self.reason, self.at = path, reason, at
        super().__init__(f"input {path} is not UTF-8 text ({reason} at byte {at}); convert it to UTF-8 or leave it out")


class _Utf8Reader:
    """Decodes a file's bytes, given in consecutive blocks, as UTF-8; raises `_NotText` at the first byte that is
    not UTF-8 or is NUL, with its offset in the file (a block may end inside a character)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def decode(self, block: bytes, final: bool = False) -> str:
        pending = len(self._decoder.getstate()[0])   # bytes of a character begun in the previous block
        nul = block.find(b"\0")
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as e:
            at = self.offset - pending + e.start
            if 0 <= nul and self.offset + nul < at:
                raise _NotText(self.path, "NUL byte", self.offset + nul) from None
            raise _NotText(self.path, e.reason, at) from None
        if nul >= 0:
            raise _NotText(self.path, "NUL byte", self.offset + nul)
        self.offset += len(block)
        return text


def _byte_tokens(path: Path, budget: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids, bytes consumed) per block of `path`: its bytes, checked to be UTF-8 text, stopping after
    `budget` bytes when given (a character cut there is not an error)."""
    reader = _Utf8Reader(path)
    with open(path, "rb") as f:
        while budget is None or budget > 0:
            block = f.read(_BLOCK_BYTES if budget is None else min(_BLOCK_BYTES, budget))
            if not block:
                reader.decode(b"", final=True)   # a character cut at the end of the file
                return
            reader.decode(block)
            if budget is not None:
                budget -= len(block)
            yield np.frombuffer(block, dtype=np.uint8), len(block)


def _piece_cut(text: str, force: bool) -> int | None:
    """Where to end a piece of `text` (in its second half): before a newline or a single space that sits
    between two non-space characters, the last one. Such a boundary splits no pre-token of the common
    pre-tokenizers (GPT-2's byte-level regex keeps " word" together and tokenizes "X\nY" as X, \n, Y; whitespace
    splitters split there anyway), so the pieces' ids are the whole text's. None when there is none, unless
    `force` (the text is long: cut at its end, the one boundary that may differ from whole-text encoding)."""
    half = len(text) // 2
    for sep, start in (("\n", 1), (" ", 0)):   # cut after a newline, before a space
        i = text.rfind(sep, half, len(text) - 1)
        while i > half:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + start
            i = text.rfind(sep, half, i)
    return len(text) if force else None


def _text_pieces(path: Path) -> Iterator[tuple[str, int]]:
    """(text, UTF-8 bytes) of `path`, newlines kept as written: whole when small, else pieces of
    `_PIECE_CHARS` to 4x that many characters cut at a word boundary (`_piece_cut`). A line longer than that
    is read in parts too (it used to be read whole into one piece: a 19 MB file took 3.7 GB to encode, so a
    one-line file of a few hundred MB ran out of memory)."""
    reader = _Utf8Reader(path)
    with open(path, "rb") as f:
        parts, size = [], 0
        while raw := f.readline(_PIECE_CHARS):   # at most _PIECE_CHARS bytes: long lines come in parts
            parts.append(reader.decode(raw))
            size += len(parts[-1])
            if size >= _PIECE_CHARS:
                text = "".join(parts)
                cut = _piece_cut(text, force=size >= 4 * _PIECE_CHARS)
                if cut is not None:
                    yield text[:cut], len(text[:cut].encode("utf-8"))
                    parts, size = [text[cut:]], len(text) - cut
                else:
                    parts = [text]
        reader.decode(b"", final=True)
        text = "".join(parts)
        if text:
            yield text, len(text.encode("utf-8"))


def _document_frame(tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer's post-processor puts before and after one document (BERT's [CLS] / [SEP], Llama's
    <s>, none for GPT-2), found by post-processing a known encoding; None when its body cannot be located."""
    encoding = tokenizer.encode("a b", add_special_tokens=False)
    body, full = encoding.ids, tokenizer.post_process(encoding).ids
    for k in range(len(full) - len(body) + 1):
        if body and full[k:k + len(body)] == body:
            return full[:k], full[k + len(body):]
    return None


def _tokenizer_tokens(path: Path, tokenizer, budget: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids, UTF-8 bytes consumed) per text piece of `path`: the ids of `tokenizer.encode(file text)`, the
    post-processor's special tokens once around the whole file even when it is read in several pieces (encoding
    each piece as a document put a [CLS]/[SEP] or <s> pair into a huge file at every piece)."""
    frame = _document_frame(tokenizer)
    first = True
    for piece, n_bytes in _text_pieces(path):
        if budget is not None and n_bytes > budget:
            piece = piece.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
            n_bytes = budget
        if frame is None:   # a post-processor we cannot split: each piece framed as a document
            ids = tokenizer.encode(piece).ids
        else:
            ids = (frame[0] if first else []) + tokenizer.encode(piece, add_special_tokens=False).ids
        first = False
        yield np.asarray(ids, dtype=np.int64), n_bytes
        if budget is not None:
            budget -= n_bytes
            if budget <= 0:
                return
    if frame is not None and not first and frame[1]:
        yield np.asarray(frame[1], dtype=np.int64), 0


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face `tokenizers.Tokenizer` from a local tokenizer.json."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found; pass a local Hugging Face tokenizer.json to --tokenizer")
    from tokenizers import Tokenizer  # local: only tokenizer mode needs it
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file {path} cannot be loaded ({e}); pass a valid tokenizer.json") from None


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike,
            tokenizer: str | os.PathLike | None = None, val_fraction: float = 0.01,
            max_bytes: int | None = None, extra_meta: dict | None = None,
            notice: Callable[[str], None] | None = _print_notice) -> dict:
    """Tokenize `inputs` into `output_dir`/{train.bin,val.bin,meta.json}; returns the meta dict.

    Byte-level when `tokenizer` is None (vocab 256, token = UTF-8 byte), else the ids of the local
    tokenizer.json, each file encoded as one document (a huge file is encoded in ~1M-character pieces cut
    at word boundaries, see `_text_pieces`, with the tokenizer's document special tokens only at the file's start
    and end).
    Which files are read (not prepared token files, only UTF-8 text) is in the module docstring; `notice`
    (default: a `notice: ...` line on stderr) hears each file skipped.
    Streams: tokens go to one temporary file as they are made; the last `val_fraction` of that stream is then
    copied to val.bin and the file truncated into train.bin, so memory stays at one block/piece.
    `max_bytes` caps the input bytes read (the stream is cut there). Each file is replaced atomically, and
    meta.json is removed before train.bin/val.bin are replaced and written after them, so a run interrupted
    there leaves a directory that reads as unprepared (the readers refuse it) rather than mixed.
    """
    if not 0.0 < val_fraction < 1.0:   # 0 would write an empty val.bin that evaluation fails on much later
        raise DataError(f"--val-fraction {val_fraction} is out of range: val.bin gets that fraction of the tokens "
                        "and training evaluates on it; use a value in (0, 1), e.g. 0.01")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes {max_bytes} must be positive")
    out = Path(output_dir)
    files = list_input_files(inputs, output_dir=out, notice=notice)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    vocab_size = 256 if tok is None else tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_prepared(files, out, tok, tokenizer, vocab_size, dtype, val_fraction, max_bytes, extra_meta,
                               notice)
    except OSError as exc:   # a file in the way, read-only, disk full: the temporaries are already removed
        raise DataError(f"--output-dir {out}: writing the token files failed ({exc.strerror or exc}"
                        f"{': ' + str(exc.filename) if exc.filename else ''}); pass a writable directory with free "
                        "space") from None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):   # another user's process, or not a pid: leave the file
        return pid > 0
    return True


def _remove_stale_temporaries(out: Path, notice: Callable[[str], None] | None) -> None:
    """Delete the temporaries (all.bin.tmp-PID, val.bin.tmp-PID, meta.json.tmp-PID) of earlier prepare runs into
    `out` that were killed before their `finally` ran (SIGKILL, OOM, power loss): nothing else removes them, and
    all.bin.tmp-PID is as large as the whole token stream. A running process's temporaries are left alone."""
    for path in sorted(out.iterdir()):
        prefix = next((p for p in _TMP_PREFIXES if path.name.startswith(p)), None)
        pid = path.name[len(prefix):] if prefix else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)) and path.is_file():
            size = path.stat().st_size
            path.unlink()
            if notice is not None:
                notice(f"removed {path} ({size} bytes): left by an interrupted prepare (process {pid} is gone)")


def _write_prepared(files: list[InputFile], out: Path, tok, tokenizer, vocab_size: int, dtype, val_fraction: float,
                    max_bytes: int | None, extra_meta: dict | None, notice: Callable[[str], None] | None) -> dict:
    """`prepare`'s writing half: tokens to a temporary file, split into train.bin / val.bin, then meta.json.
    A walked file found not to be text midway has its tokens cut off the temporary file again and is skipped.
    Temporaries that an earlier, killed run left in `out` are removed first (a notice names each)."""
    _remove_stale_temporaries(out, notice)
    tag = f"tmp-{os.getpid()}"
    all_tmp, val_tmp = out / f"all.bin.{tag}", out / f"val.bin.{tag}"
    n_tokens, used, skipped, budget = 0, 0, 0, max_bytes
    try:
        with open(all_tmp, "wb") as f:
            for path, walked in files:
                if budget is not None and budget <= 0:
                    break
                start = (f.tell(), n_tokens, budget)
                try:
                    pieces = _byte_tokens(path, budget) if tok is None else _tokenizer_tokens(path, tok, budget)
                    for ids, n_bytes in pieces:
                        if tok is not None and ids.size and ids.max() >= vocab_size:
                            raise DataError(f"tokenizer {tokenizer} produced id {ids.max()} >= its vocab size "
                                            f"{vocab_size} on {path}; the tokenizer.json is inconsistent")
                        f.write(ids.astype(dtype).tobytes())
                        n_tokens += ids.size
                        budget = None if budget is None else budget - n_bytes
                except _NotText as e:
                    if not walked:
                        raise
                    f.seek(start[0])
                    f.truncate()
                    _, n_tokens, budget = start
                    skipped += 1
                    if notice is not None:
                        notice(f"skipped {path}: not UTF-8 text ({e.reason} at byte {e.at}); convert it to UTF-8 "
                               "to include it")
                    continue
                used += 1
        if n_tokens == 0:
            raise DataError(f"inputs ({len(files)} files, first {files[0].path}) gave no tokens; pass non-empty "
                            "text files")
        n_val = int(n_tokens * Fraction(str(val_fraction)))   # exact: 100 tokens at 0.29 give 29, not int(28.99..)
        n_train = n_tokens - n_val
        with open(all_tmp, "rb") as src, open(val_tmp, "wb") as dst:
            src.seek(n_train * dtype.itemsize)
            shutil.copyfileobj(src, dst, _BLOCK_BYTES)
        os.truncate(all_tmp, n_train * dtype.itemsize)
        # the old meta.json goes first and the new one comes last: a run killed between the renames leaves a
        # directory without meta.json (not prepared), never a new train.bin beside the old val.bin and meta.json
        (out / "meta.json").unlink(missing_ok=True)
        os.replace(all_tmp, out / "train.bin")
        os.replace(val_tmp, out / "val.bin")
    finally:
        for tmp in (all_tmp, val_tmp):
            tmp.unlink(missing_ok=True)
    meta = {"dtype": dtype.name, "vocab_size": int(vocab_size), "n_train_tokens": int(n_train),
            "n_val_tokens": int(n_val), "tokenizer": "bytes" if tok is None else str(Path(tokenizer).resolve()),
            "sources": used, "skipped": skipped, **(extra_meta or {})}
    _atomic_json(out / "meta.json", meta)
    return meta


def _stdlib_meta(max_bytes: int) -> dict:
    return {"corpus": "python-stdlib", "python": sys.version.split()[0], "max_bytes": int(max_bytes)}


def _cache_is_valid(out: Path, expected: dict) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("tokenizer") != "bytes" or any(meta.get(k) != v for k, v in expected.items()):
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all((out / name).is_file() and (out / name).stat().st_size == meta[key] * itemsize
               for name, key in (("train.bin", "n_train_tokens"), ("val.bin", "n_val_tokens")))


def default_corpus_dir(cache_dir: str | os.PathLike | None = None,
                       max_bytes: int = DEFAULT_CORPUS_MAX_BYTES, val_fraction: float = 0.01) -> Path:
    """A byte-level corpus present on every machine without download: this Python's standard library source.

    The stdlib's `.py` files (sorted; `test`, `tests`, `idlelib`, `site-packages` pruned), cut at `max_bytes`,
    prepared once by `prepare` into `cache_dir` (default `$JZERO_CACHE/stdlib_bytes_<max_bytes>`, JZERO_CACHE defaulting
    to ~/.cache/jzero). A cache whose meta.json names the same corpus, Python version and cap, and whose files
    have the recorded sizes, is reused. Returns the directory holding train.bin, val.bin and meta.json.
    """
    if cache_dir is None:
        # one directory per cap, so runs with different caps (e.g. tests beside a default run) never rebuild
        # each other's files underneath a reader
        cache_dir = Path(os.environ.get("JZERO_CACHE", "~/.cache/jzero")).expanduser() / f"stdlib_bytes_{max_bytes}"
    out = Path(cache_dir)
    expected = _stdlib_meta(max_bytes)
    if _cache_is_valid(out, expected):
        return out
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _walk_files(stdlib, _STDLIB_EXCLUDED_DIRS, suffix=".py")
    if not files:
        raise DataError(f"no .py files under the standard library at {stdlib}; pass a data path instead")
    prepare(files, out, tokenizer=None, val_fraction=val_fraction, max_bytes=max_bytes, extra_meta=expected)
    return out
