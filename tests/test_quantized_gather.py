"""ZeRO++ qwZ (jzero.quantized_gather): the block quantizer against NumPy, int8 weight gathers in the compiled
ZeRO-3 step (bytes against plain ZeRO-3's fp32 gathers), and losses beside unquantized ZeRO-3."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.optim.comm import collective_ops
from jzero.quantized_gather import block_dequantize, block_for, block_quantize
from helpers import compile_and_train, numpy_block_quantize


def test_block_quantizer_matches_numpy_and_bounds_the_error():
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    x[1, :256] = 0.0                                  # an all-zero block: scale 0, decodes to 0
    q, scale = block_quantize(jnp.asarray(x), 256)
    q_ref, scale_ref = numpy_block_quantize(x, 256)
    np.testing.assert_array_equal(np.asarray(q), q_ref)
    np.testing.assert_allclose(np.asarray(scale), scale_ref, rtol=1e-7)
    back = np.asarray(block_dequantize(q, scale))
    err = np.abs(back - x).reshape(3, 2, 256).max(-1)
    assert np.all(err <= scale_ref / 2 + 1e-7)        # round-to-nearest: at most half a step per block
    assert np.all(back[1, :256] == 0)
    assert block_for(64, 256) == 64 and block_for(48, 256) == 48 and block_for(512, 256) == 256
    assert block_for(1000, 256) == 250 and block_for(7, 256) == 7


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, extra in [("plain", []), ("qwz", ["zero_optimization.zero_quantized_weights=true"])]:
        _, hlo, losses = compile_and_train(extra)
        out[name] = (collective_ops(hlo), losses)
    return out


def _gather_bytes(ops):
    by = {}
    for o in ops:
        if o["op"] == "all-gather":
            for d in o["dtypes"]:
                by[d] = by.get(d, 0) + o["result_bytes"]
    return by


def test_qwz_gathers_int8_blocks(runs):
    plain, qwz = _gather_bytes(runs["plain"][0]), _gather_bytes(runs["qwz"][0])
    assert set(plain) == {"f32"}
    # the same weights gathered as int8: exactly 1/4 of their fp32 bytes (1/2 of bf16) ...
    assert qwz["s8"] * 4 == plain["f32"]
    # ... plus one fp32 scale per block; this tiny model's last dims (16, 64, 128) give blocks of 16-128, so the
    # scales add ~16% here (4/256 = 1.6% at block 256). Against a bf16 gather: (66368 + 10400) / 132736 = 0.58.
    bf16 = plain["f32"] / 2
    assert (qwz["s8"] + qwz["f32"]) / bf16 <= 0.6
    # qwZ alone leaves the gradient reductions as they were (qgZ is its own key, tests/test_quantized_reduce.py)
    reduced = lambda ops: sorted(o["result_bytes"] for o in ops if o["op"] != "all-gather")  # noqa: E731
    assert reduced(runs["qwz"][0]) == reduced(runs["plain"][0])


def test_qwz_losses_beside_unquantized(runs):
    plain, qwz = runs["plain"][1], runs["qwz"][1]
    assert plain[0] != qwz[0]                                     # the forward really reads quantized weights
    assert np.max(np.abs(qwz - plain) / plain) <= 1e-3


def test_gathered_dims_follow_the_plan_not_the_per_layer_size():
    """The persistence threshold applies to the stacked leaf: a [4, 64, 128] stack (32768 elements, 8192 per layer)
    stored split at threshold 10000 is quantized inside the scan; a [128] bias kept whole is not."""
    from jzero import sharding as shd
    from jzero.mesh import make_mesh
    from jzero.quantized_gather import gathered_dims

    params = {"w": jax.ShapeDtypeStruct((4, 64, 128), jnp.float32), "b": jax.ShapeDtypeStruct((128,), jnp.float32)}
    names = {"w": ("layers", "embed", "mlp"), "b": ("mlp",)}
    plan = shd.make_plan(params, names, make_mesh({"data": 8}), 3, threshold=10_000)
    assert gathered_dims(plan, params) == {(("embed", "mlp"), (64, 128)): 1}
