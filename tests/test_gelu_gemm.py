"""jzero.kernels.gelu_gemm (the cuBLASLt-epilogue MLP; its XLA formulas off the GPU) and jzero.kernels.build.

On CPU the two epilogue GEMMs are their reference formulas, so these tests check the custom VJP around them, its
sharding and where it stands aside; the GPU handlers themselves are checked against the same formulas by
``python -m benchmarks.gelu_gemm_check`` on the GPU (numbers in BENCHMARKS.md).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jzero import kernels, sharding
from jzero.kernels import build
from jzero.kernels import gelu_gemm as gg
from models.layers import MLP

NAMES = ("batch", "length", "embed")
F32 = jnp.float32


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mlp_inputs():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    bf = jnp.bfloat16
    x = jax.random.normal(k[0], (8, 6, 32), bf)
    w1 = (0.3 * jax.random.normal(k[1], (32, 128))).astype(bf)
    b1 = (0.5 * jax.random.normal(k[2], (128,))).astype(bf)
    w2 = (0.2 * jax.random.normal(k[3], (128, 32))).astype(bf)
    dy = jax.random.normal(k[4], (8, 6, 32), bf)
    return x, w1, b1, w2, dy


def _vjp(fn, args, dy):
    y, back = jax.vjp(fn, *args)
    return (y, *back(dy))


def test_formulas_match_numpy_float64():
    """The epilogues' formulas: pre = x @ w + b, hidden = gelu_tanh(pre), dpre = (dy @ w.T) * gelu'(pre)."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(16, 8)), 0.5 * rng.normal(size=(8, 24)), rng.normal(size=24)
    hidden, pre = gg.reference_bias_gelu(*(jnp.asarray(a, F32) for a in (x, w, b)))
    p = x @ w + b
    c = np.sqrt(2 / np.pi)
    np.testing.assert_allclose(pre, p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden, 0.5 * p * (1 + np.tanh(c * (p + 0.044715 * p ** 3))), rtol=1e-5, atol=1e-5)
    dy, w2 = rng.normal(size=(16, 4)), rng.normal(size=(24, 4))
    dpre, db = gg.reference_dgelu(*(jnp.asarray(a, F32) for a in (dy, w2, p)))
    eps = 1e-6   # gelu' by central differences in float64
    gelu = lambda t: 0.5 * t * (1 + np.tanh(c * (t + 0.044715 * t ** 3)))   # noqa: E731
    want = (dy @ w2.T) * (gelu(p + eps) - gelu(p - eps)) / (2 * eps)
    np.testing.assert_allclose(dpre, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, want.sum(0), rtol=1e-4, atol=1e-4)


def test_mlp_value_and_gradients_match_autodiff(mlp_inputs):
    """bf16 custom VJP vs jax autodiff of the fp32 MLP: each output within bf16 rounding, like XLA's bf16 path."""
    x, w1, b1, w2, dy = mlp_inputs
    got = _vjp(lambda *a: gg.mlp(*a, NAMES), (x, w1, b1, w2), dy)
    ref = _vjp(lambda *a: jax.nn.gelu(a[0] @ a[1] + a[2], approximate=True) @ a[3],
               [a.astype(F32) for a in (x, w1, b1, w2)], dy.astype(F32))
    for name, g, r in zip(("y", "dx", "dw1", "db1", "dw2"), got, ref):
        assert g.dtype == jnp.bfloat16 and g.shape == r.shape, name
        assert _rel(g, r) < 1e-2, name


def test_mixed_or_fp32_operands_are_refused(mlp_inputs):
    x, w1, b1, w2, dy = mlp_inputs
    with pytest.raises(TypeError, match=r"one dtype, bfloat16 or float16; got \['bfloat16', 'float16'\]"):
        gg.bias_gelu_2d(x[0], w1.astype(jnp.float16), b1)
    with pytest.raises(TypeError, match="float32"):
        gg.dgelu_2d(dy[0].astype(F32), w2.astype(F32), x[0].astype(F32))


