"""Multi-process runs on JAX's own distributed runtime: who am I, where is process 0, and no silent hangs.

One process per host (all its GPUs) or one per GPU; every process runs the same main, calls
:func:`maybe_initialize` before touching JAX, and then sees the global device list. Where the parameters come
from, first match wins per field:

1. flags ``--coordinator HOST:PORT --num-processes N --process-id I [--local-device-ids 0,1]``;
2. env vars ``JZERO_COORDINATOR``, ``JZERO_NUM_PROCESSES``, ``JZERO_PROCESS_ID``, ``JZERO_LOCAL_DEVICE_IDS``
   (what ``python -m train.launch`` sets);
3. the scheduler, only when it runs more than one task: SLURM under ``srun`` (``SLURM_STEP_NODELIST``,
   ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``) or Open MPI under ``mpirun`` (``OMPI_COMM_WORLD_*``),
   with the coordinator on the first node and the port JAX itself derives from the job id
   (``JZERO_COORDINATOR_PORT`` or ``JAX_COORDINATOR_PORT`` overrides it).

We detect the scheduler here instead of letting ``jax.distributed.initialize`` do it so that the answer is
testable and one rule is ours: JAX pins each scheduler task to GPU ``local_rank``, which is right for one task
per GPU but leaves 7 of 8 GPUs idle with one task per host, and names a missing GPU when SLURM has already
narrowed ``CUDA_VISIBLE_DEVICES`` per task. We pin only when several tasks share a node that shows them all.

Bounded failure instead of a hang:
- a process other than 0 first waits (TCP) for the coordinator port and fails with an error naming process 0
  and the address if it does not open within the init timeout;
- if the rendezvous of all N processes does not complete within the init timeout, a watchdog prints one
  ``error:`` line naming this process, the count and the address, and exits with code 3 (JAX would otherwise
  abort a little later with a bare ``DEADLINE_EXCEEDED``);
- once running, :mod:`jzero.liveness` ends every process with one ``error:`` line (exit code 3) after half the
  heartbeat timeout when another is killed (JAX's own heartbeats, ``heartbeat_timeout_seconds``, would abort
  them from C++ with a native stack trace); when process 0 itself dies, JAX aborts the others at once;
- a process that fails (an uncaught exception, or :func:`exit_process` with a non-zero code) exits at once:
  JAX's exit hook would first wait up to 5 min in a shutdown barrier for the others, which are blocked in the
  step's collectives, so the launcher (or ``srun --kill-on-bad-exit``) would not see the failure for minutes;
- ``SIGUSR1`` dumps every thread's Python stack (``faulthandler``), so a launcher that sees no progress can
  show where each rank is stuck before it kills them (``train.launch --stall-timeout``).

On the CPU backend the cross-process collectives are gloo (``jax_cpu_collectives_implementation``, set before
initialization unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chooses another); the GPU backend uses NCCL.
"""

from __future__ import annotations

import faulthandler
import inspect
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, NoReturn, Sequence

from jzero.errors import JzeroError

ENV_COORDINATOR = "JZERO_COORDINATOR"
ENV_NUM_PROCESSES = "JZERO_NUM_PROCESSES"
ENV_PROCESS_ID = "JZERO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JZERO_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "JZERO_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JZERO_HEARTBEAT_TIMEOUT"
ENV_COORDINATOR_PORT = "JZERO_COORDINATOR_PORT"

DEFAULT_INIT_TIMEOUT = 300        # s, JAX's own default for initialization_timeout
DEFAULT_HEARTBEAT_TIMEOUT = 100   # s, JAX's own default for heartbeat_timeout_seconds
EXIT_INIT_TIMEOUT = 3             # exit code of a process whose rendezvous timed out
_JAX_GRACE_S = 15                 # JAX's own init deadline is ours + this, so our message comes first

# Printed (stderr) by every process just before the rendezvous; train.launch looks for it to name the ranks
# that never got there.
CONNECTING = "jzero.distributed: process {process_id} of {num_processes} connecting to {coordinator} ({source})"

_FLAG = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id",
         "local_device_ids": "--local-device-ids"}
_ENV = {"coordinator": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES, "process_id": ENV_PROCESS_ID,
        "local_device_ids": ENV_LOCAL_DEVICE_IDS}


class DistributedError(JzeroError, RuntimeError):
    """Multi-process settings are missing or inconsistent, or the processes could not meet."""


