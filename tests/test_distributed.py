"""jzero.distributed: who is in the run (flags, env, SLURM, Open MPI), bounded failures, and multi-process numbers.

The acceptance runs start real processes: ``python -m train.launch`` with 2 processes x 4 CPU devices against
``python -m train.pretrain`` on 1 process x 8 devices (ZeRO-3, 10 steps) must log the same losses, and a
checkpoint written by the 2 processes must resume on 1 process onto the 1-process losses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jzero import distributed as dist
from jzero.distributed import DistributedError, DistributedSpec, detect
from train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "data.seq_len=32", "train_batch_size=16",
        "data.default_corpus_bytes=200000", "train.eval_interval=0", "train.steps=10", "zero_optimization.stage=3",
        "steps_per_print=1"]
REL_TOL = 1e-6

SLURM_2x4 = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "8",
             "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}


# --------------------------------------------------------------------------- detection (no processes)


def test_single_process_when_nothing_says_otherwise():
    assert detect(environ={}) is None
    assert detect(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None   # sbatch script, not srun
    assert detect(environ={**SLURM_2x4, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert detect(environ={"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None
    assert detect("h:1", 1, 0, environ={}) is None                                  # N=1: nothing to join


def test_flags_then_env_per_field():
    env = {dist.ENV_COORDINATOR: "10.0.0.1:1234", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "3"}
    assert detect(environ=env) == DistributedSpec("10.0.0.1:1234", 4, 3, None, "env")
    assert detect(process_id=0, environ=env) == DistributedSpec("10.0.0.1:1234", 4, 0, None, "env+flags")
    assert detect("h:9", 2, 1, "0,1", environ={}) == DistributedSpec("h:9", 2, 1, (0, 1), "flags")


@pytest.mark.parametrize("args, env, needle", [
    ((None, 2, None), {}, "--coordinator / JZERO_COORDINATOR"),
    (("h:1", 2, None), {}, "--process-id / JZERO_PROCESS_ID"),
    (("h:1", 2, 2), {}, "--process-id / JZERO_PROCESS_ID=2 is out of range for 2 processes"),
    (("h", 2, 0), {}, "--coordinator / JZERO_COORDINATOR='h' is not HOST:PORT"),
    (("h:1", "two", 0), {}, "--num-processes / JZERO_NUM_PROCESSES='two' is not an integer"),
    ((None, None, None), {dist.ENV_LOCAL_DEVICE_IDS: "0"}, "single-process run"),
    (("h:1", 2, 0), {dist.ENV_LOCAL_DEVICE_IDS: "x"}, "JZERO_LOCAL_DEVICE_IDS='x' is not a list of GPU indices"),
    ((None, None, None), {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
     "(ompi gives no coordinator address); pass --coordinator or set JZERO_COORDINATOR"),
])
def test_bad_settings_name_the_flag_and_env_var(args, env, needle):
    with pytest.raises(DistributedError) as e:
        detect(*args, environ=env)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_slurm_one_task_per_gpu_pins_local_rank():
    spec = detect(environ=SLURM_2x4)
    port = 123456 % 4096 + 61440
    assert spec == DistributedSpec(f"gpu003:{port}", 8, 5, (1,), "slurm")
    # srun already gave each task its own GPU: nothing to pin (GPU 1 would not exist in that task)
    assert detect(environ={**SLURM_2x4, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids is None
    assert detect(environ={**SLURM_2x4, dist.ENV_COORDINATOR_PORT: "7000"}).coordinator == "gpu003:7000"
    assert detect(environ={**SLURM_2x4, dist.ENV_LOCAL_DEVICE_IDS: "2,3"}).local_device_ids == (2, 3)


def test_slurm_one_task_per_host_uses_all_its_gpus():
    env = {**SLURM_2x4, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    assert detect(environ=env) == DistributedSpec(f"gpu003:{123456 % 4096 + 61440}", 2, 1, None, "slurm")


def test_slurm_helpers():
    assert dist.first_slurm_host("node[001-0015],host2") == "node001"
    assert dist.first_slurm_host("node[007,009-012]") == "node007"
    assert dist.first_slurm_host("a1,b2") == "a1"
    assert [dist.slurm_tasks_on_node("4(x2),3", i) for i in range(3)] == [4, 4, 3]


def test_ompi_coordinator_from_mpirun_uri():
    uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    env = {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    port = 1531576320 // 4096 % 4096 + 61440
    assert detect(environ=env) == DistributedSpec(f"10.96.0.1:{port}", 4, 2, None, "ompi")


def test_scheduler_detection_agrees_with_jax(monkeypatch):
    """Our SLURM / Open MPI answers are the ones jax.distributed's own cluster detection gives."""
    clusters = pytest.importorskip("jax._src.clusters")
    uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    ompi = {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    for env, cls in ((SLURM_2x4, clusters.SlurmCluster), (ompi, clusters.OmpiCluster)):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        spec = detect(environ=env)
        assert spec.coordinator == cls.get_coordinator_address(timeout_secs=None, override_coordinator_port=None)
        assert (spec.num_processes, spec.process_id) == (cls.get_process_count(), cls.get_process_id())
        assert spec.local_device_ids == (cls.get_local_process_id(),)      # several tasks per node: same pin
        for k in env:
            monkeypatch.delenv(k)


def test_timeouts():
    assert dist.timeout_seconds(None, "--init-timeout", "T", 300, {}) == 300
    assert dist.timeout_seconds(None, "--init-timeout", "T", 300, {"T": "20"}) == 20
    assert dist.timeout_seconds(7, "--init-timeout", "T", 300, {"T": "20"}) == 7
    with pytest.raises(DistributedError, match=r"^T='0s' must be a positive number of seconds"):
        dist.timeout_seconds(None, "--init-timeout", "T", 300, {"T": "0s"})
    with pytest.raises(DistributedError, match="--heartbeat-timeout is set but this is a single-process run"):
        dist.maybe_initialize(heartbeat_timeout=5, environ={})


# --------------------------------------------------------------------------- bounded failures (real processes)


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    for k in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, dist.ENV_INIT_TIMEOUT,
              dist.ENV_HEARTBEAT_TIMEOUT):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_unreachable_coordinator_names_process_0(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "train.pretrain", *TINY, f"train.output_dir={tmp_path}",
                        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                        "--init-timeout", "3"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert (f"error: process 1 of 2 could not reach the coordinator (process 0) at 127.0.0.1:{port} within 3 s"
            in r.stderr)


def test_missing_process_ends_rendezvous_with_error(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "train.pretrain", *TINY, f"train.output_dir={tmp_path}"], cwd=REPO,
                       env=_env(JZERO_COORDINATOR=f"127.0.0.1:{port}", JZERO_NUM_PROCESSES=2, JZERO_PROCESS_ID=0,
                                JZERO_INIT_TIMEOUT=4),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == dist.EXIT_INIT_TIMEOUT, r.stderr
    assert f"error: process 0 of 2: not all 2 processes reached the coordinator 127.0.0.1:{port} within 4 s" \
        in r.stderr


_COLLECTIVE_LOOP = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jzero.distributed import exit_process, maybe_initialize
maybe_initialize()
mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
fail = os.environ.get("FAIL_AT_STEP_3", "") if jax.process_index() == 1 else ""
for i in range(100000):
    if i == 3 and fail == "raise":
        raise ValueError("boom on rank 1")
    if i == 3 and fail == "exit":
        exit_process(5)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full(2, i, np.float32), (4,))
    print("step", i, float(total(x)), flush=True)
    time.sleep(0.1)
