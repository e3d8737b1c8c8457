"""GPT-2's MLP with bias + GELU and GELU's derivative inside the GEMMs (cuBLASLt epilogues, XLA FFI).

XLA runs ``proj(gelu(x @ w1 + b1))`` with plain GEMMs and two element-wise passes over [tokens, d_ff] arrays:
the forward's bias + GELU (reads the fc GEMM's output, writes the hidden) and the backward's GELU derivative +
fc-bias gradient (reads the proj dX GEMM's output and the pre-activation, writes dpre). cuBLASLt does them in
the GEMMs' epilogues:

- forward, ``GELU_AUX_BIAS``: the fc GEMM writes ``hidden = gelu(x @ w1 + b1)`` and ``pre = x @ w1 + b1``;
- backward, ``DGELU``: the proj layer's dX GEMM writes ``dpre = (dy @ w2.T) * gelu'(pre)``; the fc bias
  gradient ``dpre.sum(0)`` stays an XLA reduction (DGELU_BGRAD, which also sums, measured slower; so did BGRADB
  on the weight-gradient GEMMs, which sums over the tokens: the MLP's fwd+bwd 1.26 vs 1.08 ms and the GPT-2 main
  +1.0 ms on an H200, BENCHMARKS.md "Session 11").

:func:`mlp` is ``gelu(x @ w1 + b1) @ w2`` (the proj bias stays outside, for XLA to fuse into the residual add)
as one custom VJP whose other three GEMMs (dw2, dw1, dx) are XLA's. Per-GEMM and per-step times on GPT-2 124M:
BENCHMARKS.md, "Session 4" (H200). The FFI handlers are C++ (``csrc/lt_gemm.cc``), built at first use by
:mod:`jzero.kernels.build`. Each GEMM shape's cuBLASLt algorithm is chosen without timing, so every run and
rank computes the same bits: the one recorded for this GPU and cuBLASLt version in ``csrc/lt_gemm_algos.txt``
(shipped, measured on an H200) or in ``$JZERO_LT_ALGOS`` (default ``<cache>/lt_gemm_algos.txt``), else cuBLASLt's
heuristic first candidate. ``JZERO_LT_AUTOTUNE=1`` times the candidates of unrecorded shapes instead and appends
the fastest to ``$JZERO_LT_ALGOS``: do that once in one process, then every run reads it. Off the GPU
(``JZERO_KERNELS=1`` in the CPU tests) the two epilogue GEMMs are the XLA formulas below, with the epilogues'
rounding (fp32 accumulation, each output rounded once), so the custom VJP itself is tested everywhere. Under an
active plan the op runs per shard over the token axes (``shard_map``) with the weights whole; it stands aside
(XLA formulas) where the hidden or model axis is split (tensor parallelism), inside a ``shard_map``, and under
activation checkpointing (its saved ``pre``/``hidden`` are not remat-nameable).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jzero import kernels

F32 = jnp.float32
#: cuBLASLt workspace per call (NVIDIA's recommendation for Hopper: 32 MiB)
WORKSPACE_BYTES = 32 << 20
_C = float(np.sqrt(2.0 / np.pi))


#: cuBLASLt algorithm choices shipped with jzero (lines "<key> <candidate index>", see csrc/lt_gemm.cc)
SHIPPED_ALGOS = pathlib.Path(__file__).parent / "csrc" / "lt_gemm_algos.txt"


def algo_settings(environ=None) -> tuple[str, bool, bool]:
    """(record file, autotune, verbose) from ``JZERO_LT_ALGOS`` / ``JZERO_LT_AUTOTUNE`` / ``JZERO_LT_VERBOSE``;
    also checks ``JZERO_LT_GRAPH`` (:func:`graph_symbols`)."""
    from jzero.kernels import build

    env = os.environ if environ is None else environ
    tune = env.get("JZERO_LT_AUTOTUNE", "0")
    if tune not in ("0", "1"):
        raise ValueError(f"JZERO_LT_AUTOTUNE={tune!r}: use 1 (time unrecorded GEMM shapes and record the fastest) "
                         f"or 0 (recorded choice, else cuBLASLt's first candidate)")
    record = env.get("JZERO_LT_ALGOS") or str(build.cache_dir() / "lt_gemm_algos.txt")
    graph_symbols(tune == "1", env)
    return record, tune == "1", env.get("JZERO_LT_VERBOSE", "0") not in ("", "0")


def graph_symbols(tune: bool, environ=None) -> bool:
    """Register the handlers marked compatible with XLA's command buffers (CUDA graphs)? ``JZERO_LT_GRAPH=1``:
    XLA may then capture the two GEMM calls into the step's graphs instead of splitting the graphs around each
    call (the default, ``0``). Not with ``JZERO_LT_AUTOTUNE=1``, whose event timing a graph capture forbids."""
    env = os.environ if environ is None else environ
    graph = env.get("JZERO_LT_GRAPH", "0")
    if graph not in ("0", "1"):
        raise ValueError(f"JZERO_LT_GRAPH={graph!r}: use 1 (the GEMM handlers inside XLA's CUDA graphs) or 0 "
                         f"(outside them)")
    if graph == "1" and tune:
        raise ValueError("JZERO_LT_GRAPH=1 with JZERO_LT_AUTOTUNE=1: autotuning times GEMMs with CUDA events, which "
                         "a graph capture forbids; record the choices first (a few steps with JZERO_LT_AUTOTUNE=1), "
                         "then run with JZERO_LT_GRAPH=1")
    return graph == "1"


@functools.cache
def _register() -> None:
    from jzero.kernels import build

    record, tune, verbose = algo_settings()
    jax.devices()   # the GPU client first: it has loaded the libcublasLt the library links to
    lib = ctypes.CDLL(build.library("lt_gemm"))
    lib.JzeroLtLoad.argtypes, lib.JzeroLtLoad.restype = [ctypes.c_char_p], ctypes.c_int
    lib.JzeroLtSetup.argtypes, lib.JzeroLtSetup.restype = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int], None
    for path in (SHIPPED_ALGOS, record):   # a later line wins: the user's record over the shipped one
        lib.JzeroLtLoad(str(path).encode())
    if tune:
        pathlib.Path(record).parent.mkdir(parents=True, exist_ok=True)
    lib.JzeroLtSetup(record.encode(), int(tune), int(verbose))
    suffix = "Graph" if graph_symbols(tune) else ""
    for target, symbol in (("jzero_gemm_bias_gelu", "JzeroGemmBiasGelu"), ("jzero_gemm_dgelu", "JzeroGemmDgelu")):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol + suffix)), platform="CUDA")


def available() -> bool:
    """Can the FFI handlers be used (always, off the GPU: the XLA formulas)? A failed build is an error when
    ``JZERO_KERNELS`` asked for this kernel, else one warning and the XLA path."""
    if kernels.interpret():
        return True
    from jzero.kernels.build import BuildError

    try:
        _register()
        return True
    except BuildError as exc:
        if kernels.requested("gelu_gemm"):
            raise
        _warn_once(str(exc))
        return False


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(f"{message} (running the MLP with XLA's GEMMs)", stacklevel=3)


def _workspace():
    return jax.ShapeDtypeStruct((WORKSPACE_BYTES,), jnp.uint8)


def gelu_tanh_grad(x32):
    """d/dx of the tanh GELU (GPT-2's; cuBLASLt's DGELU), elementwise in x's dtype (fp32 here)."""
    t = jnp.tanh(_C * (x32 + 0.044715 * x32 * x32 * x32))
    return 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x32 * x32)


