"""jzero.plan: replica-group parsing and axis attribution, loop trip counts, the link model's arithmetic, and the
byte model checked against the compiler: bytes predicted for 4 data ranks from the 8-rank program equal the bytes
HLO-counted in the program compiled for 4 (ZeRO-3-like layer scan on fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jzero.optim.comm import collective_bytes
from jzero.plan import (CANDIDATES, Collective, Links, Profile, bytes_per_device, collectives, comm_seconds,
                        gpu_counts, memory_bytes, predict, replica_groups, step_seconds)


def test_replica_group_forms():
    assert replica_groups("x replica_groups={{0,1},{2,3}}, y", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[8], to_apply", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), d", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("all-reduce(%x), to_apply=%add", 8) == [list(range(8))]


def _mesh(data, tensor):
    devs = np.asarray(jax.devices()[:data * tensor]).reshape(1, data, tensor)
    return Mesh(devs, ("pipeline", "data", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _zero3_like(mesh, layers=3, d=64):
    """Grad of a layer scan whose weights are stored sharded over data and gathered inside the body."""
    def loss(ws, x):
        def body(h, w):
            return jnp.tanh(h @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))), None
        return jnp.sum(jax.lax.scan(body, x, ws)[0])
    f = jax.jit(jax.grad(loss), in_shardings=(NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P("data"))),
                out_shardings=NamedSharding(mesh, P(None, "data")))
    x = jax.ShapeDtypeStruct((8 * mesh.shape["data"], d), jnp.float32)
    return f.lower(jax.ShapeDtypeStruct((layers, d, d), jnp.float32), x).compile().as_text()


def _counted_with_trips(text, mesh):
    """HLO bytes per device, each op times its loop trips (collective_bytes counts a loop body once)."""
    return sum(c.trips * {"all-reduce": 2 * (c.group - 1) / c.group}.get(c.op, (c.group - 1) / c.group)
               * c.full_bytes for c in collectives(text, mesh))


def test_predicted_bytes_for_4_ranks_match_the_program_compiled_for_4():
    m8, m4 = _mesh(8, 1), _mesh(4, 1)
    t8, t4 = _zero3_like(m8), _zero3_like(m4)
    c8 = collectives(t8, m8)
    assert c8 and all(c.axes == ("data",) for c in c8)
    assert any(c.trips == 3 for c in c8), "the per-layer gather sits in the scan body: 3 trips"
    loop_free = sum(collective_bytes(t8)[k] for k in ("all-reduce", "all-gather", "reduce-scatter"))
    assert bytes_per_device(c8, {"data": 8})["data"] > loop_free     # trips counted
    predicted = bytes_per_device(c8, {"data": 4})["data"]
    assert predicted == pytest.approx(_counted_with_trips(t4, m4), rel=1e-6)


def test_axis_attribution_on_a_data_x_tensor_mesh():
    mesh = _mesh(4, 2)
    f = jax.jit(lambda x: jnp.sum(x, axis=0), in_shardings=NamedSharding(mesh, P("data", "tensor")),
                out_shardings=NamedSharding(mesh, P()))
    cols = collectives(f.lower(jax.ShapeDtypeStruct((8, 16), jnp.float32)).compile().as_text(), mesh)
    assert {c.axes for c in cols} <= {("data",), ("tensor",), ("data", "tensor")} and cols
    assert any("data" in c.axes for c in cols)


def test_link_model_arithmetic():
    links = Links(nvlink_GBps=100.0, ib_GBps=10.0, nvlink_alpha=0.0, ib_alpha=0.0)
    ar = [Collective("all-reduce", 1e9, ("data",), 8, 1)]
    # inside one node (8 GPUs of 8): 2 * 7/8 GB over 100 GB/s; two nodes: 2 * 15/16 GB over the 10 GB/s NIC
    assert comm_seconds(ar, {"data": 8}, 8, links) == pytest.approx(2 * 7 / 8 / 100)
    assert comm_seconds(ar, {"data": 16}, 8, links) == pytest.approx(2 * 15 / 16 / 10)
    assert comm_seconds(ar, {"data": 1}, 8, links) == 0.0
    assert step_seconds(0.1, 0.05, 0.0) == pytest.approx(0.15) and step_seconds(0.1, 0.05, 1.0) == pytest.approx(0.1)
    assert step_seconds(0.1, 0.3, 1.0) == pytest.approx(0.3)
    lat = Links(nvlink_alpha=1e-5, ib_alpha=1e-5)
    assert comm_seconds([Collective("all-gather", 0.0, ("data",), 8, 4)], {"data": 1024}, 8, lat) \
        == pytest.approx(4 * 10 * 1e-5)


def test_memory_and_prediction():
    # 1 GB of sharded optimizer state, 0.5 GB replicated params, 0.25 GB temporaries, compiled at data 8
    prof = Profile("x", [Collective("all-reduce", 1e8, ("data",), 8, 1)], int(0.25e9),
                   [(int(1e9), ("data",), False), (int(0.5e9), (), False)], {"pipeline": 1, "data": 8, "tensor": 1},
                   4096)
    assert memory_bytes(prof, {"data": 2}) == pytest.approx(0.25e9 + 0.5e9 + 0.5e9)
    r = predict(prof, 16, 8, 0.1, Links(ib_GBps=10.0, ib_alpha=0.0, nvlink_alpha=0.0))
    t = 0.1 + 2 * 15 / 16 * 1e8 / 10e9
    assert r["step_s"] == pytest.approx(t) and r["tokens_per_s"] == pytest.approx(16 * 4096 / t)
    assert r["efficiency"] == pytest.approx(0.1 / t)
    assert gpu_counts(16, 8) == [1, 2, 4, 8, 16, 32, 64, 128] and gpu_counts(200, 8)[-1] == 1024
    assert {"zero0", "zero1", "zero2", "zero3", "onebit_adam"} <= set(CANDIDATES)


TINY = ["model.preset=gpt2-tiny", "model.d_model=64", "model.n_head=4", "model.d_ff=256", "model.n_layer=2",
        "data.seq_len=32", "train_micro_batch_size_per_gpu=2", "gradient_clipping=0"]


def test_profile_of_the_engine_step_counts_the_gradient_allreduce_and_the_1bit_stage():
    """ZeRO-0's compiled step moves one fp32 gradient all-reduce (2 (n-1)/n x 4 bytes x params, + the loss), 1-bit
    Adam's compression stage at most 1/16 of it; the state leaves are the engine's."""
    import jzero
    from jzero.config import load_config
    from jzero.plan import batch_overrides, profile
    from train.pretrain import DEFAULT_CONFIG

    def prof(extra):
        over = batch_overrides(None, TINY + extra, DEFAULT_CONFIG, 8)
        return profile(load_config(None, over, base=DEFAULT_CONFIG), "x")

    z0 = prof(CANDIDATES["zero0"])
    eng = jzero.initialize(load_config(None, batch_overrides(None, TINY, DEFAULT_CONFIG, 8), base=DEFAULT_CONFIG))
    numel = sum(x.size for x in jax.tree.leaves(eng.state.params))
    sent = bytes_per_device(z0.cols, z0.compiled_sizes)["data"]
    # the gradients (the scanned layers' all-reduce counted once per layer) + 1,793 more f32 (1.3%: the loss and
    # values XLA combined into the same all-reduce; not traced further)
    assert 2 * 7 / 8 * 4 * numel <= sent <= 1.02 * (2 * 7 / 8 * 4 * numel)
    assert any(c.trips == 2 for c in z0.cols)
    assert z0.tokens_per_gpu_step == 2 * 32
    ob = prof(CANDIDATES["onebit_adam"])
    assert 0 < bytes_per_device(ob.cols, ob.compiled_sizes)["data"] <= sent / 16
    assert any(per_rank for _, _, per_rank in ob.leaves)


@pytest.mark.parametrize("argv,match", [
    (["--candidates", "zero9"], "--candidates: unknown ['zero9']"),
    ([], "--step-ms-1gpu: no measured single-GPU step for the default config")])
def test_main_refuses_before_compiling(argv, match, capsys):
    from train.plan import main

    assert main(["--nodes", "2", "--gpus-per-node", "8"] + argv) == 2
    assert match in capsys.readouterr().err
