"""jzero.plan: replica-group parsing and axis attribution, loop trip counts, the link model's arithmetic, and the
byte model checked against the compiler: bytes predicted for 4 data ranks from the 8-rank program equal the bytes
HLO-counted in the program compiled for 4 (ZeRO-3-like layer scan), hpZ's bytes predicted for 4 nodes x 2 from the
2 x 4 program equal the 4 x 2 program's, the node axis carries exactly topology.inter_node_bytes' bytes, and at
8 GPUs every candidate reproduces the bytes comm.collective_bytes counts in its own program."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jzero.optim.comm import collective_bytes
from jzero.plan import (CANDIDATES, Candidate, Collective, Links, Profile, bytes_per_device, collectives,
                        comm_seconds, gpu_counts, memory_bytes, predict, replica_groups, step_seconds, target_sizes)


def test_replica_group_forms():
    assert replica_groups("x replica_groups={{0,1},{2,3}}, y", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[8], to_apply", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), d", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("all-reduce(%x), to_apply=%add", 8) == [list(range(8))]
    # jax 0.10's mesh form (hpZ's node all-reduce on 2 x 4): the groups of axis_0 are {0,4}, {1,5}, ...
    line = "all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=1,'axis_3'=4] {'axis_0'}, to_apply"
    assert replica_groups(line, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]


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
    """Sum over data, gather over tensor: XLA writes both groups in the mesh form; each is its own axis."""
    mesh = _mesh(4, 2)
    f = jax.jit(lambda x: jnp.sum(x, axis=0), in_shardings=NamedSharding(mesh, P("data", "tensor")),
                out_shardings=NamedSharding(mesh, P()))
    cols = collectives(f.lower(jax.ShapeDtypeStruct((8, 16), jnp.float32)).compile().as_text(), mesh)
    assert sorted((c.op, c.axes, c.group) for c in cols) == [("all-gather", ("tensor",), 2),
                                                             ("all-reduce", ("data",), 4)]


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


def test_the_node_axis_goes_over_infiniband_and_data_stays_on_nvlink():
    """hpZ at 4 nodes x 8: node = 4, data = 8. A data collective stays in the node (NVLink, group 8); a node one
    crosses (IB, group 4) and moves 1/data of the compiled buffer: compiled at data 4, S halves at data 8."""
    links = Links(nvlink_GBps=100.0, ib_GBps=10.0, nvlink_alpha=0.0, ib_alpha=0.0)
    compiled = {"node": 2, "pipeline": 1, "data": 4, "tensor": 1}
    sizes = target_sizes(compiled, 32, 8)
    assert sizes == {"node": 4, "pipeline": 1, "data": 8, "tensor": 1}
    gather = Collective("all-gather", 1e9, ("data",), 4, 1)
    shard = Collective("all-reduce", 1e9, ("node",), 2, 1)
    assert comm_seconds([gather], sizes, 8, links, compiled) == pytest.approx(7 / 8 / 100)
    assert comm_seconds([shard], sizes, 8, links, compiled) == pytest.approx(2 * 3 / 4 * 0.5 / 10)
    assert bytes_per_device([gather, shard], sizes, compiled) == pytest.approx({"data": 7 / 8 * 1e9,
                                                                                "node": 2 * 3 / 4 * 0.5e9})
    # inside one node hpZ is ZeRO-3 over the GPUs there: node 1, nothing over IB
    assert target_sizes(compiled, 4, 8) == {"node": 1, "pipeline": 1, "data": 4, "tensor": 1}
    assert comm_seconds([shard], target_sizes(compiled, 4, 8), 8, links, compiled) == 0.0
    # flat data over 32 GPUs crosses nodes; tensor x pipeline stay as compiled
    assert target_sizes({"pipeline": 2, "data": 2, "tensor": 2}, 32, 8) == {"pipeline": 2, "data": 8, "tensor": 2}
    with pytest.raises(ValueError, match="whole nodes"):
        target_sizes(compiled, 12, 8)


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
    # tensor 2 x pipeline 2 (gpipe, 4 micro-batches: bubble 1/5): 16 GPUs are 4 data ranks, each group of 4 shares
    # the single-GPU step and idles for the bubble; step x tokens/s = the step's tokens (it used to be t_1 + comm
    # with 16 ranks' tokens: 4x the tokens the step trains on)
    mp = dataclasses.replace(prof, compiled_sizes={"pipeline": 2, "data": 2, "tensor": 2}, bubble=1 / 5)
    r = predict(mp, 16, 8, 0.1, Links(ib_GBps=10.0, ib_alpha=0.0, nvlink_alpha=0.0))
    t = 0.1 / 4 / (1 - 1 / 5) + 2 * 3 / 4 * 1e8 / 450e9
    assert r["sizes"]["data"] == 4 and r["step_s"] == pytest.approx(t)
    assert r["tokens_per_s"] * r["step_s"] == pytest.approx(4 * 4096)
    assert r["efficiency"] == pytest.approx(0.1 / (4 * t))
    assert gpu_counts(16, 8) == [1, 2, 4, 8, 16, 32, 64, 128] and gpu_counts(200, 8)[-1] == 1024
    assert gpu_counts(2, 6) == [1, 2, 4, 6, 12]


def test_candidates_are_data_and_name_the_key_they_need():
    from jzero.config import ZeroConfig

    assert {"zero0", "zero1", "zero2", "zero3", "hpz", "qwz", "qgz", "onebit_adam"} <= set(CANDIDATES)
    assert CANDIDATES["hpz"].resolved(8) == ["zero_optimization.stage=3", "zero_optimization.zero_hpz_partition_size=4"]
    assert CANDIDATES["hpz"].built() and CANDIDATES["qwz"].built()
    assert CANDIDATES["qgz"].built() == ("zero_quantized_gradients" in ZeroConfig.model_fields)
    assert not Candidate(("x=1",), "zero_optimization.no_such_key").built()
    from jzero.errors import ConfigError
    with pytest.raises(ConfigError, match="even number of data ranks"):
        CANDIDATES["hpz"].resolved(3)


TINY = ["model.preset=gpt2-tiny", "model.d_model=64", "model.n_head=4", "model.d_ff=256", "model.n_layer=2",
        "data.seq_len=32", "train_micro_batch_size_per_gpu=2", "gradient_clipping=0",
        "zero_optimization.stage3_param_persistence_threshold=0"]
#: hpZ compiled as 4 nodes x 2 (the planner's hpz is 2 x 4): the reference for hpZ's predicted scaling
HPZ_4X2 = Candidate(("zero_optimization.stage=3", "zero_optimization.zero_hpz_partition_size=2"))


@pytest.fixture(scope="module")
def compiled():
    """name -> (engine, HLO text, Profile) of the tiny GPT's step for each candidate, compiled once here."""
    from jzero.config import load_config
    from jzero.plan import candidate_overrides, compile_step, profile_of
    from train.pretrain import DEFAULT_CONFIG

    out = {}
    for name in ("zero0", "onebit_adam", "zero3", "hpz", "qwz", "hpz_4x2"):
        cand = HPZ_4X2 if name == "hpz_4x2" else CANDIDATES[name]
        cfg = load_config(None, candidate_overrides(None, TINY, DEFAULT_CONFIG, 8, cand), base=DEFAULT_CONFIG)
        eng, comp = compile_step(cfg)
        out[name] = (eng, comp.as_text(), profile_of(eng, comp, name))
    return out


