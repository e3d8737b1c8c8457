"""overlap_comm -> XLA flags (jzero.overlap): which flags each value gives, that XLA accepts every one of them, what
they change on XLA:CPU (nothing: no async collectives there, measured), and the schedule reader on GPU-style HLO."""
import os
import subprocess
import sys

import pytest

from jzero.config import load_config
from jzero.overlap import (COLLECTIVE_MATMUL_FLAGS, NO_OVERLAP_FLAGS, OVERLAP_FLAGS, async_collectives,
                           overlap_flags)
from jzero.xla_flags import flags_for


@pytest.mark.parametrize("value,tensor,want", [
    (None, 1, ()), (True, 1, OVERLAP_FLAGS), (True, 2, OVERLAP_FLAGS + COLLECTIVE_MATMUL_FLAGS),
    (False, 2, NO_OVERLAP_FLAGS)])
def test_flags_per_value(value, tensor, want):
    assert overlap_flags(value, tensor) == want
    zero = {"stage": 3} if value is None else {"stage": 3, "overlap_comm": value}
    cfg = load_config(base={"train_batch_size": 8, "zero_optimization": zero, "mesh": {"tensor": tensor}})
    assert cfg.zero_optimization.overlap_comm is value and cfg.start_notes() == []
    flags = flags_for(cfg)
    assert all(f in flags for f in want)
    assert not set(flags) & (set(OVERLAP_FLAGS + COLLECTIVE_MATMUL_FLAGS + NO_OVERLAP_FLAGS) - set(want))


_PROBE = """
import hashlib, re, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
def loss(ws, x):   # ZeRO-3 in miniature: each layer's weights gathered inside the layer scan
    def body(h, w):
        return jnp.tanh(h @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))), None
    return jnp.sum(jax.lax.scan(body, x, ws)[0])
g = jax.jit(jax.grad(loss), in_shardings=(NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P("data"))),
            out_shardings=NamedSharding(mesh, P(None, "data")))
txt = g.lower(jax.ShapeDtypeStruct((4, 64, 64), jnp.float32), jax.ShapeDtypeStruct((16, 64), jnp.float32)).compile().as_text()
print(hashlib.sha1(txt.encode()).hexdigest(), len(re.findall(r"-start\\(", txt)), len(re.findall(r" all-gather\\(", txt)))
"""


def _probe(flags, code=_PROBE):
    env = {**os.environ, "XLA_FLAGS": " ".join(("--xla_force_host_platform_device_count=8",) + flags)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_xla_accepts_every_flag_and_cpu_programs_do_not_change():
    base = _probe(())
    assert base.returncode == 0, base.stderr[-2000:]
    digest, starts, gathers = base.stdout.split()
    assert starts == "0" and int(gathers) >= 1     # XLA:CPU: synchronous collectives only
    # every flag of both values at once (a later duplicate wins; all names are parsed): one process less
    r = _probe(OVERLAP_FLAGS + COLLECTIVE_MATMUL_FLAGS + NO_OVERLAP_FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]   # an unknown flag would abort the backend (next assert)
    assert r.stdout.split() == [digest, "0", gathers]
    bogus = _probe(("--xla_gpu_enable_pipelined_all_gatherz=true",), "import jax; jax.devices()")
    assert bogus.returncode != 0 and "Unknown flag" in bogus.stderr


GPU_STYLE = """HloModule jit_step, is_scheduled=true

%body (p: (s32[], f32[8,64])) -> (s32[], f32[8,64]) {
  %ag-start = (f32[1,64]{1,0}, f32[8,64]{1,0}) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %fusion.1 = f32[8,64]{1,0} fusion(%h), kind=kLoop, calls=%fused_1
  %custom-call.2 = (f32[8,64]{1,0}, s8[1024]{0}) custom-call(%fusion.1, %v), custom_call_target="__cublas$gemm"
  %ag-done = f32[8,64]{1,0} all-gather-done(%ag-start)
  %all-reduce.3 = f32[64]{0} all-reduce(%g), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %ar-start = f32[64]{0} all-reduce-start(%g), channel_id=3, replica_groups=[1,8]<=[8], to_apply=%add
  %ar-done = f32[64]{0} all-reduce-done(%ar-start)
}
"""


def test_async_collectives_reads_pairs_and_the_compute_between():
    r = async_collectives(GPU_STYLE)
    assert r["async"] == [{"op": "all-gather", "overlapped": 2}, {"op": "all-reduce", "overlapped": 0}]
    assert r["sync"] == {"all-reduce": 1}


def test_overlap_gpu_benchmark_worker_reads_a_real_compiled_step():
    """benchmarks/overlap_gpu's worker on the 8 fake CPU devices: jzero's real ZeRO-3 step compiles and its schedule
    is read (XLA:CPU: every collective synchronous, none async), so the GPU run has a working harness."""
    import json

    code = ("import sys; from benchmarks.overlap_gpu import main; "
            "main(['--worker', '--variant', 'cpu', '--overrides', '[\"zero_optimization.stage=3\"]', '--topology', ''])")
    r = _probe((), code)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("ROW "))[4:])
    assert row["devices"] == 8 and row["platform"] == "cpu" and row["async"] == 0
    assert row["sync"].get("all-gather", 0) >= 1 and row["sync"].get("all-reduce", 0) >= 1   # ZeRO-3's gathers
