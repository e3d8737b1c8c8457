"""Hand-written GPU kernels (Pallas on Triton; cuBLASLt via XLA FFI) for passes XLA leaves as extra HBM trips.

- :mod:`jzero.kernels.layer_norm`: LayerNorm (and RMSNorm, ``rms_norm``) whose backward reads ``x`` and ``dy``
  once and writes ``dx`` plus per-block partial scale/bias gradients (XLA: three kernels and a recomputed fp32
  ``xhat * dy``).
  ``residual_norm`` is those norms with the residual stream's add (and its skip gradient) in the same pass.
- :mod:`jzero.kernels.swiglu`: the backward of Llama's ``silu(gate) * up``, both gradients from one read.
- :mod:`jzero.kernels.cross_entropy`: the LM head's cross-entropy reading the logits once from HBM (the second
  pass over a row hits L2) and writing ``softmax - onehot`` in the forward, with the head's linear inside the
  custom VJP so the per-token cotangent scales the small GEMM operands instead of the [tokens, vocab] array.
- :mod:`jzero.kernels.gelu_gemm`: GPT-2's MLP with bias + GELU and GELU's derivative in cuBLASLt GEMM epilogues
  (C++ XLA FFI handlers in ``csrc/``, built at first use by :mod:`jzero.kernels.build`).

What they save on GPT-2 124M: BENCHMARKS.md, sessions 3 (H100) and 4 (H200).

When they run: :func:`use` is the one decision each call site makes (``models.layers``, :mod:`jzero.tasks`).
:func:`enabled` is True on a GPU backend. ``JZERO_KERNELS=0`` turns them off, ``=1`` forces them
on (in Pallas interpret mode, or the XLA formulas of ``gelu_gemm``, off the GPU: how the CPU tests check their
numbers), ``=layer_norm`` picks some.
Under an active sharding plan the kernels run per shard through ``shard_map`` over the row (token) axes; a layout
that splits the reduced axis (the hidden size for LayerNorm, the vocabulary for the loss), or a trace inside a
``shard_map`` (1-bit optimizers, pipeline stages), falls back to the XLA formula, and :func:`use` logs why (once
per kernel and reason, logger ``jzero.kernels``, level INFO).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from typing import Callable, Sequence, Union

import jax
from jax.sharding import PartitionSpec as P

from jzero import sharding as _sharding


#: the kernels, by the names JZERO_KERNELS takes
NAMES = ("layer_norm", "rms_norm", "residual_norm", "cross_entropy", "gelu_gemm", "swiglu")


_SUSPENDED: contextvars.ContextVar[bool] = contextvars.ContextVar("jzero_kernels_suspended", default=False)


@contextlib.contextmanager
def suspended():
    """No kernel while tracing inside this block (the XLA formulas instead), whatever ``JZERO_KERNELS`` says:
    :mod:`jzero.generation` decodes under it (the kernels are shaped for training's many-token blocks)."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def enabled(name: str | None = None) -> bool:
    """Use Pallas kernel ``name`` (None: any)? GPU backend by default. ``JZERO_KERNELS``: 0 (none), 1 (all, also
    off the GPU, in interpret mode), or a comma-separated subset of :data:`NAMES`; never under :func:`suspended`."""
    if _SUSPENDED.get():
        return False
    flag, chosen = _flag()
    if not flag:
        return jax.default_backend() == "gpu"
    if flag in ("0", "1"):
        return flag == "1"
    unknown = chosen - set(NAMES)
    if unknown:
        raise ValueError(f"JZERO_KERNELS={flag!r}: unknown kernel(s) {sorted(unknown)}; use 0, 1 or a "
                         f"comma-separated subset of {', '.join(NAMES)}")
    return name is None or name in chosen


Check = tuple[str, Union[bool, Callable[[], bool]]]
#: the usual reason: the layout splits the reduced axis, or the op is traced inside a shard_map
LAYOUT_WHY = ("the active sharding splits the axis it reduces (tensor parallelism), or it is traced inside a "
              "shard_map (1-bit optimizers, pipeline stages)")
log = logging.getLogger("jzero.kernels")


def use(name: str, *checks: Check) -> bool:
    """Run kernel ``name`` in the op being traced? The one decision of every call site.

    False, silently, when the kernel is off (:func:`enabled`: ``JZERO_KERNELS``, the backend, :func:`suspended`).
    Otherwise each check ``(why, ok)`` is tried in order, ``ok`` a bool or a callable taking no argument (called
    only when the checks before it passed, so a C++ build goes last); the first that fails makes the kernel stand
    aside for the XLA formula, and ``why`` is logged once per (kernel, reason): ``jzero kernel gelu_gemm stands
    aside: activation checkpointing is on (...)``.
    """
    if not enabled(name):
        return False
    for why, ok in checks:
        if not (ok() if callable(ok) else ok):
            _stand_aside(name, why)
            return False
    return True


@functools.cache
def _stand_aside(name: str, why: str) -> None:
    log.info("jzero kernel %s stands aside (XLA formula instead): %s", name, why)


def requested(name: str) -> bool:
    """Did ``JZERO_KERNELS`` ask for kernel ``name`` by itself or by ``1`` (rather than the GPU default)?"""
    flag, chosen = _flag()
    return flag == "1" or name in chosen


def _flag() -> tuple[str, set[str]]:
    """``JZERO_KERNELS`` as given, and the kernel names it lists."""
    flag = os.environ.get("JZERO_KERNELS", "").strip()
    return flag, {n.strip() for n in flag.split(",") if n.strip()}


def in_manual_region() -> bool:
    """Tracing inside a ``shard_map`` (1-bit optimizers, the pipeline)? The kernels then stand aside for the XLA
    formulas: a ``pallas_call`` there would need its varying axes declared, and on the axes still automatic
    XLA would gather its operands whole."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def interpret() -> bool:
    """Pallas interpret mode off the GPU (CPU tests of the kernels' numbers)."""
    return jax.default_backend() != "gpu"


def row_spec(names: Sequence[str | None]):
    """``(mesh, PartitionSpec)`` of an array with these logical ``names`` under the active plan, the spec padded
    to one entry per name (None: no plan active)."""
    active = _sharding.active_plan()
    if active is None:
        return None
    mesh, rules = active
    spec = tuple(_sharding.logical_to_spec(names, rules))
    return mesh, P(*(spec + (None,) * (len(names) - len(spec))))


def rows_of(spec: P) -> P:
    """The spec without its last (reduced) axis: that of per-row outputs such as statistics or losses."""
    return P(*spec[:-1])


def spec_axes(spec: P) -> tuple[str, ...]:
    """Mesh axes named anywhere in ``spec``."""
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(out)


def per_shard(make_fn: Callable, names: Sequence[str | None], in_specs, out_specs):
    """``make_fn(row_axes)`` run per shard (``shard_map``) under an active plan of several devices, or as is.

    ``row_axes`` are the mesh axes the rows are split over (for a ``psum`` of partial sums; () without a plan).
    ``in_specs``/``out_specs`` are callables ``spec -> specs`` given the PartitionSpec of the row-major operand
    (logical ``names``), so a caller states which operands follow the rows and which are replicated. The caller
    has checked that the reduced (last) axis is not split (the kernels' ``supported``).
    """
    got = row_spec(names)
    if got is None or got[0].size == 1:
        return make_fn(())
    mesh, spec = got
    return jax.shard_map(make_fn(spec_axes(spec)), mesh=mesh, in_specs=in_specs(spec), out_specs=out_specs(spec),
                         check_vma=False)


def last_axis_unsplit(names: Sequence[str | None]) -> bool:
    """Is the last logical axis of ``names`` unsplit under the active plan (and are we outside a shard_map)?"""
    if in_manual_region():
        return False
    got = row_spec(names)
    return got is None or got[0].size == 1 or got[1][-1] is None