def _by_op(prof, sizes=None):
    out = {}
    for c in prof.cols:
        n = math.prod((sizes or prof.compiled_sizes)[a] for a in c.axes)
        out[c.op] = out.get(c.op, 0.0) + c.trips * {"all-reduce": 2 * (n - 1) / n}.get(c.op, (n - 1) / n) * c.full_bytes
    return out


def test_profile_of_the_engine_step_counts_the_gradient_allreduce_and_the_1bit_stage(compiled):
    """ZeRO-0's compiled step moves one fp32 gradient all-reduce (2 (n-1)/n x 4 bytes x params, + the loss), 1-bit
    Adam's compression stage at most 1/16 of it; the state leaves are the engine's."""
    eng, _, z0 = compiled["zero0"]
    numel = sum(x.size for x in jax.tree.leaves(eng.state.params))
    sent = bytes_per_device(z0.cols, z0.compiled_sizes)["data"]
    # the gradients (the scanned layers' all-reduce counted once per layer) + 1,793 more f32 (1.3%: the loss and
    # values XLA combined into the same all-reduce; not traced further)
    assert 2 * 7 / 8 * 4 * numel <= sent <= 1.02 * (2 * 7 / 8 * 4 * numel)
    assert any(c.trips == 2 for c in z0.cols)
    assert z0.tokens_per_rank_step == 2 * 32 and z0.bubble == 0.0
    ob = compiled["onebit_adam"][2]
    assert 0 < bytes_per_device(ob.cols, ob.compiled_sizes)["data"] <= sent / 16
    assert any(per_rank for _, _, per_rank in ob.leaves)