@dataclass(frozen=True)
class DistributedSpec:
    """Everything ``jax.distributed.initialize`` needs; ``source`` says where it came from (for messages)."""

    coordinator: str                       # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None   # GPUs this process uses (None: all it sees)
    source: str = "flags"                  # flags | env | slurm | ompi, joined with '+' when mixed


# --------------------------------------------------------------------------- parsing helpers


def _names(field: str) -> str:
    return f"{_FLAG[field]} / {_ENV[field]}"


def _int(value, field: str, lo: int) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{_names(field)}={value!r} is not an integer; pass e.g. {_FLAG[field]} "
                               f"{max(lo, 1)}") from None
    if out < lo:
        raise DistributedError(f"{_names(field)}={out} must be >= {lo}")
    return out


def _device_ids(value, field: str = "local_device_ids") -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [s for s in str(value).replace(" ", "").split(",") if s]
    try:
        ids = tuple(int(s) for s in items)
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0:
        raise DistributedError(f"{_names(field)}={value!r} is not a list of GPU indices; pass e.g. 0,1")
    return ids


def split_address(address: str, what: str = _names("coordinator")) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) -> (host, port); one-line error naming ``what`` otherwise."""
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{what}={address!r} is not HOST:PORT; pass e.g. 10.0.0.1:12345")
    return host, int(port)


def timeout_seconds(value, flag: str, env_var: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """A positive whole number of seconds from the flag value, else ``env_var``, else ``default``."""
    env = os.environ if environ is None else environ
    src, raw = (flag, value) if value is not None else (env_var, env.get(env_var))
    if raw is None or raw == "":
        return default
    try:
        out = int(raw)
    except (TypeError, ValueError):
        out = 0
    if out <= 0:
        raise DistributedError(f"{src}={raw!r} must be a positive number of seconds, e.g. {default}")
    return out


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'node[003-004,9],gpu1' -> 'node003' (JAX's rule)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistributedError(f"SLURM_STEP_NODELIST={nodelist!r} cannot be parsed; pass --coordinator HOST:PORT")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed list, e.g. '4(x2),3' -> [4, 4, 3][node_id]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistributedError(f"SLURM tasks-per-node {tasks_per_node!r} cannot be parsed; "
                                   f"pass {ENV_LOCAL_DEVICE_IDS} explicitly")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else counts[-1]


# --------------------------------------------------------------------------- detection


def _port_override(env: Mapping[str, str]) -> str | None:
    for var in (ENV_COORDINATOR_PORT, "JAX_COORDINATOR_PORT"):
        if env.get(var):
            if not env[var].isdigit() or not 0 < int(env[var]) < 65536:
                raise DistributedError(f"{var}={env[var]!r} is not a port number; pass e.g. 12345")
            return env[var]
    return None


def _slurm(env: Mapping[str, str]) -> dict | None:
    """srun with more than one task (SLURM_STEP_NODELIST is set by srun only, not in the batch script itself)."""
    need = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if ntasks is None or not all(v in env for v in need) or int(ntasks) <= 1:
        return None
    port = _port_override(env) or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)   # JAX's port rule
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_size = slurm_tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0))) if per_node else 1
    return {"name": "slurm", "coordinator": f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}",
            "num_processes": int(ntasks), "process_id": int(env["SLURM_PROCID"]),
            "local_rank": int(env["SLURM_LOCALID"]), "local_size": local_size}


def _ompi(env: Mapping[str, str]) -> dict | None:
    """mpirun (Open MPI) with more than one rank; the coordinator is mpirun's host (Open MPI 4's HNP URI)."""
    if "OMPI_COMM_WORLD_SIZE" not in env or int(env["OMPI_COMM_WORLD_SIZE"]) <= 1:
        return None
    coordinator = None
    uri = env.get("OMPI_MCA_orte_hnp_uri")
    if uri:      # e.g. '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911' (JAX's rule for host and port)
        m = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
        if m:
            host = next(g for g in m.groups() if g is not None)
            port = _port_override(env) or str(int(uri.split(".", 1)[0]) // 4096 % 4096 + 61440)
            coordinator = f"{host}:{port}"
    return {"name": "ompi", "coordinator": coordinator, "num_processes": int(env["OMPI_COMM_WORLD_SIZE"]),
            "process_id": int(env["OMPI_COMM_WORLD_RANK"]),
            "local_rank": int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            "local_size": int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))}


def _visible_gpus(env: Mapping[str, str]) -> int | None:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    return None if cvd is None else len([s for s in cvd.split(",") if s.strip()])


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           local_device_ids: str | Sequence[int] | None = None,
           environ: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The multi-process setup this process is in, or None for a single-process run (see the module doc).

    A field given by neither flag nor JZERO_* env var comes from SLURM/Open MPI when one runs >1 task; a field
    still missing is an error naming its flag and env var. ``num_processes == 1`` means single-process (None).
    """
    env = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "local_device_ids": local_device_ids}
    values, sources = {}, set()
    for field, flag_value in given.items():
        if flag_value is not None:
            values[field] = flag_value
            sources.add("flags")
        elif env.get(_ENV[field]):
            values[field] = env[_ENV[field]]
            sources.add("env")
    sched = _slurm(env) or _ompi(env)
    if sched is None and not {"coordinator", "num_processes", "process_id"} & values.keys():
        if "local_device_ids" in values:
            raise DistributedError(f"{_names('local_device_ids')} is set but this is a single-process run; "
                                   f"also pass {_names('num_processes')} or run under srun/mpirun")
        return None
    if sched is not None:
        for field in ("coordinator", "num_processes", "process_id"):
            if field not in values and sched[field] is not None:
                values[field] = sched[field]
                sources.add(sched["name"])
    missing = [f for f in ("coordinator", "num_processes", "process_id") if f not in values]
    if missing:
        why = f" ({sched['name']} gives no coordinator address)" if sched is not None else ""
        raise DistributedError(f"multi-process run without {_names(missing[0])}{why}; pass "
                               + ", ".join(_FLAG[f] for f in missing) + " or set "
                               + ", ".join(_ENV[f] for f in missing))
    n = _int(values["num_processes"], "num_processes", 1)
    pid = _int(values["process_id"], "process_id", 0)
    if pid >= n:
        raise DistributedError(f"{_names('process_id')}={pid} is out of range for {n} processes; use 0..{n - 1}")
    split_address(values["coordinator"])
    if n == 1:
        return None
    visible = _visible_gpus(env)
    if "local_device_ids" in values:
        ids = _device_ids(values["local_device_ids"])
    elif sched is not None and sched["local_size"] > 1 and (visible is None or visible >= sched["local_size"]):
        ids = (sched["local_rank"],)           # several tasks share this node's GPUs: one GPU each
    else:
        ids = None                             # one task per node, or the scheduler already narrowed the GPUs
    return DistributedSpec(str(values["coordinator"]), n, pid, ids, "+".join(sorted(sources)))


