"""compressed_allreduce against a NumPy model of DeepSpeed's NcclBackend.compressed_allreduce, on 8 fake devices;
FlatLayout round trips; collective_bytes on hand-written and compiled HLO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jzero.optim.comm import FlatLayout, collective_bytes, collective_ops, compressed_allreduce, padded_size
from helpers import numpy_compressed_allreduce

N = 8


def assert_close(actual, desired, msg=""):
    """Equal to 1e-6 of the buffer's largest magnitude: float32 sums in another order differ by a few ulps."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-6 * max(1.0, float(np.abs(desired).max())),
                               err_msg=msg)


def _mesh():
    return jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _sharded_car(segments):
    def body(x, we, se):
        avg, we2, se2 = compressed_allreduce(x[0], we[0], se[0], "data", segments)
        # every rank's copy of the result comes back, so the test sees that they agree
        return jax.lax.pcast(avg, "data", to="varying")[None], we2[None], se2[None]

    spec = P("data")
    return jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=(spec, spec, spec), out_specs=(spec, spec, spec),
                                 axis_names={"data"}))


@pytest.mark.parametrize("segments", [None, (64, 128, 64), (64, (2, 64), 64)])
def test_compressed_allreduce_matches_numpy_over_three_calls(segments):
    """(2, 64): two segments of 64 (a stacked leaf's layers), each chunked over the ranks on its own (rank r serves
    elements 8r..8r+7 of each), as two separate tensors in DeepSpeed."""
    size = 256
    rng = np.random.default_rng(0)
    car = _sharded_car(segments)
    we = np.zeros((N, size), np.float32)
    se = np.zeros((N, size // N), np.float32)
    we_ref, se_ref = list(we), list(se)
    for call in range(3):
        # different magnitudes per segment so per-segment scales matter
        xs = rng.standard_normal((N, size)).astype(np.float32) * np.repeat([1.0, 5.0, 0.2, 0.2], 64)[None]
        avg, we, se = (np.asarray(a) for a in car(xs, we, se))
        avg_ref, we_ref, se_ref = numpy_compressed_allreduce(list(xs), we_ref, se_ref, segments)
        for r in range(N):
            assert_close(avg[r], avg_ref, f"call {call} rank {r}")
        assert_close(we, np.stack(we_ref), f"worker errors, call {call}")
        assert_close(se, np.stack(se_ref), f"server errors, call {call}")
        assert np.array_equal(np.sign(avg[0]), np.sign(avg_ref))
        # an average of 1-bit values is not the exact mean, but error feedback keeps it close
        assert np.abs(avg[0] - xs.mean(0)).mean() < np.abs(xs.mean(0)).mean() * 3
    assert np.any(we != 0) and np.any(se != 0)


def test_compressed_allreduce_rejects_unpadded_segments():
    car = _sharded_car((60, 196))
    with pytest.raises(ValueError, match="multiples of 8"):
        car(np.zeros((N, 256), np.float32), np.zeros((N, 256), np.float32), np.zeros((N, 32), np.float32))


def test_flat_layout_round_trip_and_padding():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros((0,)), "c": jnp.arange(70.0)}
    per_leaf = FlatLayout.of(tree, n_ranks=4)
    assert padded_size(6, 4) == 32 and padded_size(0, 4) == 0 and padded_size(70, 4) == 96
    assert per_leaf.segments == (32, 96) and per_leaf.total == 128 and per_leaf.chunk == 32
    flat = per_leaf.flatten(tree)
    np.testing.assert_array_equal(flat[:6], np.arange(6.0))
    np.testing.assert_array_equal(flat[6:32], 0)
    np.testing.assert_array_equal(flat[32:102], np.arange(70.0))
    fused = FlatLayout.of(tree, n_ranks=4, fused=True)
    assert fused.segments == (96,)
    np.testing.assert_array_equal(fused.flatten(tree)[6:76], np.arange(70.0))
    for layout in (per_leaf, fused):
        back = layout.unflatten(layout.flatten(tree))
        for k in tree:
            np.testing.assert_array_equal(back[k], tree[k])


def test_flat_layout_of_a_stacked_leaf_pads_and_scales_each_layer():
    """A leaf stacked over 3 layers of 10 numbers: 3 segments of padded_size(10) (a (count, size) group), where the
    unstacked leaf is one segment of padded_size(30); round trip; stacked_axes of 0 everywhere is the old layout."""
    tree = {"a": jnp.arange(6.0), "s": jnp.arange(30.0).reshape(3, 2, 5), "z": jnp.zeros((2, 0))}
    stacked = FlatLayout.of(tree, n_ranks=2, stacked_axes={"a": 0, "s": 1, "z": 1})
    assert stacked.segments == (16, (3, 16)) and stacked.total == 64 and stacked.chunk == 32
    assert FlatLayout.of(tree, n_ranks=2).segments == (16, 32)
    assert FlatLayout.of(tree, n_ranks=2, stacked_axes={"a": 0, "s": 0, "z": 0}) == FlatLayout.of(tree, n_ranks=2)
    flat = np.asarray(stacked.flatten(tree))
    for i in range(3):   # layer i at 16 + 16 i, zero padded to 16
        np.testing.assert_array_equal(flat[16 + 16 * i:32 + 16 * i], np.pad(np.arange(10.0 * i, 10.0 * i + 10), (0, 6)))
    back = stacked.unflatten(stacked.flatten(tree))
    for k in tree:
        np.testing.assert_array_equal(back[k], tree[k])
    with pytest.raises(ValueError, match="stacked axes"):
        FlatLayout.of(tree, n_ranks=2, stacked_axes={"a": 2, "s": 1, "z": 1})


HLO_SNIPPET = """HloModule jit_step, is_scheduled=true, num_partitions=8
  %all-reduce.1 = f32[1000]{0} all-reduce(%p0), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %a2a = (u8[1,16]{1,0}, u8[1,16]{1,0}, u8[1,16]{1,0}, u8[1,16]{1,0}, u8[1,16]{1,0}, /*index=5*/u8[1,16]{1,0}, u8[1,16]{1,0}, u8[1,16]{1,0}) all-to-all(%a, %b, %c, %d, %e, %f, %g, %h), replica_groups={{0,1,2,3,4,5,6,7}}
  %ags = (u8[16]{0}, u8[8,16]{1,0}) all-gather-start(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = u8[4,16]{1,0} all-gather-done(%ags)
  %ars = bf16[64]{0} all-reduce-start(%y), replica_groups={}, to_apply=%add
  ROOT %ard = bf16[64]{0} all-reduce-done(%ars)
  %rs = f32[125]{0} reduce-scatter(%z), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %cp = s32[10]{0} collective-permute(%w), source_target_pairs={{0,1},{1,0}}
  %not = f32[10]{0} fusion(%w), kind=kLoop, calls=%fused_all-reduce
"""


def test_collective_bytes_on_handwritten_hlo():
    ops = collective_ops(HLO_SNIPPET)
    assert [o["op"] for o in ops] == ["all-reduce", "all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                                      "collective-permute"]
    assert [o["group"] for o in ops] == [8, 8, 4, 8, 8, 1]
    got = collective_bytes(HLO_SNIPPET)
    assert got["all-reduce"] == round(2 * 7 / 8 * 4000) + round(2 * 7 / 8 * 128)
    assert got["all-to-all"] == round(7 / 8 * 128)
    assert got["all-gather"] == round(3 / 4 * 64)
    assert got["reduce-scatter"] == 7 * 500
    assert got["collective-permute"] == 40
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_collective_bytes_on_compiled_compressed_allreduce():
    size = 1024
    car = _sharded_car(None)
    args = (np.zeros((N, size), np.float32), np.zeros((N, size), np.float32), np.zeros((N, size // N), np.float32))
    hlo = car.lower(*args).compile().as_text()
    ops = collective_ops(hlo)
    kinds = {o["op"] for o in ops}
    assert kinds == {"all-to-all", "all-gather"}, ops
    assert any(o["op"] == "all-to-all" and o["dtypes"] == ["u8"] and o["result_bytes"] == size // 8 for o in ops)
    assert any(o["op"] == "all-gather" and o["dtypes"] == ["u8"] and o["result_bytes"] == size // 8 for o in ops)
    got = collective_bytes(hlo)
    # bits: 7/8 * S/8 each way; scales: two all-gathers of 8 f32
    assert got["total"] == round(7 / 8 * size / 8) * 2 + 2 * round(7 / 8 * 32)