def test_mlp_per_shard_on_8_devices_equals_one_device(mlp_inputs):
    x, w1, b1, w2, dy = mlp_inputs

    def loss(x, w1, b1, w2):
        return jnp.vdot(gg.mlp(x, w1, b1, w2, NAMES).astype(F32), dy.astype(F32))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    v1, g1 = grad(x, w1, b1, w2)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), ("data", "tensor", "pipeline"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with sharding.activate(mesh):
        assert kernels.row_spec(NAMES)[1][0] is not None and gg.supported(NAMES)   # rows split, op runs
        v8, g8 = grad(x, w1, b1, w2)
    assert abs(float(v8) - float(v1)) <= 1e-3 * abs(float(v1))
    for a, b in zip(g8, g1):
        assert _rel(a, b) < 5e-3   # bf16 weight gradients: per-shard partial sums rounded before the psum


def test_stands_aside_under_tensor_parallelism_and_inside_shard_map():
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "tensor", "pipeline"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with sharding.activate(mesh):
        assert not gg.supported(NAMES)   # 'mlp' split over tensor: the hidden is not whole on a device
    assert gg.supported(NAMES, 768, 3072) and not gg.supported(NAMES, 768, 3070)   # cuBLASLt: multiples of 8
    flat = Mesh(np.array(jax.devices()[:8]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = {}

    def local(v):
        seen["supported"] = gg.supported(NAMES)
        return v

    jax.jit(jax.shard_map(local, mesh=flat, in_specs=P("data"), out_specs=P("data")))(jnp.ones((8, 4)))
    assert seen["supported"] is False and gg.supported(NAMES)


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_module_uses_the_op_only_when_fused(monkeypatch, mlp_inputs, fused):
    """models.layers.MLP: same params either way; fused=False (GPT-2 under remat) keeps XLA's autodiff GELU."""
    x = mlp_inputs[0]
    monkeypatch.setenv("JZERO_KERNELS", "1")
    calls = []
    monkeypatch.setattr(gg, "bias_gelu_2d", lambda *a: calls.append(1) or gg.reference_bias_gelu(*a))
    m = MLP(128, jnp.bfloat16, 0.02, fused=fused)
    params = m.init(jax.random.PRNGKey(1), x)
    y = m.apply(params, x)
    assert bool(calls) == fused
    monkeypatch.setenv("JZERO_KERNELS", "0")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(m.apply(params, x), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_build_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(build, "_cuda_roots", lambda: [])
    with pytest.raises(build.BuildError, match=r"cublasLt\.h.*CUDA_HOME.*JZERO_KERNELS=layer_norm,cross_entropy"):
        build.command("lt_gemm", "/tmp/x.so")


def test_failed_build_warns_by_default_and_raises_when_requested(monkeypatch):
    monkeypatch.setattr(kernels, "interpret", lambda: False)   # as on a GPU

    def fail():
        raise build.BuildError("cannot build jzero's cuBLASLt kernels: test")

    monkeypatch.setattr(gg, "_register", fail)
    monkeypatch.delenv("JZERO_KERNELS", raising=False)
    with pytest.warns(UserWarning, match="cannot build.*XLA's GEMMs"):
        assert gg.available() is False
    monkeypatch.setenv("JZERO_KERNELS", "gelu_gemm")
    with pytest.raises(build.BuildError):
        gg.available()


def _fake_root(root, headers_at="include", libs_at="lib"):
    libs = [f"{libs_at}/libcublasLt.so.13", f"{libs_at}/libcudart.so.13"]
    for f in [f"{headers_at}/{h}" for h in build.HEADERS] + libs:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")


def test_build_uses_one_cuda_root_whole(monkeypatch, tmp_path):
    """The wheels split the headers over packages (one -I each); a partial root is never mixed with another."""
    wheels = tmp_path / "site" / "nvidia"
    for pkg, files in (("cublas", ["include/cublasLt.h", "lib/libcublasLt.so.13"]),
                       ("cuda_runtime", [f"include/{h}" for h in build.HEADERS[1:]] + ["lib/libcudart.so.13"])):
        for f in files:
            (wheels / pkg / f).parent.mkdir(parents=True, exist_ok=True)
            (wheels / pkg / f).write_text("")
    partial = tmp_path / "partial"
    (partial / "include").mkdir(parents=True)
    (partial / "include" / "cublasLt.h").write_text("")
    monkeypatch.setattr(build, "_cuda_roots", lambda: [str(partial), str(wheels)])
    root, _, _ = build.cuda_root()
    cmd = build.command("lt_gemm", "out.so")
    assert root == str(wheels) and not any(str(partial) in a for a in cmd)
    assert f"-I{wheels / 'cublas' / 'include'}" in cmd and f"-I{wheels / 'cuda_runtime' / 'include'}" in cmd
    assert "-l:libcublasLt.so.13" in cmd and "-l:libcudart.so.13" in cmd
    assert f"-Wl,-rpath,{wheels / 'cublas' / 'lib'}" in cmd
    monkeypatch.setattr(build, "_cuda_roots", lambda: [str(partial)])
    with pytest.raises(build.BuildError, match=r"partial \(the closest root\) lacks driver_types\.h"):
        build.command("lt_gemm", "out.so")


def test_build_finds_an_aarch64_toolkit(monkeypatch, tmp_path):
    """A toolkit for Grace (sbsa) keeps its headers and libraries under targets/sbsa-linux."""
    toolkit = tmp_path / "cuda-13.0"
    _fake_root(toolkit, "targets/sbsa-linux/include", "targets/sbsa-linux/lib")
    monkeypatch.setattr(build, "_cuda_roots", lambda: [str(toolkit)])
    cmd = build.command("lt_gemm", "out.so")
    assert f"-I{toolkit / 'targets' / 'sbsa-linux' / 'include'}" in cmd
    assert f"-L{toolkit / 'targets' / 'sbsa-linux' / 'lib'}" in cmd


def test_cache_key_follows_compiler_and_headers(monkeypatch, tmp_path):
    src = tmp_path / "k.cc"
    src.write_text("int f();")
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "cublasLt.h").write_text("v1")
    cmd = ["c++", f"-I{inc}", str(src)]
    versions = {"c++": b"g++ 13.2"}
    monkeypatch.setattr(build, "_compiler_id", lambda cxx: versions[cxx])
    first = build.cache_key(src, cmd)
    assert build.cache_key(src, cmd) == first
    (inc / "cublasLt.h").write_text("v2")
    second = build.cache_key(src, cmd)
    versions["c++"] = b"g++ 14.1"
    assert len({first, second, build.cache_key(src, cmd)}) == 3


def test_failed_build_is_cached_and_a_hung_one_times_out(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("JZERO_CACHE_DIR", str(tmp_path))
    runs = []

    def failing(name, out):
        runs.append(out)
        return [sys.executable, "-c", "import sys; sys.exit('k.cc:1: error: no')"]

    monkeypatch.setattr(build, "command", failing)
    with pytest.raises(build.BuildError, match=r"failed \(k\.cc:1: error: no\)"):
        build.library("lt_gemm")
    compiled = len(runs)
    with pytest.raises(build.BuildError, match=r"k\.cc:1: error: no.*cached; delete .*\.failed to try again"):
        build.library("lt_gemm")
    assert len(runs) == compiled + 1   # only the digest probe: the compiler did not run again
    monkeypatch.setenv("JZERO_CACHE_DIR", str(tmp_path / "slow"))
    monkeypatch.setenv("JZERO_KERNEL_BUILD_TIMEOUT", "0.5")
    monkeypatch.setattr(build, "command", lambda name, out: [sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(build.BuildError, match=r"timed out after 0\.5 s"):
        build.library("lt_gemm")
    assert not list((tmp_path / "slow").glob("*.failed"))   # a timeout is not cached (the machine may be busy)


def test_library_is_built_once_and_a_failed_build_names_the_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("JZERO_CACHE_DIR", str(tmp_path))
    runs = []

    def fake(name, out):
        runs.append(out)
        return [sys.executable, "-c", f"open({out!r}, 'w').write('so')"]

    monkeypatch.setattr(build, "command", fake)
    first = build.library("lt_gemm")
    built = len(runs)
    assert build.library("lt_gemm") == first and len(runs) == built + 1   # second call: only the digest probe
    assert [p.name for p in tmp_path.iterdir()] == [pathlib.Path(first).name]   # no temporary file left
    monkeypatch.setenv("JZERO_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(build, "command", lambda name, out: [sys.executable, "-c",
                                                             "import sys; sys.exit('x.cc:3: error: bad thing')"])
    with pytest.raises(build.BuildError, match=r"failed \(x\.cc:3: error: bad thing\).*JZERO_KERNELS="):
        build.library("lt_gemm")


def test_algo_settings_read_the_environment(monkeypatch, tmp_path):
    """Where choices are recorded, and whether unrecorded GEMM shapes are timed; a bad value is a one-line error."""
    monkeypatch.setenv("JZERO_CACHE_DIR", str(tmp_path))
    assert gg.algo_settings({}) == (str(tmp_path / "lt_gemm_algos.txt"), False, False)
    assert gg.algo_settings({"JZERO_LT_ALGOS": "/x/a.txt", "JZERO_LT_AUTOTUNE": "1", "JZERO_LT_VERBOSE": "1"}) == \
        ("/x/a.txt", True, True)
    with pytest.raises(ValueError, match=r"JZERO_LT_AUTOTUNE='yes': use 1 .* or 0"):
        gg.algo_settings({"JZERO_LT_AUTOTUNE": "yes"})


def test_graph_symbols_unless_autotuning_or_turned_off():
    """The handlers marked for XLA's command buffers are registered with JZERO_LT_GRAPH=1; with autotuning (event
    timing cannot run in a graph capture) that is an error, as is a bad value (also from algo_settings)."""
    assert gg.graph_symbols(False, {}) is False
    assert gg.graph_symbols(False, {"JZERO_LT_GRAPH": "1"}) is True
    with pytest.raises(ValueError, match=r"JZERO_LT_GRAPH=1 with JZERO_LT_AUTOTUNE=1: .*record the choices first"):
        gg.graph_symbols(True, {"JZERO_LT_GRAPH": "1"})
    assert gg.graph_symbols(True, {}) is False
    assert gg.graph_symbols(False, {"JZERO_LT_GRAPH": "0"}) is False
    with pytest.raises(ValueError, match=r"JZERO_LT_GRAPH='no': use 1 .* or 0"):
        gg.graph_symbols(False, {"JZERO_LT_GRAPH": "no"})
    with pytest.raises(ValueError, match=r"JZERO_LT_GRAPH='2'"):
        gg.algo_settings({"JZERO_LT_GRAPH": "2"})


def test_shipped_algo_choices_are_well_formed():
    """Every line of csrc/lt_gemm_algos.txt is one problem the handler can look up: 9 key fields + an index."""
    lines = [ln.split() for ln in gg.SHIPPED_ALGOS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines, "the shipped file records no choice"
    keys = set()
    for f in lines:
        assert len(f) == 10 and f[0].endswith(tuple(f"_sm{n}" for n in range(1, 1000))), f
        assert all(x.isdigit() for x in f[1:]), f
        keys.add(tuple(f[:9]))
    assert len(keys) == len(lines), "a problem is recorded twice"
