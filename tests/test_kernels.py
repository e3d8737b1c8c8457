"""jzero.kernels: the Pallas kernels' numbers (interpret mode on CPU) against the XLA formulas and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jzero import kernels, sharding
from jzero.kernels import cross_entropy as kce
from jzero.kernels import layer_norm as kln
from jzero.kernels import swiglu as ksw
from models.layers import layer_norm as xla_layer_norm

NAMES = ("batch", "length", "embed")


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _fro(a, b):
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _assert_8_devices_equal_one(grad, *args):
    """``grad(*args)`` (a value-and-grad function, jitted here) under a data=8 plan (the kernels per shard, rows split) equals the
    one-device run: the value to 1e-4, every gradient to 1e-5 relative."""
    v1, g1 = jax.jit(grad)(*args)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), ("data", "tensor", "pipeline"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with sharding.activate(mesh):
        assert kernels.row_spec(NAMES)[1][0] is not None   # rows really are split
        v8, g8 = jax.jit(grad)(*args)
    assert abs(float(v8) - float(v1)) < 1e-4 * abs(float(v1))
    for a, b in zip(g8, g1):
        assert _rel(a, b) < 1e-5


@pytest.fixture(scope="module")
def ln_inputs():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (jax.random.normal(k[0], (4, 37, 48)) * 3 + 1).astype(jnp.bfloat16)   # 148 rows: ragged last tile
    scale = 1 + 0.1 * jax.random.normal(k[1], (48,))
    bias = 0.1 * jax.random.normal(k[2], (48,))
    dy = jax.random.normal(k[3], x.shape).astype(jnp.bfloat16)
    return x, scale, bias, dy


def test_layer_norm_kernel_matches_the_xla_formula(ln_inputs):
    x, scale, bias, dy = ln_inputs

    def run(fn):
        def loss(x, s, b):
            return jnp.vdot(fn(x, s, b).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    v_k, g_k = run(lambda x, s, b: kln.layer_norm(x, s, b, 1e-5, jnp.bfloat16, NAMES))
    v_x, g_x = run(lambda x, s, b: xla_layer_norm(x, s, b, 1e-5, jnp.bfloat16))
    assert abs(float(v_k) - float(v_x)) <= 1e-3 * abs(float(v_x))
    for a, b in zip(g_k, g_x):
        assert a.dtype == b.dtype and _rel(a, b) < 5e-3


def test_head_cross_entropy_matches_optax_value_and_gradient():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    h = jax.random.normal(k[0], (2, 5, 16)).astype(jnp.bfloat16)
    w = (0.5 * jax.random.normal(k[1], (300, 16))).astype(jnp.bfloat16)   # vocab 300: ragged last chunk
    labels = jax.random.randint(k[2], (2, 5), 0, 300)
    weight = jax.random.uniform(k[3], (2, 5))   # a per-token cotangent, not only the mean's uniform one

    def ours(h, w):
        return (kce.head_cross_entropy(h, w, labels) * weight).sum()

    def ref(h, w):
        logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), w.astype(jnp.float32))
        return (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weight).sum()

    v1, g1 = jax.value_and_grad(ours, (0, 1))(h, w)
    v2, g2 = jax.value_and_grad(ref, (0, 1))(h, w)
    assert abs(float(v1) - float(v2)) < 1e-3 * abs(float(v2))
    for a, b in zip(g1, g2):
        assert a.dtype == jnp.bfloat16 and _rel(a, b) < 1e-2


def test_kernels_per_shard_on_8_devices_equal_one_device(ln_inputs):
    """Under a data=8 plan both kernels run per shard (shard_map) and give the un-sharded numbers."""
    x, scale, bias, dy = ln_inputs
    x, dy = x[:, :32], dy[:, :32]
    x8 = jnp.concatenate([x, x], 0)   # 8 rows of batch
    dy8 = jnp.concatenate([dy, dy], 0)
    labels = jax.random.randint(jax.random.PRNGKey(3), x8.shape[:2], 0, 64)
    w = (0.3 * jax.random.normal(jax.random.PRNGKey(4), (64, 48))).astype(jnp.bfloat16)

    def step(x, s, b, w):
        y = kln.layer_norm(x, s, b, 1e-5, jnp.bfloat16, NAMES)
        return (jnp.vdot(y.astype(jnp.float32), dy8.astype(jnp.float32))
                + kce.head_cross_entropy(y, w, labels).mean())

    grad = jax.value_and_grad(step, argnums=(0, 1, 2, 3))
    _assert_8_devices_equal_one(grad, x8, scale, bias, w)


def test_jzero_kernels_switch(monkeypatch):
    monkeypatch.setenv("JZERO_KERNELS", "0")
    assert not kernels.enabled("layer_norm")
    monkeypatch.setenv("JZERO_KERNELS", "layer_norm")
    assert kernels.enabled("layer_norm") and not kernels.enabled("cross_entropy")
    monkeypatch.setenv("JZERO_KERNELS", "layer_norm,softmax")
    with pytest.raises(ValueError, match="unknown kernel.*softmax"):
        kernels.enabled("layer_norm")
    monkeypatch.delenv("JZERO_KERNELS")
    assert kernels.enabled() == (jax.default_backend() == "gpu")


def test_use_is_one_decision_that_logs_why_a_kernel_stands_aside(monkeypatch, caplog):
    import logging

    calls = []
    later = lambda: calls.append(1) or True  # noqa: E731
    monkeypatch.setenv("JZERO_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="jzero.kernels"):
        assert not kernels.use("layer_norm", ("never asked", later))      # off: no check runs, nothing logged
        monkeypatch.setenv("JZERO_KERNELS", "layer_norm")
        assert kernels.use("layer_norm", ("fine", True), ("fine too", later)) and calls == [1]
        for _ in range(2):
            assert not kernels.use("layer_norm", ("the test says no", False), ("never reached", later))
    assert calls == [1]                                                   # a failed check stops the later ones
    lines = [r.getMessage() for r in caplog.records if "stands aside" in r.getMessage()]
    assert lines == ["jzero kernel layer_norm stands aside (XLA formula instead): the test says no"]   # once


def test_kernels_stand_aside_inside_shard_map():
    """Inside a shard_map (1-bit optimizers, pipeline stages) both kernels defer to the XLA formulas."""
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = {}

    def local(x):
        seen["inside"] = (kernels.in_manual_region(), kln.supported(NAMES, 48), kce.supported())
        return x

    jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(jnp.ones((8, 4)))
    assert seen["inside"] == (True, False, False)
    assert not kernels.in_manual_region() and kln.supported(NAMES, 48) and kce.supported()


def test_head_cross_entropy_undifferentiated_equals_the_kernel_forward():
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    h = jax.random.normal(k[0], (2, 4, 16)).astype(jnp.bfloat16)
    w = (0.5 * jax.random.normal(k[1], (100, 16))).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (2, 4), 0, 100)
    plain = kce.head_cross_entropy(h, w, labels)                       # eval: XLA formula
    fwd, _ = jax.vjp(lambda h: kce.head_cross_entropy(h, w, labels), h)   # train: the kernel's loss
    np.testing.assert_allclose(np.asarray(plain), np.asarray(fwd), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Llama's kernels: RMSNorm, SwiGLU
# References are jax.vjp of the models.layers formulas in fp32 on the same (rounded) inputs; bf16 results are
# judged by relative Frobenius error (bf16 keeps ~3 significant digits), fp32 ones tightly.
TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float32): 1e-5}


def _rms_ref(x, scale, eps):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(3, 11, 96), (2, 16, 64)], ids=["33rows_d96", "32rows_d64"])
def test_rms_norm_kernel_matches_the_fp32_formula(shape, dtype):
    """33 rows: a ragged last forward tile (RMS_BLOCK_M=2) and a ragged backward program (2 x 16 = 32 rows);
    d=96: a hidden size padded to the 128-wide tile. 32 rows, d=64: every tile full."""
    assert kln.RMS_BLOCK_M * kln.RMS_BWD_INNER == 32
    k = jax.random.split(jax.random.PRNGKey(6), 3)
    x = (jax.random.normal(k[0], shape) * 2 + 0.5).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(k[1], shape[-1:])
    dy = jax.random.normal(k[2], shape).astype(dtype)
    eps = 1e-6

    y, vjp = jax.vjp(lambda x, s: kln.rms_norm(x, s, eps, dtype, NAMES), x, scale)
    dx, dscale = vjp(dy)
    y_ref, vjp_ref = jax.vjp(lambda x, s: _rms_ref(x, s, eps), x.astype(jnp.float32), scale)
    dx_ref, dscale_ref = vjp_ref(dy.astype(jnp.float32))

    assert (y.dtype, dx.dtype, dscale.dtype) == (jnp.dtype(dtype), jnp.dtype(dtype), jnp.dtype(jnp.float32))
    assert y.shape == dx.shape == shape and dscale.shape == shape[-1:]
    for got, ref in ((y, y_ref), (dx, dx_ref), (dscale, dscale_ref)):   # dscale: fp32 sums, so tight
        assert _fro(got, ref) < TOL[got.dtype]


def _swiglu_ref(g, u):
    return jax.nn.silu(g) * u


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 13, 700), (2, 8, 1024)], ids=["26rows_f700", "16rows_f1024"])
def test_swiglu_kernel_matches_the_fp32_formula(shape, dtype):
    """[2, 13, 700]: 26 rows (BLOCK_M=8) and d_ff 700 (BLOCK_F=512) leave ragged tiles on both axes (masked
    loads and stores); [2, 8, 1024]: every tile full."""
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    gate = (2 * jax.random.normal(k[0], shape)).astype(dtype)
    up = jax.random.normal(k[1], shape).astype(dtype)
    dh = jax.random.normal(k[2], shape).astype(dtype)

    h, vjp = jax.vjp(lambda g, u: ksw.swiglu(g, u, ("batch", "length", "mlp")), gate, up)
    dg, du = vjp(dh)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    h_ref, vjp_ref = jax.vjp(_swiglu_ref, f32(gate), f32(up))
    dg_ref, du_ref = vjp_ref(f32(dh))

    assert h.dtype == dg.dtype == du.dtype == jnp.dtype(dtype)
    for got, ref in ((h, h_ref), (dg, dg_ref), (du, du_ref)):
        assert got.shape == shape
        assert _fro(got, ref.astype(dtype)) < TOL[got.dtype]
    # fp32 math and one rounding: the bf16 gradients are the fp32 ones rounded (0 here on CPU), where XLA's own
    # bf16 autodiff of the formula is ~4e-3 off
    for got, ref in ((dg, dg_ref), (du, du_ref)):
        assert _fro(got, ref.astype(dtype)) < 1e-3


def test_jzero_kernels_takes_the_llama_kernel_names(monkeypatch):
    assert set(kernels.NAMES) == {"layer_norm", "rms_norm", "residual_norm", "cross_entropy", "gelu_gemm", "swiglu"}
    monkeypatch.setenv("JZERO_KERNELS", "rms_norm, swiglu")
    assert kernels.enabled("rms_norm") and kernels.enabled("swiglu")
    assert not kernels.enabled("layer_norm") and not kernels.enabled("cross_entropy")
    assert kernels.requested("swiglu") and not kernels.requested("gelu_gemm")
    monkeypatch.setenv("JZERO_KERNELS", "swiglu,rmsnorm,geglu")
    with pytest.raises(ValueError, match=r"unknown kernel\(s\) \['geglu', 'rmsnorm'\]"):
        kernels.enabled("swiglu")


def _res_norm_ref(x, r, scale, bias, eps, rms):
    """``(x + r, norm(x + r))`` in fp32, the sum rounded to x's dtype first (what the unfused model computes)."""
    s = (x if r is None else (x + r)).astype(jnp.float32)
    if rms:
        return s, s * jax.lax.rsqrt(jnp.square(s).mean(-1, keepdims=True) + eps) * scale
    mean = s.mean(-1, keepdims=True)
    return s, (s - mean) * jax.lax.rsqrt(jnp.square(s - mean).mean(-1, keepdims=True) + eps) * scale + bias


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("with_r", [True, False], ids=["x_plus_r", "x_only"])
def test_residual_norm_kernel_matches_add_then_norm(rms, with_r):
    """``residual_norm``: the forward's sum and norm, and the backward's ``dx = ds + norm'(dy)`` (the skip
    path's gradient added in the kernel), against the fp32 formula of ``s = x + r; y = norm(s)``; 33 rows and
    d=96 leave ragged tiles (both kernels' row tiles, a padded column tile)."""
    shape, eps = (3, 11, 96), 1e-5
    k = jax.random.split(jax.random.PRNGKey(8), 6)
    x = (jax.random.normal(k[0], shape) + 0.3).astype(jnp.bfloat16)
    r = jax.random.normal(k[1], shape).astype(jnp.bfloat16) if with_r else None
    scale = 1 + 0.1 * jax.random.normal(k[2], shape[-1:])
    bias = jnp.zeros(shape[-1:]) if rms else 0.1 * jax.random.normal(k[3], shape[-1:])
    ds, dy = (jax.random.normal(k[i], shape).astype(jnp.bfloat16) for i in (4, 5))

    f = lambda x, r, sc, b: kln.residual_norm(x, r, sc, b, None, eps, jnp.bfloat16, NAMES, rms)  # noqa: E731
    (s, y), vjp = jax.vjp(f, x, r, scale, bias)
    dx, dr, dscale, dbias = vjp((ds, dy))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = lambda x, r, sc, b: _res_norm_ref(x, r, sc, b, eps, rms)  # noqa: E731
    (s_ref, y_ref), vjp_ref = jax.vjp(ref, x, r, scale, bias)   # the bf16 sum, then fp32
    dx_ref, dr_ref, dscale_ref, dbias_ref = vjp_ref((f32(ds), f32(dy)))

    assert s.dtype == y.dtype == dx.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(f32(s)), np.asarray(s_ref)), "the sum is x + r in bf16"
    for got, want in ((y, y_ref), (dx, dx_ref), (dscale, dscale_ref)) + ((() if rms else ((dbias, dbias_ref),))):
        assert _fro(got, want) < TOL[got.dtype], _fro(got, want)
    if with_r:
        assert dr is not None and np.array_equal(np.asarray(dr), np.asarray(dx)), "r's gradient is s's, as x's"
    else:
        assert dr is None


