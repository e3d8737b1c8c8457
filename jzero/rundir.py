"""One run per output directory, and a clear line for a directory that cannot be written.

    with rundir.claim(cfg.train.output_dir):   # creates it, checks it is writable, locks DIR/.jzero.lock
        run(cfg)                               # a second run into DIR fails at once with RunDirError

Two runs writing one ``train.output_dir`` overwrite each other's config.json, metrics.jsonl, summary.json and
checkpoints. The lock is an exclusive ``flock`` on ``DIR/.jzero.lock``: the kernel releases it when the holder
exits, also on ``kill -9``, so a crashed run never leaves a stale lock behind (the file stays; its content only
names the last holder for the error message). flock locks belong to the open file, so a second claim in the
same process conflicts too. The mains take it on process 0 (the one that writes the directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from jzero.errors import RunDirError

LOCK_NAME = ".jzero.lock"


def ensure_writable(directory, key: str = "train.output_dir") -> Path:
    """Create ``directory`` (and parents) and prove it writable by creating and removing a file in it;
    :class:`RunDirError` naming ``key`` otherwise (read-only, a file in the way, no permission)."""
    path = Path(directory)
    probe = path / f".jzero-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{key}={path} is not a writable directory ({exc.strerror or exc}); set {key} to a "
                          "directory this user can write") from None
    return path


@contextlib.contextmanager
def claim(directory, key: str = "train.output_dir") -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` for the block (see the module doc); yields its Path."""
    path = ensure_writable(directory, key)
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"{key}={path}: cannot open its lock file {lock} ({exc.strerror or exc}); set {key} to "
                          "a directory this user can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunDirError(f"{key}={path} is in use by another run ({holder}); wait for it to end, or set "
                              f"{key} to another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


#: what a run writes into its output directory and a fresh run there would overwrite
RESULT_FILES = ("config.json", "metrics.jsonl", "summary.json")


def keep_earlier_results(directory, names=RESULT_FILES) -> Path | None:
    """Move an earlier run's result files (``names``) out of a fresh run's way, into ``DIR/earlier/<UTC time>/``,
    and return that directory (None when ``DIR`` holds none). A second run into one ``train.output_dir`` (a
    rerun of the quickstart, a retried sweep point) would otherwise overwrite the first run's metrics and summary
    with nothing said. A resumed run continues those files instead and does not call this."""
    path = Path(directory)
    found = [path / n for n in names if (path / n).is_file()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = path / "earlier" / stamp
    n = 1
    while dest.exists():   # two fresh runs within a second
        n += 1
        dest = path / "earlier" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for f in found:
        os.replace(f, dest / f.name)
    return dest
