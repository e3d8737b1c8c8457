"""Token data: prepare flat binary token files, read them through grain, cut global batches per process.

Layout on disk (as nanoGPT and Megatron): `DIR/train.bin` and `DIR/val.bin` are flat arrays of token ids
(uint16 when the vocabulary fits, else uint32) and `DIR/meta.json` records dtype, vocab size, token counts,
tokenizer and number of source files. Files are memory-mapped, never loaded whole.

Reading goes through grain (random-access source, index shuffle per epoch, per-process slicing, thread
prefetch, checkpointable iterator state) rather than a hand-written threaded loader. The order of records is
defined once, globally: global step s consumes records s*G .. s*G+G-1 of the shuffled, endlessly repeated
record stream (G = train_batch_size); micro-batch a of that step is the a-th run of G/accum records and
process p reads rows p*n_local .. (p+1)*n_local of every micro-batch. So the global batch does not depend on
how many processes read it, and an iterator state (the global step) resumes on any process count.

Writing these files (`prepare`, `default_corpus_dir`, `load_tokenizer`) lives in `jzero.prepare`, re-exported
here. grain is imported lazily (inside `BatchIterator`) so preparing data works where grain is not installed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from jzero.errors import ConfigError, DataError
# preparation lives in jzero.prepare; re-exported so `from jzero.data import prepare` etc. keep working
from jzero.prepare import (DEFAULT_CORPUS_MAX_BYTES, InputFile, default_corpus_dir, list_input_files,  # noqa: F401
                           load_tokenizer, prepare, token_dtype)

# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

_PREPARE_HINT = "run python -m train.prepare_data --input TEXT_FILES_OR_DIRS --output-dir {}"


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared data directory."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; " + _PREPARE_HINT.format(Path(data_dir)))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        + _PREPARE_HINT.format(Path(data_dir))) from None


def data_vocab(config: dict) -> int | None:
    """The training data's vocabulary from ``config['data']['path']/meta.json`` (None when not readable)."""
    data_path = (config.get("data") or {}).get("path")
    if not data_path:
        return None
    meta = Path(data_path) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError):
        return None


_CHECKED: dict[tuple, int] = {}   # (path, inode, size, mtime_ns, dtype) -> max token id, for this process
_CHECK_CHUNK = 1 << 24            # tokens per chunk of the max scan (32-64 MiB)


def max_token_id(path: str | os.PathLike, dtype: str | np.dtype) -> int:
    """The largest id in a token file (-1 when empty): a max over the memmap in chunks, cached by path, size and
    mtime, in this process and in ``$JZERO_CACHE/token_max/`` (best effort), so a large train.bin is scanned
    once, not at every run and every reopening."""
    import hashlib

    path, dtype = Path(path), np.dtype(dtype)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, dtype.name)
    if key in _CHECKED:
        return _CHECKED[key]
    disk = (Path(os.environ.get("JZERO_CACHE", "~/.cache/jzero")).expanduser() / "token_max"
            / hashlib.sha1(repr(key).encode()).hexdigest())
    try:
        _CHECKED[key] = int(disk.read_text())
        return _CHECKED[key]
    except (OSError, ValueError):
        pass
    n = st.st_size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    _CHECKED[key] = max((int(tokens[i:i + _CHECK_CHUNK].max()) for i in range(0, n, _CHECK_CHUNK)), default=-1)
    try:
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_text(str(_CHECKED[key]))
    except OSError:   # a read-only cache only costs the next run another scan
        pass
    return _CHECKED[key]


def check_token_ids(path: str | os.PathLike, dtype: str | np.dtype, vocab_size: int) -> None:
    """:class:`DataError` when a token file holds an id >= ``vocab_size`` (the embedding lookup would read past
    the table and the loss would be nan at every step): e.g. a text file copied in as train.bin."""
    top = max_token_id(path, dtype)
    if top >= vocab_size:
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        first = next(i + int(np.argmax(tokens[i:i + _CHECK_CHUNK] >= vocab_size))
                     for i in range(0, tokens.size, _CHECK_CHUNK) if (tokens[i:i + _CHECK_CHUNK] >= vocab_size).any())
        raise DataError(f"data file {path} holds token id {top} (first bad one at token {first}) >= vocab_size "
                        f"{vocab_size} of its meta.json, so it is not the token file meta.json describes; "
                        + _PREPARE_HINT.format(Path(path).parent))


_COUNT_KEYS = {"train.bin": "n_train_tokens", "val.bin": "n_val_tokens"}   # meta.json's count of each file


