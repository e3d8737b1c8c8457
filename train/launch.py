"""Start N JAX processes on this machine: ``python -m train.launch --nproc N [--devices-per-proc K] -- CMD ...``.

For development and tests of multi-process code without a cluster. Each rank runs ``CMD`` on the CPU backend
(``JAX_PLATFORMS=cpu``, gloo collectives) with K fake CPU devices (``XLA_FLAGS``), and finds the others through
``JZERO_COORDINATOR`` (127.0.0.1 and a free port), ``JZERO_NUM_PROCESSES`` and ``JZERO_PROCESS_ID``, which
:func:`jzero.distributed.maybe_initialize` reads. On a cluster use ``srun``/``mpirun`` instead (docs/cluster.md).

Output of rank i is forwarded line by line with a ``[rank i]`` prefix. Fail fast: when a rank exits non-zero,
the others are stopped (SIGTERM, then SIGKILL after ``--grace`` s), the rank and its exit code are named, and
the launcher exits non-zero (the rank's code, 128+signal if it was killed). ``--stall-timeout S`` also ends a run
in which no rank printed anything for S s (a collective that never completes): every rank is first asked for
its Python stacks (SIGUSR1, which jzero.distributed registers), so the log shows where each one waits.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from jzero.distributed import (CONNECTING, ENV_COORDINATOR, ENV_HEARTBEAT_TIMEOUT, ENV_INIT_TIMEOUT,
                               ENV_NUM_PROCESSES, ENV_PROCESS_ID)
from train._main import ArgumentParser

EXIT_USAGE = 2
EXIT_STALLED = 124          # like timeout(1)
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, k: int) -> str:
    """``XLA_FLAGS`` with the fake CPU device count set to ``k`` (an existing count is replaced)."""
    kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_FLAG + "=")]
    return " ".join(kept + [f"{_DEVICE_FLAG}={k}"])


def rank_env(base: dict, rank: int, nproc: int, coordinator: str, devices_per_proc: int,
             init_timeout: int | None = None, heartbeat_timeout: int | None = None) -> dict:
    """The environment of rank ``rank``: ``base`` plus the JZERO_* rendezvous, CPU platform and device count."""
    env = dict(base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(nproc), ENV_PROCESS_ID: str(rank),
                "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": with_device_count(base.get("XLA_FLAGS", ""), devices_per_proc)})
    if init_timeout is not None:
        env[ENV_INIT_TIMEOUT] = str(init_timeout)
    if heartbeat_timeout is not None:
        env[ENV_HEARTBEAT_TIMEOUT] = str(heartbeat_timeout)
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Rank:
    index: int
    proc: subprocess.Popen
    reached_init: bool = False
    threads: list = field(default_factory=list)


class Launcher:
    """Runs the ranks, forwards their output, and stops them all when one fails or all go silent."""

    def __init__(self, cmd: list[str], nproc: int, devices_per_proc: int = 1, port: int | None = None,
                 init_timeout: int | None = None, heartbeat_timeout: int | None = None,
                 stall_timeout: float | None = None, grace: float = 3.0, out=None, err=None):
        self.cmd, self.nproc, self.k = cmd, nproc, devices_per_proc
        self.coordinator = f"127.0.0.1:{port or free_port()}"
        self.init_timeout, self.heartbeat_timeout = init_timeout, heartbeat_timeout
        self.stall_timeout, self.grace = stall_timeout, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.ranks: list[Rank] = []
        self._lock = threading.Lock()
        self._last_output = time.monotonic()

    # ---- output
    def _say(self, msg: str) -> None:
        with self._lock:
            self.err.write(f"launch: {msg}\n")
            self.err.flush()

    def _pump(self, rank: Rank, stream, sink) -> None:
        marker = re.escape(CONNECTING.split("{process_id}")[0]) + rf"{rank.index} of {self.nproc} connecting"
        for line in iter(stream.readline, ""):
            if not rank.reached_init and re.search(marker, line):
                rank.reached_init = True
            with self._lock:
                self._last_output = time.monotonic()
                sink.write(f"[rank {rank.index}] {line if line.endswith(chr(10)) else line + chr(10)}")
                sink.flush()
        stream.close()

    # ---- processes
    def start(self) -> None:
        for i in range(self.nproc):
            env = rank_env(os.environ, i, self.nproc, self.coordinator, self.k, self.init_timeout,
                           self.heartbeat_timeout)
            proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    errors="replace", bufsize=1, start_new_session=True)
            rank = Rank(i, proc)
            for stream, sink in ((proc.stdout, self.out), (proc.stderr, self.err)):
                t = threading.Thread(target=self._pump, args=(rank, stream, sink), daemon=True)
                t.start()
                rank.threads.append(t)
            self.ranks.append(rank)
        pids = ", ".join(f"rank {r.index} pid {r.proc.pid}" for r in self.ranks)
        self._say(f"{self.nproc} ranks x {self.k} CPU devices, coordinator {self.coordinator}: {pids}")

    def _signal_all(self, sig: int) -> None:
        for r in self.ranks:
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, sig)     # the rank's own session: it and its children
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        """SIGTERM every live rank, SIGKILL what is left after ``grace`` s, and drain their output."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(r.proc.poll() is None for r in self.ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        for r in self.ranks:
            r.proc.wait()
            for t in r.threads:
                t.join(timeout=5)

    def _not_at_init(self) -> str:
        if not any(r.reached_init for r in self.ranks):
            return ""                               # the command does not use jzero.distributed (or died early)
        missing = [r.index for r in self.ranks if not r.reached_init]
        return f"; ranks that never reached jax.distributed.initialize: {missing}" if missing else ""

    def wait(self) -> int:
        """Poll until all ranks exit 0 (-> 0), one fails (-> its code) or all stall (-> 124)."""
        while True:
            done = 0
            for r in self.ranks:
                code = r.proc.poll()
                if code is None:
                    continue
                if code != 0:
                    live = [o.index for o in self.ranks if o.proc.poll() is None]
                    self._say(f"rank {r.index} (pid {r.proc.pid}) {describe_exit(code)}; stopping ranks {live}"
                              + self._not_at_init())
                    self.stop_all()
                    return code if code > 0 else 128 - code
                done += 1
            if done == len(self.ranks):
                for r in self.ranks:
                    for t in r.threads:
                        t.join(timeout=5)
                return 0
            if self.stall_timeout and time.monotonic() - self._last_output > self.stall_timeout:
                live = [r.index for r in self.ranks if r.proc.poll() is None]
                self._say(f"no output from any rank for {self.stall_timeout:g} s (--stall-timeout): a collective "
                          f"that never completes or a stuck rank; dumping Python stacks of ranks {live}, then "
                          f"stopping them" + self._not_at_init())
                self._signal_all(signal.SIGUSR1)
                time.sleep(min(2.0, self.grace))
                self.stop_all()
                return EXIT_STALLED
            time.sleep(0.1)

    def run(self) -> int:
        self.start()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def interrupted(signum, frame):
            self._say(f"received {signal.Signals(signum).name}; stopping all ranks")
            self.stop_all()
            sys.exit(128 + signum)

        for s in previous:
            signal.signal(s, interrupted)
        try:
            return self.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.launch", description=__doc__.splitlines()[0],
                                usage="python -m train.launch --nproc N [options] -- CMD [ARGS ...]")
    p.add_argument("--nproc", type=int, required=True, help="number of processes (ranks) to start")
    p.add_argument("--devices-per-proc", type=int, default=1, help="fake CPU devices per process (default 1)")
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--init-timeout", type=int, help=f"seconds for all ranks to meet (sets {ENV_INIT_TIMEOUT})")
    p.add_argument("--heartbeat-timeout", type=int,
                   help=f"seconds before JAX declares a silent rank dead (sets {ENV_HEARTBEAT_TIMEOUT})")
    p.add_argument("--stall-timeout", type=float,
                   help="end the run if no rank prints anything for this many seconds (default: never)")
    p.add_argument("--grace", type=float, default=3.0,
                   help="seconds between SIGTERM and SIGKILL (default 3; JAX treats SIGTERM as a preemption notice)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command every rank runs, after --")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    checks = [(args.nproc >= 1, f"--nproc {args.nproc} must be >= 1"),
              (args.devices_per_proc >= 1, f"--devices-per-proc {args.devices_per_proc} must be >= 1"),
              (args.port is None or 0 < args.port < 65536, f"--port {args.port} is not a port number"),
              (args.init_timeout is None or args.init_timeout > 0, "--init-timeout must be > 0 seconds"),
              (args.heartbeat_timeout is None or args.heartbeat_timeout > 0, "--heartbeat-timeout must be > 0"),
              (args.stall_timeout is None or args.stall_timeout > 0, "--stall-timeout must be > 0 seconds"),
              (args.grace >= 0, "--grace must be >= 0 seconds"),
              (bool(cmd), "no command given; put it after --, e.g. -- python -m train.pretrain")]
    for ok, msg in checks:
        if not ok:
            p.exit(EXIT_USAGE, f"error: {msg}\n")
    args.cmd = cmd
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(args.cmd, args.nproc, args.devices_per_proc, args.port, args.init_timeout,
                        args.heartbeat_timeout, args.stall_timeout, args.grace)
    try:
        return launcher.run()
    except FileNotFoundError as exc:
        print(f"error: cannot run {args.cmd[0]!r} ({exc.strerror}); check the command after --", file=sys.stderr)
        launcher.stop_all()
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
