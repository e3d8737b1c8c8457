"""Sharding utilities: logical rules -> specs, ZeRO placement, per-device bytes from real shards."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero import sharding as shd
from jzero.mesh import make_mesh


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert shd.logical_to_spec(("embed", "mlp")) == P(None, "tensor")
    assert shd.logical_to_spec(("batch", "length", "embed")) == P("data", None, None)
    # 'heads' and 'mlp' both map to tensor: the second one stays unsplit
    assert shd.logical_to_spec(("heads", "mlp")) == P("tensor", None)
    assert shd.logical_to_spec(None) == P()


def test_zero_spec_picks_largest_divisible_dim_and_respects_threshold():
    mesh = make_mesh({"data": 8})
    # [layers, embed, mlp]: never the layers dim; the largest dim divisible by 8 is mlp (256)
    assert shd.zero_spec(P(None, None, None), (4, 64, 256), ("layers", "embed", "mlp"), mesh) == P(None, None, "data")
    # below the persistence threshold: unchanged
    assert shd.zero_spec(P(None), (64,), ("embed",), mesh, threshold=100) == P(None)
    # nothing divides by 8: unchanged
    assert shd.zero_spec(P(None), (6,), ("embed",), mesh) == P(None)
    # combines with a tensor split on the same dim
    mesh2 = make_mesh({"data": 4, "tensor": 2})
    assert shd.zero_spec(P(None, "tensor"), (8, 64), ("embed", "mlp"), mesh2) == P(None, ("tensor", "data"))


def _plan(stage, mesh):
    params = {"w": jax.ShapeDtypeStruct((4, 64, 128), jnp.float32), "b": jax.ShapeDtypeStruct((4, 128), jnp.float32)}
    names = {"w": ("layers", "embed", "mlp"), "b": ("layers", "mlp")}
    return shd.make_plan(params, names, mesh, stage)


def test_plan_trees_per_stage():
    mesh = make_mesh({"data": 8})
    for stage in range(4):
        plan = _plan(stage, mesh)
        data_in = lambda tree: any("data" in str(s.spec) for s in jax.tree.leaves(tree))  # noqa: E731
        assert data_in(plan.grad) == (stage >= 2)
        assert data_in(plan.param_storage) == (stage >= 3)
        assert not data_in(plan.param_compute)
        assert data_in(plan.zero)


def test_persistence_threshold_is_zero3s_knob_only():
    """stage3_param_persistence_threshold is ZeRO-3's (DeepSpeed): under ZeRO-1/2 the optimizer state and stage-2
    gradients of a leaf below it are partitioned all the same (they used to stay whole); under ZeRO-3 such a leaf
    stays whole with its gradient and optimizer state (its update runs where it lives, no gather after it)."""
    mesh = make_mesh({"data": 8})
    params = {"w": jax.ShapeDtypeStruct((4, 64, 128), jnp.float32), "b": jax.ShapeDtypeStruct((4, 128), jnp.float32)}
    names = {"w": ("layers", "embed", "mlp"), "b": ("layers", "mlp")}
    whole_b, split_b, whole_w, split_w = (4, 128), (4, 16), (4, 64, 128), (4, 64, 16)
    for stage in (1, 2, 3):
        plan = shd.make_plan(params, names, mesh, stage, threshold=10_000)   # b (512 elements) below, w above
        shard = lambda tree, k: tree[k].shard_shape(params[k].shape)  # noqa: E731
        assert shard(plan.zero, "b") == (whole_b if stage == 3 else split_b) and shard(plan.zero, "w") == split_w
        assert shard(plan.grad, "b") == (split_b if stage == 2 else whole_b)   # stage 3: as its storage
        assert shard(plan.param_storage, "b") == whole_b                      # kept whole: below the threshold
        assert shard(plan.param_storage, "w") == (split_w if stage == 3 else whole_w)


def test_per_device_bytes_counts_only_local_shards():
    mesh = make_mesh({"data": 8})
    x = jax.device_put(np.zeros((64, 32), np.float32), NamedSharding(mesh, P("data", None)))
    y = jax.device_put(np.zeros((64, 32), np.float32), NamedSharding(mesh, P()))
    assert shd.per_device_bytes({"x": x}) == 64 * 32 * 4 // 8
    assert shd.per_device_bytes({"y": y}) == 64 * 32 * 4


def test_constrain_is_identity_outside_a_plan_and_shards_inside():
    mesh = make_mesh({"data": 8})
    x = jnp.ones((8, 4))
    assert shd.constrain(x, ("batch", None)) is x

    def f(x):
        with shd.activate(mesh):
            return shd.constrain(x * 2, ("batch", None))

    out = jax.jit(f)(x)
    assert out.sharding.spec == P("data", None) or out.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((8, 4)))