"""


@pytest.mark.parametrize("how, code", [("raise", 1), ("exit", 5)])
def test_a_failing_process_exits_at_once_instead_of_waiting_for_the_others(how, code):
    """Rank 1 fails while rank 0 waits in a collective: it must exit now (not after JAX's 300 s shutdown
    barrier), so the launcher stops rank 0 and names rank 1."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "train.launch", "--nproc", "2", "--devices-per-proc", "2", "--",
                        sys.executable, "-c", _COLLECTIVE_LOOP], cwd=REPO, env=_env(FAIL_AT_STEP_3=how),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == code, r.stderr[-3000:]
    assert re.search(rf"launch: rank 1 \(pid \d+\) exited with code {code}; stopping ranks \[0\]", r.stderr)
    assert time.monotonic() - t0 < 100          # JAX's shutdown barrier alone would take 300 s
    if how == "raise":
        assert "[rank 1] ValueError: boom on rank 1" in r.stderr


def test_dead_process_ends_the_others_through_heartbeats():
    """Without a launcher (srun, by hand): SIGKILL one process; the other ends non-zero instead of hanging."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVE_LOOP], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(JZERO_COORDINATOR=f"127.0.0.1:{port}", JZERO_NUM_PROCESSES=2,
                                       JZERO_PROCESS_ID=i, JZERO_HEARTBEAT_TIMEOUT=10, JZERO_INIT_TIMEOUT=120,
                                       XLA_FLAGS="--xla_force_host_platform_device_count=2"))
             for i in range(2)]
    try:
        for line in procs[1].stdout:                    # both run collectives together from here on
            if line.startswith("step 3 "):
                break
        else:
            pytest.fail("process 1 never reached step 3")
        assert float(line.split()[2]) == 12.0           # sum of 4 elements, each 3: the processes agree
        procs[1].kill()
        procs[1].wait()
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)       # heartbeat 10 s; a hang would hit this bound
        waited = time.monotonic() - t0
        assert procs[0].returncode == 3, out[-2000:]   # jzero.liveness.EXIT_PEER_LOST, not JAX's SIGABRT
        assert waited < 60, waited
        last = out.strip().splitlines()[-1]
        assert re.fullmatch(r"error: process 0 of 2: process 1 stopped sending heartbeats \d+ s ago \(killed or "
                            r"crashed outside the launcher\); stopping this process too, see process 1's log for "
                            r"its cause", last), out[-2000:]
        assert "Check failure stack trace" not in out and "Traceback" not in out, out[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- acceptance: same numbers


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same(got: dict[int, float], want: dict[int, float]) -> float:
    assert got.keys() <= want.keys() and got, (got, want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in got)
    assert worst <= REL_TOL, (worst, got, want)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 8 devices (reference) and 2 processes x 4 devices (checkpointing at steps 5 and 10)."""
    base = tmp_path_factory.mktemp("distributed")
    one = subprocess.run([sys.executable, "-m", "train.pretrain", *TINY, f"train.output_dir={base / 'one'}"],
                         cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "train.launch", "--nproc", "2", "--devices-per-proc", "4",
                          "--init-timeout", "120", "--", sys.executable, "-m", "train.pretrain", *TINY,
                          f"train.output_dir={base / 'two'}", "train.checkpoint_interval=5"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return base, one, two


def test_two_processes_log_the_same_losses_as_one(runs):
    base, one, two = runs
    want, got = _losses(base / "one" / "metrics.jsonl"), _losses(base / "two" / "metrics.jsonl")
    assert sorted(got) == list(range(1, 11))
    worst = _assert_same(got, want)
    print(f"2x4 vs 1x8, ZeRO-3, 10 steps: max relative loss difference {worst:.3g}")
    # only process 0 writes: one line per step in metrics.jsonl, one summary, and step lines only from rank 0
    assert json.loads((base / "two" / "summary.json").read_text())["n_devices"] == 8
    assert re.search(r"^\[rank 0\] step 10/10", two.stdout, re.M) and "[rank 1] step" not in two.stdout


def test_checkpoint_saved_by_two_processes_resumes_on_one(runs, tmp_path):
    base, one, two = runs
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(base / "two" / "checkpoints" / "5", ckpt / "5")    # step 5 only, so resume starts there
    r = subprocess.run([sys.executable, "-m", "train.pretrain", *TINY, f"train.output_dir={tmp_path / 'resumed'}",
                        f"checkpoint.dir={ckpt}", "--resume"],
                       cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(got) == [6, 7, 8, 9, 10]
    worst = _assert_same(got, _losses(base / "one" / "metrics.jsonl"))
    print(f"saved by 2x4 at step 5, resumed on 1x8: max relative loss difference {worst:.3g} over steps 6-10")


# --------------------------------------------------------------------------- which rows a process feeds


@pytest.mark.parametrize("mesh, want", [
    ({"data": 8}, [(0, 2), (1, 2)]),                     # each process its half of the rows
    ({"data": 4, "tensor": 2}, [(0, 2), (1, 2)]),        # tensor within a process
    ({"data": 4, "pipeline": 2}, [(0, 1), (0, 1)]),      # pipeline across processes: both feed every row
    ({"data": 1, "tensor": 8}, [(0, 1), (0, 1)]),        # tensor across processes
    ({"data": 2, "tensor": 2, "pipeline": 2}, [(0, 1), (0, 1)]),
])
def test_row_block_follows_the_mesh_not_the_process_count(mesh, want):
    """2 pretend processes x 4 devices: a process feeds the rows its devices hold. With pipeline (or tensor)
    spanning processes each holds all data ranks, and feeding half the rows crashed put_batch with JAX's
    'each dimension should match either global or process shape' traceback."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jzero.mesh import make_mesh

    m = make_mesh(mesh)
    sharding = NamedSharding(m, P(None, "data"))          # the batch's sharding: rows over data
    got = [dist.row_block(sharding, (2, 8, 33), 1, process_of=lambda d: d.id // 4, me=i) for i in range(2)]
    assert got == want


def test_row_block_of_refuses_ragged_or_scattered_rows():
    assert dist.row_block_of({0: [(0, 4), (4, 8)], 1: [(8, 12), (12, 16)]}, 16, 1) == (1, 2)
    with pytest.raises(DistributedError, match="not one contiguous block"):
        dist.row_block_of({0: [(0, 4), (8, 12)], 1: [(4, 8), (12, 16)]}, 16, 0)
    with pytest.raises(DistributedError, match="unequal blocks"):
        dist.row_block_of({0: [(0, 12)], 1: [(12, 16)]}, 16, 0)


_RESTORE_ONE_FAILS = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jzero.distributed import maybe_initialize
from jzero import checkpoint, checkpoint_io
maybe_initialize()
d = Path(sys.argv[1])
mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
sh = NamedSharding(mesh, P("d"))
n = 1 << 14                         # random: a data file of its own (small or compressible values are inlined)
local = np.random.default_rng(jax.process_index()).integers(0, 9, n).astype(np.float32)
x = jax.make_array_from_process_local_data(sh, local, (2 * n,))
if sys.argv[2] == "save":
    checkpoint_io.writer(d, None, False).save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": x})))
    checkpoint_io.close(d)
    sys.exit(0)
if jax.process_index() == 1:        # only process 1 reads these shards: its read alone fails
    for f in (d / "1" / "state" / "ocdbt.process_1" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])
multihost_utils.sync_global_devices("damaged")
target = {"x": jax.ShapeDtypeStruct((2 * n,), jnp.float32, sharding=sh)}
try:
    checkpoint._restore_state(d, 1, target, "ckpt")
    print("restored", flush=True)
except checkpoint.UnreadableCheckpointError as e:
    print("unreadable:", str(e)[:80], flush=True)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)   # still in step: one more collective
print("sum", float(total), flush=True)
"""


def test_a_checkpoint_read_failing_on_one_process_fails_on_all(tmp_path):
    """Process 1's shard files are damaged: both processes must report the step unreadable (so --resume falls
    back to the same earlier step everywhere) and stay in step; before, process 0 waited in orbax's restore
    barrier, which then paired with process 1's next collective ("sync_global_devices name mismatch")."""
    for phase in ("save", "restore"):       # the restore in fresh processes (no cached reads of the save)
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", _RESTORE_ONE_FAILS, str(tmp_path / "ckpt"), phase],
                                  cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=_env(JZERO_COORDINATOR=f"127.0.0.1:{port}", JZERO_NUM_PROCESSES=2,
                                           JZERO_PROCESS_ID=i, JZERO_INIT_TIMEOUT=60,
                                           XLA_FLAGS="--xla_force_host_platform_device_count=2"))
                 for i in range(2)]
        try:
            outs = [p.communicate(timeout=90)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (i, out[-3000:])
        assert "unreadable: checkpoint ckpt/1 is unreadable" in out or "unreadable: ckpt is unreadable" in out, out
        assert re.search(r"^sum \d", out, re.M), (i, out[-3000:])
    assert "(on process 1)" in outs[0], outs[0][-2000:]