def test_cross_entropy_persistent_grid_is_the_same_kernel_work():
    """PROGRAMS > 0: each program walks row blocks p, p+G, ...; every grid size (one that leaves the last
    program's blocks past the rows, one larger than the rows) gives the bits of one program per block."""
    k = jax.random.split(jax.random.PRNGKey(9), 2)
    x = (3 * jax.random.normal(k[0], (37, 300))).astype(jnp.bfloat16)
    labels = jax.random.randint(k[1], (37,), 0, 300)
    loss0, d0 = kce.loss_and_grad_2d(x, labels, block_v=128, programs=0)
    for block_r, programs in ((1, 5), (1, 37), (1, 100), (4, 3)):
        loss, d = kce.loss_and_grad_2d(x, labels, block_r=block_r, block_v=128, programs=programs)
        assert np.array_equal(np.asarray(loss), np.asarray(loss0)), (block_r, programs)
        assert np.array_equal(np.asarray(d, np.float32), np.asarray(d0, np.float32)), (block_r, programs)


def test_residual_norm_per_shard_on_8_devices_equals_one_device(ln_inputs):
    """Under a data=8 plan residual_norm runs per shard (both kernels, the scale/bias partial sums psum'd)."""
    x, scale, bias, dy = ln_inputs
    x8 = jnp.concatenate([x[:, :32], x[:, :32]], 0)
    r8 = jnp.roll(x8, 1, axis=-1)
    dy8 = jnp.concatenate([dy[:, :32], dy[:, :32]], 0)

    rb8 = 0.1 * jnp.arange(x8.shape[-1], dtype=jnp.float32).astype(jnp.bfloat16)

    def step(x, r, s, b, rb):
        h, y = kln.residual_norm(x, r, s, b, rb, 1e-5, jnp.bfloat16, NAMES, False)
        return jnp.vdot(y.astype(jnp.float32), dy8.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32) ** 2)

    grad = jax.value_and_grad(step, argnums=(0, 1, 2, 3, 4))
    _assert_8_devices_equal_one(grad, x8, r8, scale, bias, rb8)