def reference_bias_gelu(x_MxK, w_KxN, b_N):
    """XLA formula of :func:`bias_gelu_2d` with the epilogue's rounding (fp32 sum, each output rounded once)."""
    pre32 = jnp.dot(x_MxK, w_KxN, preferred_element_type=F32) + b_N.astype(F32)
    return jax.nn.gelu(pre32, approximate=True).astype(x_MxK.dtype), pre32.astype(x_MxK.dtype)


def reference_dgelu(dy_MxK, w_NxK, pre_MxN):
    """XLA formula of :func:`dgelu_2d` (fp32 product rounded once; the bias gradient sums the rounded dpre)."""
    dpre = (jnp.dot(dy_MxK, w_NxK.T, preferred_element_type=F32) * gelu_tanh_grad(pre_MxN.astype(F32))).astype(dy_MxK.dtype)
    return dpre, _bias_grad(dpre)


def _bias_grad(dpre_MxN):
    return dpre_MxN.astype(F32).sum(0).astype(dpre_MxN.dtype)


def _one_dtype(op: str, *arrays) -> None:
    dtypes = {jnp.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise TypeError(f"jzero.kernels.gelu_gemm.{op}: operands must share one dtype, bfloat16 or float16; got "
                        f"{[str(a.dtype) for a in arrays]} (cast them first)")


def bias_gelu_2d(x_MxK, w_KxN, b_N):
    """``(gelu(x @ w + b), x @ w + b)``, both [M, N] in x's dtype (the fc GEMM with cuBLASLt's GELU_AUX_BIAS)."""
    _one_dtype("bias_gelu_2d", x_MxK, w_KxN)
    dt = x_MxK.dtype
    if kernels.interpret():
        return reference_bias_gelu(x_MxK, w_KxN, b_N)
    _register()
    out = jax.ShapeDtypeStruct((x_MxK.shape[0], w_KxN.shape[1]), dt)
    hidden, pre, _ = jax.ffi.ffi_call("jzero_gemm_bias_gelu", (out, out, _workspace()))(x_MxK, w_KxN, b_N.astype(dt))
    return hidden, pre


def dgelu_2d(dy_MxK, w_NxK, pre_MxN):
    """``(dpre, db)``: ``dpre = (dy @ w.T) * gelu'(pre)`` [M, N] from the proj layer's dX GEMM with cuBLASLt's
    DGELU epilogue, and the fc bias gradient ``db = dpre.sum(0)`` [N] as XLA's reduction (cuBLASLt's
    DGELU_BGRAD, which would do both, runs the sum as a separate kernel, much slower: BENCHMARKS.md,
    "Session 4")."""
    _one_dtype("dgelu_2d", dy_MxK, w_NxK, pre_MxN)
    if kernels.interpret():
        return reference_dgelu(dy_MxK, w_NxK, pre_MxN)
    _register()
    dpre, _ = jax.ffi.ffi_call("jzero_gemm_dgelu",
                               (jax.ShapeDtypeStruct((dy_MxK.shape[0], w_NxK.shape[0]), dy_MxK.dtype),
                                _workspace()))(dy_MxK, w_NxK, pre_MxN)
    return dpre, _bias_grad(dpre)


# --------------------------------------------------------------------------- the differentiable MLP


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def _fwd_local(_axes):
    def run(x, w1, b1, w2):
        hidden, pre = bias_gelu_2d(_flat(x), w1, b1)
        y = jnp.dot(hidden, w2)
        lead = x.shape[:-1]
        return y.reshape(*lead, w2.shape[1]), hidden.reshape(*lead, -1), pre.reshape(*lead, -1)
    return run


def _bwd_local(axes):
    def run(x, w1, w2, hidden, pre, dy):
        x2, h2, p2, dy2 = _flat(x), _flat(hidden), _flat(pre), _flat(dy)
        dw2 = jnp.dot(h2.T, dy2)
        dpre, db1 = dgelu_2d(dy2, w2, p2)
        dw1 = jnp.dot(x2.T, dpre)
        dx = jnp.dot(dpre, w1.T).reshape(x.shape)
        if axes:
            dw1, db1, dw2 = jax.lax.psum((dw1, db1, dw2), axes)
        return dx, dw1, db1, dw2
    return run


def supported(names, *dims: int) -> bool:
    """Can :func:`mlp` run here: the activations' model axis and the hidden ('mlp') axis whole on each device,
    outside ``shard_map`` (see the module doc), and the sizes ``dims`` (model, hidden) multiples of 8 (cuBLASLt's
    epilogue needs its aux leading dimension so)."""
    if any(n % 8 for n in dims) or not kernels.last_axis_unsplit(names):
        return False
    got = kernels.row_spec(tuple(names[:-1]) + ("mlp",))
    if got is None:
        return True
    mesh, spec = got
    return all(mesh.shape[a] == 1 for a in kernels.spec_axes(P(spec[-1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def mlp(x, w1, b1, w2, names: tuple):
    """``gelu(x @ w1 + b1) @ w2`` over the last axis of ``x`` (logical axis ``names``); x, weights in one dtype."""
    return _fwd(x, w1, b1, w2, names)[0]


def _fwd(x, w1, b1, w2, names):
    fn = kernels.per_shard(_fwd_local, names, in_specs=lambda s: (s, P(), P(), P()), out_specs=lambda s: (s, s, s))
    y, hidden, pre = fn(x, w1, b1, w2)
    return y, (x, w1, w2, hidden, pre)


def _bwd(names, res, dy):
    x, w1, w2, hidden, pre = res
    fn = kernels.per_shard(_bwd_local, names, in_specs=lambda s: (s, P(), P(), s, s, s),
                           out_specs=lambda s: (s, P(), P(), P()))
    dx, dw1, db1, dw2 = fn(x, w1, w2, hidden, pre, dy)
    return dx, dw1, db1.astype(w1.dtype), dw2


mlp.defvjp(_fwd, _bwd)