def test_at_8_gpus_each_candidate_reproduces_its_programs_counted_bytes(compiled):
    """Predicted at the compiled size (8 GPUs; hpZ: 2 nodes of 4) the mesh is the compiled one, and the bytes with
    each loop body once are comm.collective_bytes' total of the same program (an independent HLO reader)."""
    for name, (_, hlo, prof) in compiled.items():
        if name == "hpz_4x2":
            continue
        g = 4 if name == "hpz" else 8
        sizes = target_sizes(prof.compiled_sizes, 8, g)
        assert sizes == prof.compiled_sizes, name
        once = sum(bytes_per_device(prof.cols, sizes, prof.compiled_sizes, trips=False).values())
        assert once == pytest.approx(collective_bytes(hlo)["total"], abs=len(prof.cols)), name
        assert predict(prof, 1, g, 0.0304, Links())["step_s"] == pytest.approx(0.0304), name   # t(1) = t_1


def test_hpz_node_axis_carries_exactly_topology_inter_node_bytes(compiled):
    """On hpZ's 2 x 4 program the collectives attributed to ``node`` are the ones topology.inter_node_bytes finds
    crossing the 2 nodes of 4 consecutive devices, with the same bytes; everything over ``data`` stays inside."""
    from jzero.topology import inter_node_bytes

    eng, hlo, prof = compiled["hpz"]
    assert prof.compiled_sizes == {"node": 2, "pipeline": 1, "data": 4, "tensor": 1}
    axes = {c.axes for c in prof.cols}
    assert axes == {("data",), ("node",)}, axes
    node = [c for c in prof.cols if c.axes == ("node",)]
    assert all(c.group == 2 and c.trips == 1 for c in node)
    assert all(c.group == 4 for c in prof.cols if c.axes == ("data",))
    counted = inter_node_bytes(hlo, devices_per_node=4)["total"]
    assert bytes_per_device(prof.cols, prof.compiled_sizes)["node"] == pytest.approx(counted, abs=len(node))
    # and that is hpZ's design: the all-reduce of each rank's 1/4 fp32 gradient shard over 2 nodes (+ the loss)
    B = 4 * sum(x.size for x in jax.tree.leaves(eng.state.params))
    assert abs(counted - 2 * 1 / 2 * B / 4) <= 64


def test_hpz_bytes_predicted_for_4_nodes_x_2_match_the_4x2_program(compiled):
    """The 2 x 4 program scaled to node 4, data 2 gives the bytes HLO-counted in the program compiled as 4 x 2:
    data collectives as compiled (whole layers), the node all-reduce's shard x 4/2."""
    _, _, p24 = compiled["hpz"]
    _, _, p42 = compiled["hpz_4x2"]
    predicted = bytes_per_device(p24.cols, target_sizes(p24.compiled_sizes, 8, 2), p24.compiled_sizes)
    counted = bytes_per_device(p42.cols, p42.compiled_sizes)
    assert set(predicted) == set(counted) == {"data", "node"}
    assert predicted["data"] == pytest.approx(counted["data"], rel=1e-9)
    assert predicted["node"] == pytest.approx(counted["node"], abs=16)   # the loss scalar, scaled with the shard