def _rbias_inputs(seed, rms, n_cot, shape=(3, 11, 96)):
    """bf16 ``x, r``, a bf16 sub-layer bias ``rb``, fp32 ``scale, bias`` (zero bias for RMS) and ``n_cot`` bf16
    cotangents of ``shape`` (33 rows, d=96: ragged tiles), from PRNG key ``seed``."""
    k = jax.random.split(jax.random.PRNGKey(seed), 5 + n_cot)
    x = (jax.random.normal(k[0], shape) + 0.3).astype(jnp.bfloat16)
    r = jax.random.normal(k[1], shape).astype(jnp.bfloat16)
    rb = (0.5 * jax.random.normal(k[2], shape[-1:])).astype(jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(k[3], shape[-1:])
    bias = jnp.zeros(shape[-1:]) if rms else 0.1 * jax.random.normal(k[4], shape[-1:])
    return x, r, rb, scale, bias, [jax.random.normal(k[5 + i], shape).astype(jnp.bfloat16) for i in range(n_cot)]


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_residual_norm_with_the_sublayer_bias_matches_the_formula(rms):
    """``rbias``: ``s = x + (r + rb)`` summed in fp32 and rounded once, then the norm; rb's gradient is the column
    sum of dx (from the backward kernel's partial sums), r's is dx; against the fp32 formula and a bias-free call
    with the bias already added. 33 rows, d=96: ragged tiles."""
    eps = 1e-5
    x, r, rb, scale, bias, (ds, dy) = _rbias_inputs(12, rms, 2)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731

    f = lambda x, r, rb: kln.residual_norm(x, r, scale, bias, rb, eps, jnp.bfloat16, NAMES, rms)  # noqa: E731
    (s, y), vjp = jax.vjp(f, x, r, rb)
    dx, dr, drb = vjp((ds, dy))
    assert s.dtype == y.dtype == dx.dtype == dr.dtype == drb.dtype == jnp.bfloat16

    s_want = (f32(x) + (f32(r) + f32(rb))).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(f32(s)), np.asarray(f32(s_want))), "s = x + (r + rb), rounded once"
    ref = lambda x, r, rb: _res_norm_ref(x + r + rb, None, scale, bias, eps, rms)  # noqa: E731
    (_, y_ref), vjp_ref = jax.vjp(ref, f32(x), f32(r), f32(rb))
    dx_ref, dr_ref, drb_ref = vjp_ref((f32(ds), f32(dy)))
    for got, want in ((y, y_ref), (dx, dx_ref), (dr, dr_ref), (drb, drb_ref)):
        assert _fro(got, want) < TOL[got.dtype], _fro(got, want)
    np.testing.assert_allclose(np.asarray(f32(drb)), np.asarray(f32(dx)).reshape(-1, 96).sum(0), rtol=1e-2,
                               atol=1e-2)
    with pytest.raises(ValueError, match="rbias needs r"):
        kln.residual_norm(x, None, scale, bias, rb, eps, jnp.bfloat16, NAMES, rms)


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_residual_norm_with_three_consumers_sums_their_gradients_in_the_kernel(rms):
    """``n_y=3``: three outputs equal to the one-output call's ``y``; the backward kernel reads the three
    cotangents and sums them in fp32: against the fp32 formula with ``dy = dy1 + dy2 + dy3`` (33 rows, d=96:
    ragged tiles), with the sub-layer bias (its gradient from the same pass)."""
    eps = 1e-5
    x, r, rb, scale, bias, (ds, *dys) = _rbias_inputs(13, rms, 4)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731

    f3 = lambda x, r, rb: kln.residual_norm(x, r, scale, bias, rb, eps, jnp.bfloat16, NAMES, rms, 3)  # noqa: E731
    (s, ys), vjp = jax.vjp(f3, x, r, rb)
    s1, y1 = kln.residual_norm(x, r, scale, bias, rb, eps, jnp.bfloat16, NAMES, rms)
    assert isinstance(ys, tuple) and len(ys) == 3
    for y in ys:
        assert np.array_equal(np.asarray(f32(y)), np.asarray(f32(y1)))
    assert np.array_equal(np.asarray(f32(s)), np.asarray(f32(s1)))
    dx, dr, drb = vjp((ds, tuple(dys)))

    ref = lambda x, r, rb: _res_norm_ref(x + r + rb, None, scale, bias, eps, rms)  # noqa: E731
    (_, _), vjp_ref = jax.vjp(ref, f32(x), f32(r), f32(rb))
    dx_ref, _, drb_ref = vjp_ref((f32(ds), f32(dys[0]) + f32(dys[1]) + f32(dys[2])))
    for got, want in ((dx, dx_ref), (dr, dx_ref), (drb, drb_ref)):
        assert _fro(got, want) < TOL[got.dtype], _fro(got, want)
    # the one-output kernel given the (bf16) sum agrees to bf16 rounding of that sum
    _, vjp1 = jax.vjp(lambda x: kln.residual_norm(x, r, scale, bias, rb, eps, jnp.bfloat16, NAMES, rms), x)
    (dx1,) = vjp1((ds, (f32(dys[0]) + f32(dys[1]) + f32(dys[2])).astype(jnp.bfloat16)))
    assert _fro(dx, dx1) < 1e-2, _fro(dx, dx1)


def test_residual_norm_three_consumers_per_shard_on_8_devices_equals_one_device(ln_inputs):
    """``n_y=3`` under a data=8 plan: the kernels per shard, the three cotangents sharded as the rows."""
    x, scale, bias, dy = ln_inputs
    x8 = jnp.concatenate([x[:, :32], x[:, :32]], 0)
    r8 = jnp.roll(x8, 1, axis=-1)
    dy8 = jnp.concatenate([dy[:, :32], dy[:, :32]], 0).astype(jnp.float32)

    def step(x, r, s, b):
        h, ys = kln.residual_norm(x, r, s, b, None, 1e-5, jnp.bfloat16, NAMES, False, 3)
        return sum(jnp.vdot(y.astype(jnp.float32), dy8 * (i + 1)) for i, y in enumerate(ys)) + jnp.sum(
            h.astype(jnp.float32) ** 2)

    grad = jax.value_and_grad(step, argnums=(0, 1, 2, 3))
    _assert_8_devices_equal_one(grad, x8, r8, scale, bias)