class TokenSource:
    """grain random-access source over a memory-mapped token file: record i = tokens[i*L : i*L + L + 1].

    Non-overlapping windows with stride seq_len (as Megatron's GPT dataset): input tokens[:-1], targets
    tokens[1:] share the boundary token with the next record. The dtype comes from meta.json next to the
    file unless given; then the file's token count must be the one meta.json records for it (n_train_tokens /
    n_val_tokens), so a train.bin from another run, or from an interrupted prepare, is refused. The memmap is
    opened lazily and dropped on pickling, so worker processes reopen it instead of copying the data.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, dtype: str | np.dtype | None = None,
                 vocab_size: int | None = None):
        self.path = Path(path)
        if self.path.is_dir():   # a prepared directory: its train split
            if not (self.path / "train.bin").is_file():
                raise DataError(f"{self.path} is a directory without train.bin; pass a token file, or "
                                + _PREPARE_HINT.format(self.path))
            self.path = self.path / "train.bin"
        if not self.path.is_file():
            raise DataError(f"data file {self.path} not found; " + _PREPARE_HINT.format(self.path.parent))
        if seq_len <= 0:
            raise ConfigError(f"seq_len {seq_len} must be positive")
        self.seq_len = int(seq_len)
        meta = None
        if dtype is None:
            if not (self.path.parent / "meta.json").is_file():
                raise DataError(f"{self.path.parent / 'meta.json'} not found to give the dtype of {self.path}; "
                                "pass dtype= or " + _PREPARE_HINT.format(self.path.parent))
            meta = read_meta(self.path.parent)
            dtype = meta["dtype"]
            vocab_size = meta.get("vocab_size") if vocab_size is None else vocab_size
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"data file {self.path} has {size} bytes, not a multiple of {self.dtype.name}'s "
                            f"{self.dtype.itemsize}; the file or its meta.json dtype is wrong, prepare it again")
        self.n_tokens = size // self.dtype.itemsize
        count_key = _COUNT_KEYS.get(self.path.name)
        if meta is not None and count_key in meta and meta[count_key] != self.n_tokens:
            raise DataError(f"data file {self.path} holds {self.n_tokens} tokens but its meta.json says {count_key}="
                            f"{meta[count_key]}: the file was replaced or a prepare was interrupted; "
                            + _PREPARE_HINT.format(self.path.parent))
        self._tokens: np.ndarray | None = None
        if vocab_size is not None:
            check_token_ids(self.path, self.dtype, int(vocab_size))

    @property
    def tokens(self) -> np.ndarray:
        """The whole token file as a read-only memmap (empty array for an empty file)."""
        if self._tokens is None:
            self._tokens = (np.memmap(self.path, dtype=self.dtype, mode="r") if self.n_tokens
                            else np.zeros(0, self.dtype))
        return self._tokens

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records of {self.path}")
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __repr__(self) -> str:
        return f"TokenSource({str(self.path)!r}, seq_len={self.seq_len}, records={len(self)})"


def _too_short(src: TokenSource, rows: int, what: str) -> DataError:
    fix = "use a smaller train_batch_size or seq_len, or more data"
    if what == "one eval batch":
        fix += (f" (prepare_data --val-fraction sets the size of {src.path.name}), or set train.eval_interval=0 "
                "to train without evaluation")
    return DataError(f"data file {src.path} has {src.n_tokens} tokens but {what} of {rows} rows x seq_len "
                     f"{src.seq_len} needs {rows * src.seq_len + 1}; {fix}")


def _check_split(rows: int, accum_steps: int, process_count: int, process_index: int, what: str) -> None:
    if rows <= 0 or accum_steps <= 0 or process_count <= 0:
        raise ConfigError(f"{what} {rows}, accum_steps {accum_steps} and process_count {process_count} "
                          "must all be positive")
    if rows % (accum_steps * process_count):
        raise DataError(f"{what} {rows} is not divisible by accum_steps {accum_steps} x process_count "
                        f"{process_count} = {accum_steps * process_count}; choose a multiple of it")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is out of range for process_count {process_count}")


def token_fingerprint(tokens: np.ndarray, samples: int = 16, width: int = 4096) -> str:
    """A short hash of a token file's contents: its length and ``samples`` evenly spaced runs of ``width`` tokens
    (~0.5 MB read, whatever the file's size). A resumed iterator checks it, so training data prepared again into
    the same directory with the same record count (other text, another tokenizer) is not continued as if it were
    the data the checkpoint's position counts in."""
    import hashlib

    h = hashlib.sha1(f"{tokens.size}:{tokens.dtype.name}".encode())
    n = tokens.size
    for i in range(samples if n else 0):
        start = (n - min(width, n)) * i // max(samples - 1, 1)
        h.update(np.ascontiguousarray(tokens[start:start + width]).tobytes())
    return h.hexdigest()[:16]


class BatchIterator:
    """Endless iterator over this process's share of each global training step, built on grain.

    `next()` returns int32 `[accum_steps, global_batch_rows // accum_steps // process_count, seq_len + 1]`.
    Pipeline: `MapDataset.source(TokenSource).shuffle(seed).repeat()` (grain reshuffles each epoch with seed +
    epoch) `.batch(n_local)` (one process's rows of one micro-batch), `.slice(p::process_count)` (this
    process's runs), `.batch(accum_steps)` (one step), `.to_iter_dataset(ReadOptions)` (thread prefetch of
    `prefetch` steps). Epochs run into each other: a step may hold the end of one epoch and the start of the
    next. `get_state()` is the global step plus the settings that fix the global order; it resumes on any
    process count or accum_steps. ``path`` is a token file (``DIR/train.bin``) or a prepared directory (its
    ``train.bin``).
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, global_batch_rows: int, accum_steps: int = 1,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 prefetch: int = 2, dtype: str | np.dtype | None = None):
        try:
            import grain  # local: grain is only needed to read training batches
        except ImportError:
            raise DataError("reading training batches needs grain; pip install grain") from None
        _check_split(global_batch_rows, accum_steps, process_count, process_index, "global batch rows")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"data seed {seed} is out of range; use an integer in [0, 2**32)")
        if prefetch < 0:
            raise ConfigError(f"prefetch {prefetch} must be >= 0 (0 reads each step synchronously)")
        self.source = TokenSource(path, seq_len, dtype)
        if len(self.source) < global_batch_rows:
            raise _too_short(self.source, global_batch_rows, "one global batch")
        self.seq_len, self.global_batch_rows, self.accum_steps = int(seq_len), int(global_batch_rows), accum_steps
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.process_index, self.process_count = process_index, process_count
        self.local_rows = global_batch_rows // accum_steps // process_count
        ds = grain.MapDataset.source(self.source)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        # drop_remainder changes nothing on an endless stream, but keeps len() finite: grain's ceil-division len
        # of batch(1) over repeat() overflows (one row per micro-batch per process, e.g. a deep pipeline)
        ds = (ds.repeat().batch(self.local_rows, drop_remainder=True)
              .slice(slice(process_index, None, process_count))
              .batch(accum_steps, drop_remainder=True))
        self._dataset = ds
        self._iter = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
                                        ).__iter__()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of each array `next()` returns."""
        return (self.accum_steps, self.local_rows, self.seq_len + 1)

    @property
    def step(self) -> int:
        """Number of global steps consumed so far (the index of the step `next()` returns)."""
        return int(self._iter.get_state()["next_index"])

    @property
    def epoch(self) -> float:
        """Epochs of the training file consumed so far."""
        return self.step * self.global_batch_rows / len(self.source)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iter)

    def _order_keys(self) -> dict:
        return {"global_batch_rows": self.global_batch_rows, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "n_records": len(self.source), "data_fingerprint": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """:func:`token_fingerprint` of the training file, computed once."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = token_fingerprint(self.source.tokens)
        return self._fingerprint

    def get_state(self) -> dict:
        """JSON-serialisable position: the next global step and what fixes the global order."""
        return {"step": self.step, **self._order_keys()}

    def set_state(self, state: dict) -> None:
        """Resume at `state["step"]`; refuses a state whose global order differs (other batch, data or seed)."""
        for key, value in self._order_keys().items():
            if key not in state:
                if key == "data_fingerprint":   # a state saved before fingerprints: the other keys still checked
                    continue
                raise DataError(f"data iterator state lacks {key!r}; it was not made by BatchIterator.get_state")
            if state[key] != value and key == "data_fingerprint":
                raise DataError(f"data iterator state was saved over other training data than {self.source.path} "
                                f"holds now (content fingerprint {state[key]} vs {value}: prepared again, another "
                                f"text or tokenizer); resume with the data the run trained on")
            if state[key] != value:
                raise DataError(f"data iterator state has {key}={state[key]} but this run has {key}={value}; "
                                f"resume with the same {key} (or start the data from step 0)")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"data iterator state step {step!r} must be a non-negative integer")
        self._iter.set_state({"next_index": step})

    def close(self) -> None:
        """Stop grain's prefetch threads."""
        self._iter.close()


def eval_batches(path: str | os.PathLike, seq_len: int, rows: int, n_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 dtype: str | np.dtype | None = None) -> Iterator[np.ndarray]:
    """Deterministic evaluation batches over a (validation) token file, no shuffle.

    Batch b holds records b*rows .. b*rows+rows-1 in file order; this process gets rows
    p*n_local .. (p+1)*n_local, as int32 `[rows // process_count, seq_len + 1]`. `n_batches=None` gives every
    full batch once; a larger `n_batches` than the file holds wraps around to its start (so a fixed number
    of eval batches works on a small val split, counting some records twice).
    """
    _check_split(rows, 1, process_count, process_index, "eval batch rows")
    src = TokenSource(path, seq_len, dtype)
    if len(src) < rows:
        raise _too_short(src, rows, "one eval batch")
    if n_batches is None:
        n_batches = len(src) // rows
    if n_batches <= 0:
        raise ConfigError(f"n_batches {n_batches} must be positive")
    n_local = rows // process_count
    for b in range(n_batches):
        first = b * rows + process_index * n_local
        yield np.stack([src[(first + r) % len(src)] for r in range(n_local)])
