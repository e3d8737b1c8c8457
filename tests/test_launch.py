"""train.launch: per-rank environment, prefixed output, fail fast naming the rank, stall timeout with stacks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jzero.distributed import CONNECTING
from train import launch

REPO = Path(__file__).resolve().parents[1]


def _launch(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "train.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_with_device_count_replaces_an_existing_count():
    assert launch.with_device_count("", 4) == "--xla_force_host_platform_device_count=4"
    assert launch.with_device_count("--a=1 --xla_force_host_platform_device_count=8 --b", 2) == \
        "--a=1 --b --xla_force_host_platform_device_count=2"


def test_rank_env():
    env = launch.rank_env({"XLA_FLAGS": "--x", "JAX_PLATFORMS": "cuda", "KEEP": "1"}, 1, 3, "127.0.0.1:5", 4,
                          init_timeout=30)
    assert env["JZERO_COORDINATOR"] == "127.0.0.1:5" and env["JZERO_NUM_PROCESSES"] == "3"
    assert env["JZERO_PROCESS_ID"] == "1" and env["JZERO_INIT_TIMEOUT"] == "30"
    assert "JZERO_HEARTBEAT_TIMEOUT" not in env and env["KEEP"] == "1"
    assert env["JAX_PLATFORMS"] == "cpu" and env["XLA_FLAGS"] == "--x --xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("args, needle", [
    (["--nproc", "2"], "error: no command given; put it after --"),
    (["--nproc", "0", "--", "true"], "error: --nproc 0 must be >= 1"),
    (["--nproc", "2", "--devices-per-proc", "0", "--", "true"], "error: --devices-per-proc 0 must be >= 1"),
    (["--nproc", "2", "--stall-timeout", "-1", "--", "true"], "error: --stall-timeout must be > 0 seconds"),
    (["--nproc", "1", "--", "/no/such/program"], "error: cannot run '/no/such/program'"),
])
def test_bad_arguments(args, needle):
    r = _launch(*args)
    assert r.returncode == launch.EXIT_USAGE and needle in r.stderr, r.stderr


def test_ranks_get_their_env_and_prefixed_output():
    code = ("import os, sys; e = os.environ; print(e['JZERO_PROCESS_ID'], e['JZERO_NUM_PROCESSES'], "
            "e['JZERO_COORDINATOR'], e['XLA_FLAGS'], e['JAX_PLATFORMS']); print('err', file=sys.stderr)")
    r = _launch("--nproc", "3", "--devices-per-proc", "2", "--", sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    coord = re.search(r"coordinator (127\.0\.0\.1:\d+)", r.stderr).group(1)
    assert lines == [f"[rank {i}] {i} 3 {coord} --xla_force_host_platform_device_count=2 cpu" for i in range(3)]
    assert sorted(re.findall(r"^\[rank \d\] err$", r.stderr, re.M)) == [f"[rank {i}] err" for i in range(3)]


def test_a_failing_rank_stops_the_others_and_is_named():
    code = ("import os, sys, time\n"
            "if os.environ['JZERO_PROCESS_ID'] == '1': print('boom', flush=True); sys.exit(7)\n"
            "time.sleep(300)")
    t0 = time.monotonic()
    r = _launch("--nproc", "3", "--", sys.executable, "-c", code, timeout=60)
    assert r.returncode == 7
    assert re.search(r"launch: rank 1 \(pid \d+\) exited with code 7; stopping ranks \[0, 2\]", r.stderr), r.stderr
    assert time.monotonic() - t0 < 60


def test_names_ranks_that_never_reached_the_rendezvous():
    line = CONNECTING.format(process_id=0, num_processes=2, coordinator="x:1", source="env")
    code = ("import os, sys, time\n"
            f"if os.environ['JZERO_PROCESS_ID'] == '0': print({line!r}, file=sys.stderr, flush=True); "
            "time.sleep(0.5); sys.exit(3)\n"
            "time.sleep(300)")
    r = _launch("--nproc", "2", "--", sys.executable, "-c", code, timeout=60)
    assert r.returncode == 3
    assert "rank 0 (pid" in r.stderr and "ranks that never reached jax.distributed.initialize: [1]" in r.stderr


def test_stall_timeout_dumps_stacks_and_stops_all():
    code = ("import faulthandler, signal, time\n"
            "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
            "print('ready', flush=True)\n"
            "def wait_in_collective(): time.sleep(300)\n"
            "wait_in_collective()")
    r = _launch("--nproc", "2", "--stall-timeout", "3", "--", sys.executable, "-c", code, timeout=60)
    assert r.returncode == launch.EXIT_STALLED, r.stderr
    assert "launch: no output from any rank for 3 s (--stall-timeout)" in r.stderr
    for i in range(2):     # each rank's Python stack, prefixed, shows where it waits
        assert re.search(rf"^\[rank {i}\] .*line 4 in wait_in_collective", r.stderr, re.M), r.stderr


def test_killing_a_rank_mid_run_ends_the_launcher(tmp_path):
    """Acceptance: SIGKILL one of 2 pretrain processes mid-run; the launcher exits non-zero within 60 s naming it."""
    log = tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "train.launch", "--nproc", "2", "--devices-per-proc", "2", "--", sys.executable,
           "-m", "train.pretrain", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.seq_len=16",
           "train_batch_size=8", "data.default_corpus_bytes=200000", "train.eval_interval=0", "train.steps=100000",
           "steps_per_print=1", "zero_optimization.stage=0", f"train.output_dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"^\[rank 0\] step 2/", log.read_text(), re.M):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        pid = int(re.search(r"rank 1 pid (\d+)", log.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGKILL, text[-3000:]
    assert f"launch: rank 1 (pid {pid}) was killed by signal 9 (SIGKILL); stopping ranks [0]" in text
    print(f"launcher exited {waited:.2f} s after rank 1 was killed")