def test_qwz_gathers_int8_and_reduces_as_zero3(compiled):
    """qwZ's weight all-gathers move int8 blocks + fp32 scales: 1/4 of ZeRO-3's fp32 gathers plus <= 4 / 48 of
    that for the scales (blocks of 48..256 here); its gradient reduction is ZeRO-3's."""
    z3, qw = _by_op(compiled["zero3"][2]), _by_op(compiled["qwz"][2])
    assert z3["all-gather"] / 4 < qw["all-gather"] <= z3["all-gather"] / 4 * (1 + 4 / 16)
    assert qw["all-reduce"] == pytest.approx(z3["all-reduce"], rel=1e-9)


def test_hpz_beats_zero3_across_nodes_in_the_table(compiled):
    """16 x 8 GPUs on slow IB: hpZ's only IB traffic is the shard all-reduce, so it predicts faster than ZeRO-3;
    on one node (8 GPUs, node = 1) it is ZeRO-3 over 8 with the same bytes to within the loss scalar."""
    links = Links(ib_GBps=5.0)
    z3, hp = compiled["zero3"][2], compiled["hpz"][2]
    r3, rh = predict(z3, 128, 8, 0.01, links), predict(hp, 128, 8, 0.01, links)
    assert rh["sizes"] == {"node": 16, "pipeline": 1, "data": 8, "tensor": 1}
    assert rh["comm_s"] < r3["comm_s"] / 2
    one3, oneh = predict(z3, 8, 8, 0.01, links)["bytes"], predict(hp, 8, 8, 0.01, links)["bytes"]
    assert set(oneh) == {"data", "node"} and oneh["node"] == 0.0
    assert oneh["data"] == pytest.approx(one3["data"], rel=0.05)


@pytest.mark.parametrize("argv,match", [
    (["--candidates", "zero9"], "--candidates: unknown ['zero9']"),
    ([], "--step-ms-1gpu: no measured single-GPU step for the default config"),
    (["--gpus-per-node", "0", "--candidates", "zero0"], "--gpus-per-node 0: give a GPU count >= 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: give a GPU count >= 1"),
    (["--nodes", "0"], "--nodes 0: give a node count >= 1"),
    (["--fake-devices", "0"], "--fake-devices 0: give a device count >= 1"),
    (["--ib-GBps", "nan"], "--ib-GBps nan: give a bandwidth > 0"),
    (["--nvlink-GBps", "0"], "--nvlink-GBps 0.0: give a bandwidth > 0"),
    (["--step-ms-1gpu", "-3"], "--step-ms-1gpu -3.0: give a step time > 0"),
    (["--gpu-mem-GiB", "inf"], "--gpu-mem-GiB inf: give a size > 0"),
    (["--overlap", "1.5"], "--overlap 1.5: give the fraction of compute that hides communication, 0..1"),
    (["--config", "nonexist.yaml"], "config file 'nonexist.yaml' not found; pass an existing --config path"),
    (["model.no_such_key=1"], "unknown key 'model.no_such_key'")])
def test_main_refuses_before_compiling(argv, match, capsys):
    from train.plan import main

    assert main(["--nodes", "2", "--gpus-per-node", "8"] + argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {match}") and err.count("\n") == 1


def test_main_prints_hpz_and_leaves_out_a_candidate_not_built(capsys, monkeypatch):
    """A candidate whose key the schema lacks (qgZ until it is built) gets a line, not a row or a column."""
    from jzero import plan
    from train.plan import main

    monkeypatch.setitem(plan.CANDIDATES, "unbuilt", Candidate(("x=1",), "zero_optimization.no_such_key"))
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--step-ms-1gpu", "20", "--candidates", "hpz,unbuilt"]
    assert main(argv + TINY) == 0
    out = capsys.readouterr().out
    assert "unbuilt: not built in this tree (zero_optimization.no_such_key is not a config key)" in out
    assert "compiled hpz: " in out and "'node': 2" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| GPUs | hpz: step ms") and "unbuilt" not in rows[0]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 1", "| 2", "| 4", "| 8"]