# --------------------------------------------------------------------------- initialization


def wait_for_coordinator(spec: DistributedSpec, timeout_s: float) -> None:
    """Block until process 0's coordinator port accepts TCP connections; error naming it after ``timeout_s``."""
    host, port = split_address(spec.coordinator)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"process {spec.process_id} of {spec.num_processes} could not reach the coordinator (process 0) "
                f"at {spec.coordinator} within {timeout_s:g} s; start process 0, or fix the address/port "
                f"({_names('coordinator')}) and any firewall between the hosts")
        time.sleep(0.25)


def _rendezvous_timeout(spec: DistributedSpec, timeout_s: float) -> None:
    print(f"error: process {spec.process_id} of {spec.num_processes}: not all {spec.num_processes} processes "
          f"reached the coordinator {spec.coordinator} within {timeout_s:g} s; a process did not start, crashed "
          f"or cannot reach it (each process logs 'process I of N connecting' first; raise --init-timeout / "
          f"{ENV_INIT_TIMEOUT} if startup is just slow)", file=sys.stderr, flush=True)
    os._exit(EXIT_INIT_TIMEOUT)


def initialize(spec: DistributedSpec, init_timeout: int = DEFAULT_INIT_TIMEOUT,
               heartbeat_timeout: int | None = None) -> None:
    """``jax.distributed.initialize`` for ``spec`` with gloo CPU collectives and bounded waiting (module doc).

    ``heartbeat_timeout=None`` keeps JAX's default; a value on a JAX without that setting is an error.
    """
    import jax

    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized in this process; call maybe_initialize once")
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU client only; GPUs use NCCL
    kwargs = dict(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                  process_id=spec.process_id,
                  local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
                  initialization_timeout=int(init_timeout) + _JAX_GRACE_S)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    if "cluster_detection_method" in accepted:
        kwargs["cluster_detection_method"] = "deactivate"    # our detection above is the one that counts
    if heartbeat_timeout is not None:
        if "heartbeat_timeout_seconds" not in accepted:
            raise DistributedError(f"--heartbeat-timeout / {ENV_HEARTBEAT_TIMEOUT}: jax {jax.__version__} has no "
                                   "heartbeat_timeout_seconds; unset it to use JAX's default")
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout)

    print(CONNECTING.format(process_id=spec.process_id, num_processes=spec.num_processes,
                            coordinator=spec.coordinator, source=spec.source), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    if spec.process_id != 0:
        wait_for_coordinator(spec, init_timeout)
    left = max(1.0, init_timeout - (time.monotonic() - t0))
    watchdog = threading.Timer(left, _rendezvous_timeout, args=(spec, init_timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"process {spec.process_id} of {spec.num_processes}: jax.distributed.initialize "
                               f"failed ({first}); call it before any JAX computation, with consistent "
                               f"{_FLAG['num_processes']}/{_FLAG['process_id']}") from None
    finally:
        watchdog.cancel()
    global _INITIALIZED
    _INITIALIZED = True
    from jzero import liveness   # a peer killed outside a launcher ends this process with one line, not SIGABRT

    liveness.start(spec.process_id, spec.num_processes, heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT)
    if sys.excepthook is not _exit_on_uncaught:
        _previous_hooks.append(sys.excepthook)
        sys.excepthook = _exit_on_uncaught
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


_INITIALIZED = False
_previous_hooks: list = []


def exit_process(code: int | str | None = 0) -> NoReturn:
    """``sys.exit(code)``, except that a failing process of a multi-process run leaves at once.

    Interpreter shutdown would run ``jax.distributed.shutdown``, whose barrier waits (up to 300 s) for processes
    that are themselves waiting for this one inside a collective; skipping it lets the launcher or srun see the
    failure now and stop the rest. The mains end with ``exit_process(main())``.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else int(code)
    if code != 0 and _INITIALIZED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _exit_on_uncaught(exc_type, exc, tb) -> None:
    """sys.excepthook of a multi-process run: print the traceback as usual, then :func:`exit_process`."""
    (_previous_hooks[-1] if _previous_hooks else sys.__excepthook__)(exc_type, exc, tb)
    exit_process(130 if issubclass(exc_type, KeyboardInterrupt) else 1)


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, local_device_ids: str | Sequence[int] | None = None,
                     init_timeout: int | None = None, heartbeat_timeout: int | None = None,
                     environ: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """Initialize JAX's distributed runtime when flags, JZERO_* env vars or the scheduler say so.

    Returns the spec it initialized with, or None for a single-process run (nothing done). Timeouts in
    seconds: argument, else ``JZERO_INIT_TIMEOUT`` / ``JZERO_HEARTBEAT_TIMEOUT``, else JAX's defaults.
    """
    spec = detect(coordinator, num_processes, process_id, local_device_ids, environ)
    env = os.environ if environ is None else environ
    init_s = timeout_seconds(init_timeout, "--init-timeout", ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT, environ)
    heartbeat_s = (timeout_seconds(heartbeat_timeout, "--heartbeat-timeout", ENV_HEARTBEAT_TIMEOUT,
                                   DEFAULT_HEARTBEAT_TIMEOUT, environ)
                   if heartbeat_timeout is not None or env.get(ENV_HEARTBEAT_TIMEOUT) else None)
    if spec is None:
        flag = "--init-timeout" if init_timeout is not None else "--heartbeat-timeout"
        if init_timeout is not None or heartbeat_timeout is not None:
            raise DistributedError(f"{flag} is set but this is a single-process run; drop it, or pass "
                                   f"{_FLAG['num_processes']} > 1 / run under srun or mpirun")
        return None
    initialize(spec, init_s, heartbeat_s)
    return spec


# --------------------------------------------------------------------------- agreeing on a local outcome


def failed_processes(ok: bool) -> list[int]:
    """The processes for which ``ok`` is False (every process calls this at the same point: a collective).

    For work each process does on its own that decides what all do next, e.g. reading its shards of a checkpoint:
    if one process's read fails and it alone falls back to an earlier step, the processes' next collectives pair
    up wrongly (a hang, or JAX's "sync_global_devices name mismatch" traceback). ``[]`` when single-process.
    """
    import jax

    if jax.process_count() == 1:
        return [] if ok else [0]
    import numpy as np
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(ok)))).reshape(-1)
    return [i for i, f in enumerate(flags) if not f]


# --------------------------------------------------------------------------- which rows this process feeds


def row_block(sharding, shape: Sequence[int], axis: int, process_of=None, me: int | None = None) -> tuple[int, int]:
    """``(block, blocks)``: this process feeds rows ``block * n .. (block + 1) * n`` (``n = shape[axis] // blocks``)
    of a global array placed with ``sharding``, the rows its own devices hold.

    That is not always the process's 1/N share: when a mesh axis the rows are replicated over (``pipeline``,
    ``tensor``) spans processes, each process holds all data ranks of its pipeline stage or tensor group, so two
    processes feed the same rows (``blocks`` < process count). Feeding 1/N of the rows there makes
    ``jax.make_array_from_process_local_data`` fail ("each dimension should match either global or process
    shape"). Single-process: ``(0, 1)``. ``process_of(device)`` / ``me`` default to ``device.process_index`` /
    ``jax.process_index()`` (tests assign devices to pretend processes).
    """
    import jax

    held: dict[int, list[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        start, stop, _ = index[axis].indices(shape[axis])
        process = device.process_index if process_of is None else process_of(device)
        held.setdefault(process, []).append((start, stop))
    return row_block_of(held, shape[axis], jax.process_index() if me is None else me)


def row_block_of(held: Mapping[int, Sequence[tuple[int, int]]], rows: int, me: int) -> tuple[int, int]:
    """:func:`row_block` from ``process -> [(start, stop) of each of its devices' rows]`` (pure, for tests)."""
    spans = {}
    for process, ranges in held.items():
        ranges = sorted(set(ranges))
        lo, hi = ranges[0][0], max(b for _, b in ranges)
        covered = sum(b - a for a, b in _merged(ranges))
        if covered != hi - lo:
            raise DistributedError(f"process {process}'s devices hold rows {ranges} of the batch, not one contiguous "
                                   f"block; order the mesh so that each process's devices are neighbours on the "
                                   f"data axis")
        spans[process] = (lo, hi)
    n = spans[me][1] - spans[me][0]
    if any(b - a != n for a, b in spans.values()) or rows % n or any(a % n for a, _ in spans.values()):
        raise DistributedError(f"processes hold unequal blocks of the batch's {rows} rows ({sorted(spans.items())}); "
                               f"use the same number of devices in every process")
    return spans[me][0] // n, rows // n


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


# --------------------------------------------------------------------------- CLI glue for the mains


def add_distributed_args(parser) -> None:
    """The mains' multi-process flags (each also readable from its JZERO_* env var)."""
    g = parser.add_argument_group("multi-process (else JZERO_* env vars, else SLURM/Open MPI when >1 task)")
    g.add_argument("--coordinator", help=f"HOST:PORT of process 0's coordinator ({ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, help=f"number of processes ({ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, help=f"this process's index, 0..N-1 ({ENV_PROCESS_ID})")
    g.add_argument("--local-device-ids", help=f"GPUs this process uses, e.g. 0,1 ({ENV_LOCAL_DEVICE_IDS}); "
                                              "default: all it sees, or one per task when tasks share a node")
    g.add_argument("--init-timeout", type=int, help=f"seconds to wait for all processes ({ENV_INIT_TIMEOUT}, "
                                                    f"default {DEFAULT_INIT_TIMEOUT})")
    g.add_argument("--heartbeat-timeout", type=int,
                   help=f"seconds without a heartbeat before a process counts as dead and the run ends "
                        f"({ENV_HEARTBEAT_TIMEOUT}, default JAX's {DEFAULT_HEARTBEAT_TIMEOUT})")


def maybe_initialize_from_args(args) -> DistributedSpec | None:
    """:func:`maybe_initialize` with the flags of :func:`add_distributed_args`."""
    return maybe_initialize(args.coordinator, args.num_processes, args.process_id,
                            local_device_ids=args.local_device_ids, init_timeout=args.init_timeout,
                            heartbeat_timeout=args.heartbeat_timeout)
