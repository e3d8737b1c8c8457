"""Peer liveness for multi-process runs: a process killed outside the launcher ends the others with one line.

Without a launcher (srun, mpirun, by hand) nobody watches the processes: when one is killed, JAX's
coordination service notices the missing heartbeats after ``heartbeat_timeout_seconds`` and aborts every
survivor from C++ (``LOG(FATAL)``: "Terminating process because the JAX distributed service detected fatal
errors", then a ~20-line native stack trace, SIGABRT). jzero beats first: each process writes a counter into the
coordination service's key-value store every second (a daemon thread, :func:`start`) and reads the others'. A
peer whose counter has not moved for half the heartbeat timeout, or a key-value store that stops answering
(process 0, which hosts it, is gone), ends this process with one line on stderr and exit code
:data:`EXIT_PEER_LOST`. A process that leaves cleanly marks itself done first (atexit), so the others never
take a normal end for a death.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

EXIT_PEER_LOST = 3
_PREFIX = "jzero/alive/"
_DONE = "done"
INTERVAL_S = 1.0


def _client():
    from jax._src import distributed

    return distributed.global_state.client


class Watcher:
    """Beats for ``process_id`` and checks the other ``num_processes - 1`` (see the module doc)."""

    def __init__(self, client, process_id: int, num_processes: int, stale_after_s: float):
        self.client, self.pid, self.n = client, process_id, num_processes
        self.stale_after_s = max(3.0 * INTERVAL_S, float(stale_after_s))
        self._stop = threading.Event()
        self._beat = 0
        self._seen: dict[int, tuple[str, float]] = {}   # peer -> (last value, monotonic time it changed)

    def beat(self) -> None:
        self._beat += 1
        self.client.key_value_set(f"{_PREFIX}{self.pid}", str(self._beat), allow_overwrite=True)

    def dead_peer(self, now: float) -> tuple[int, float] | None:
        """``(peer, seconds silent)`` of the first peer silent for ``stale_after_s``; peers done or not yet
        beating (still starting) are never dead."""
        beats = {}   # one key-value RPC per check for all peers (not one per peer: 256 processes stay cheap)
        for key, value in self.client.key_value_dir_get(_PREFIX):
            tail = key.rsplit("/", 1)[-1]
            if tail.isdigit():
                beats[int(tail)] = value
        for peer, value in sorted(beats.items()):
            if peer == self.pid or value == _DONE:   # a peer not listed has not beaten yet (still starting)
                continue
            last, since = self._seen.get(peer, (None, now))
            if value != last:
                self._seen[peer] = (value, now)
            elif now - since >= self.stale_after_s:
                return peer, now - since
        return None

    def run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.beat()
                dead = self.dead_peer(time.monotonic())
            except Exception as exc:  # noqa: BLE001  (the coordination service itself is unreachable)
                if self._stop.is_set():
                    return
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                _die(f"error: process {self.pid} of {self.n}: lost the coordination service hosted by process 0 "
                     f"({first[:200]}); process 0 was killed or crashed, see its log")
            if dead is not None and not self._stop.is_set():
                peer, silent = dead
                _die(f"error: process {self.pid} of {self.n}: process {peer} stopped sending heartbeats "
                     f"{silent:.0f} s ago (killed or crashed outside the launcher); stopping this process too, "
                     f"see process {peer}'s log for its cause")

    def stop(self, done: bool = True) -> None:
        """Stop beating; ``done`` tells the peers this process ended on purpose."""
        self._stop.set()
        if done:
            try:
                self.client.key_value_set(f"{_PREFIX}{self.pid}", _DONE, allow_overwrite=True)
            except Exception:  # noqa: BLE001  (the service may be gone already at shutdown)
                pass


def _die(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def start(process_id: int, num_processes: int, heartbeat_timeout_s: float) -> Watcher | None:
    """Start the watcher thread after ``jax.distributed.initialize``; None when there is no client."""
    client = _client()
    if client is None or num_processes < 2:
        return None
    watcher = Watcher(client, process_id, num_processes, heartbeat_timeout_s / 2)
    watcher.beat()
    threading.Thread(target=watcher.run, name="jzero-liveness", daemon=True).start()
    atexit.register(watcher.stop)   # registered after JAX's shutdown hook, so it runs before that barrier
    return watcher
