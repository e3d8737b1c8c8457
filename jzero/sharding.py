"""Logical axis rules and ZeRO placement, stated as data.

Every parameter of a jzero model carries logical axis names (``('embed', 'mlp')``, ``('layers', 'embed', 'heads', 'kv')``).
A rule table maps logical names to mesh axes; that gives the **compute** layout (what a layer multiplies with).
ZeRO adds the ``data`` axis to one dimension of a leaf to give the **storage** layout of whichever trees the stage
partitions (Levanter's two mappings; DeepSpeed's stages differ only in which tree uses which):

    stage 0: params, grads, optimizer state in compute layout (replicated over data; grads all-reduced)
    stage 1: optimizer state in storage layout
    stage 2: + gradients and the micro-batch accumulator in storage layout (reduce-scatter)
    stage 3: + parameters in storage layout; the model gathers each layer's params to compute layout
             inside the layer scan (``constrain`` on the param), so one layer is whole at a time.

``constrain(x, names)`` is the one place model code asks for a layout; it is a no-op outside an active plan.
``gather_param(w, names, dtype)`` is where a weight meets its compute layout (ZeRO-3's gather); under ZeRO++ qwZ
it gathers int8 blocks (jzero.quantized_gather). ZeRO++ hpZ (jzero.topology) only changes the data: the batch
rule becomes ``("node", "data")`` while ZeRO's storage axis stays ``data`` (within the node).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalRules = tuple[tuple[str, Any], ...]

#: Megatron-style defaults: batch over data; heads, MLP hidden and vocabulary split over tensor.
#: Tensor parallelism is nothing but these rules: a weight whose *output* dim is 'heads'/'mlp'/'vocab' is
#: column-parallel, one whose *input* dim is one of them row-parallel, so a block's forward needs one all-reduce after
#: attention and one after the MLP (XLA inserts them where the partial sums meet the replicated residual).
#: 'length' is the sequence dim inside attention/MLP (never split: heads or hidden are); 'residual_length' is
#: the sequence dim of the residual stream between blocks, norms and embeddings (split under sequence parallelism).
DEFAULT_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("residual_length", None),
    ("layers", None),
    ("stage", "pipeline"),
)

#: Megatron sequence parallelism (Korthikanti et al. 2022): the residual stream, norms and embedding outputs are
#: also split over ``tensor`` along the sequence, so the two all-reduces of a block become reduce-scatter
#: (into the sequence-split residual) + all-gather (before the next column-parallel matmul): same bytes moved,
#: and the activations between blocks take 1/tensor of the memory. Selected by ``mesh.sequence_parallel: true``.
SEQUENCE_PARALLEL_RULES: LogicalRules = tuple(
    (name, "tensor") if name == "residual_length" else (name, axis) for name, axis in DEFAULT_RULES)


def rules_for(mesh_cfg) -> LogicalRules:
    """The rule table a ``mesh`` config section selects (``sequence_parallel`` -> :data:`SEQUENCE_PARALLEL_RULES`)."""
    return SEQUENCE_PARALLEL_RULES if getattr(mesh_cfg, "sequence_parallel", False) else DEFAULT_RULES


#: The config key that sets each logical dim's size, so a divisibility error can name what to change.
CONFIG_KEY_OF = {"heads": "model.n_head", "kv_heads": "model.n_kv_head", "mlp": "model.d_ff",
                 "vocab": "model.vocab_size", "embed": "model.d_model", "layers": "model.n_layer"}

#: Logical names ZeRO never splits: slicing a scanned layer stack over a sharded dim would gather it whole.
NO_ZERO_DIMS = ("layers", "stage")


def logical_to_spec(names: Sequence[str | None] | None, rules: LogicalRules = DEFAULT_RULES) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once (first name wins)."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for n in names:
        ax = table.get(n) if n is not None else None
        axes = ax if isinstance(ax, tuple) else (ax,) if ax else ()
        if any(a in used for a in axes):
            ax = None
        else:
            used.update(axes)
        out.append(ax)
    return P(*out)


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def zero_spec(spec: P, shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
              threshold: int = 0, axis: str = "data") -> P:
    """Add the ``data`` axis to the largest dimension that it divides (after any existing split).

    Leaves with fewer than ``threshold`` elements stay as they are (DeepSpeed's persistence threshold), as do
    leaves with no dimension that divides, and dims named in ``NO_ZERO_DIMS``.
    """
    n = mesh.shape.get(axis, 1)
    if n == 1 or math.prod(shape) < max(threshold, 1):
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if any(axis in _spec_axes(e) for e in entries):
        return spec
    names = list(names) if names is not None else [None] * len(shape)
    best, best_local = None, 0
    for i, size in enumerate(shape):
        existing = math.prod(mesh.shape[a] for a in _spec_axes(entries[i]))
        if names[i] in NO_ZERO_DIMS or size % (existing * n):
            continue
        if size // existing > best_local:
            best, best_local = i, size // existing
    if best is None:
        return spec
    entries[best] = _spec_axes(entries[best]) + (axis,) if entries[best] is not None else axis
    return P(*entries)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ShardingPlan:
    """Shardings of every tree of the train state, derived from logical names + rules + ZeRO stage."""

    mesh: Mesh
    rules: LogicalRules
    zero_stage: int
    param_names: Any          # pytree of logical-name tuples, like params
    param_compute: Any        # pytree of NamedSharding: layout a layer computes with
    param_storage: Any        # pytree of NamedSharding: layout params live in (== compute unless stage 3)
    grad: Any                 # pytree of NamedSharding for gradients and the accumulator
    zero: Any                 # pytree of NamedSharding: the ZeRO-partitioned layout of param-shaped state

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch(self, ndim: int = 3, batch_dim: int = 1) -> NamedSharding:
        """Token batches ``[accum, rows, seq]``: rows over ``data``."""
        spec = [None] * ndim
        spec[batch_dim] = logical_to_spec(("batch",), self.rules)[0]
        return NamedSharding(self.mesh, P(*spec))


def logical_names(boxed_params):
    """Logical names of every param leaf, as tuples (from Flax's LogicallyPartitioned metadata of an abstract
    ``model.init``); a leaf without names of its rank gets ``(None,) * ndim``."""
    import flax.linen as nn

    specs = nn.get_partition_spec(boxed_params)
    shapes = nn.unbox(boxed_params)

    def one(spec, leaf):
        names = tuple(spec) if spec is not None else ()
        return names if len(names) == len(leaf.shape) else (None,) * len(leaf.shape)

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def make_plan(abstract_params, param_names, mesh: Mesh, zero_stage: int, rules: LogicalRules = DEFAULT_RULES,
              threshold: int = 0) -> ShardingPlan:
    """Build the plan from abstract params (ShapeDtypeStructs) and their logical names (same tree).

    ``threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``) keeps leaves with fewer elements whole in
    ZeRO-3's storage (its parameters, their gradients and optimizer state) only, since it is ZeRO-3's knob; under
    ZeRO-1/2 optimizer state and (stage 2) gradients are partitioned whatever their size, as DeepSpeed partitions
    them."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    names_leaves = jax.tree.leaves(param_names, is_leaf=is_names)
    shape_leaves, treedef = jax.tree.flatten(abstract_params)
    if len(names_leaves) != len(shape_leaves):
        raise ValueError(f"param_names has {len(names_leaves)} leaves but params have {len(shape_leaves)}")
    compute, zero, storage = [], [], []
    for names, leaf in zip(names_leaves, shape_leaves):
        spec = logical_to_spec(names, rules)
        _check_divisible(spec, leaf.shape, names, mesh)
        compute.append(NamedSharding(mesh, spec))
        zero.append(NamedSharding(mesh, zero_spec(spec, leaf.shape, names, mesh, 0)))
        storage.append(NamedSharding(mesh, zero_spec(spec, leaf.shape, names, mesh, threshold)))
    compute, zero, storage = (jax.tree.unflatten(treedef, x) for x in (compute, zero, storage))
    return ShardingPlan(
        mesh=mesh, rules=rules, zero_stage=zero_stage,
        param_names=jax.tree.unflatten(treedef, names_leaves),
        param_compute=compute,
        param_storage=storage if zero_stage >= 3 else compute,
        # stage 3: gradients and optimizer state in the parameters' storage layout (a persisted leaf's update runs
        # whole where its weight lives: no gather of updated weights); stages 1-2: every leaf partitioned
        grad=storage if zero_stage >= 3 else zero if zero_stage == 2 else compute,
        zero=storage if zero_stage >= 3 else zero,
    )


def _check_divisible(spec: P, shape, names, mesh: Mesh) -> None:
    for dim, (entry, size) in enumerate(zip(spec, shape)):
        k = math.prod(mesh.shape[a] for a in _spec_axes(entry))
        if size % k:
            axes = "*".join(f"mesh.{a}" for a in _spec_axes(entry))
            key = CONFIG_KEY_OF.get(names[dim])
            what = f"{key}={size}" if key else f"dimension '{names[dim]}' of size {size}"
            raise ValueError(f"{what} is not divisible by {axes}={k} (logical axis '{names[dim]}' is split over "
                             f"{entry}); choose a {axes} that divides {size} or change {key or 'the model size'}")


def opt_state_shardings(tx, abstract_opt_state, plan: ShardingPlan):
    """Shardings for an optax state: param-shaped leaves follow ZeRO (stage>=1), the rest replicated."""
    import optax

    target = plan.zero if plan.zero_stage >= 1 else plan.param_compute
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, target,
        transform_non_params=lambda _: plan.replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding) or x is None,
    )


# --------------------------------------------------------------------------- constrain


_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar("jzero_plan", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Make ``constrain`` effective while tracing a step (the engine wraps its traced functions in this)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_plan() -> tuple[Mesh, LogicalRules] | None:
    """The ``(mesh, rules)`` made active by :func:`activate`, or None (for layouts ``constrain`` cannot name)."""
    return _ACTIVE.get()


def constrain(x, names: Sequence[str | None]):
    """Ask for ``x``'s layout by logical names; a no-op when no plan is active (plain un-sharded use)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


class _ConstrainTo:
    """``constrain`` to fixed logical names plus ``extra`` trailing unsplit dims (qwZ's int8 blocks)."""

    def __init__(self, names):
        self.names = tuple(names)

    def __call__(self, x, extra: int):
        return constrain(x, self.names + (None,) * extra)


#: ``(gather_fn, shape_fn)`` that replace :func:`gather_param` / :func:`param_shape` inside a manual region that
#: does its own gathers (ZeRO++ qgZ, :mod:`jzero.quantized_reduce`, sets it; this module imports none of them)
_GATHER_OVERRIDE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("jzero_gather_override", default=None)


@contextlib.contextmanager
def override_gather(gather_fn, shape_fn):
    """Inside: ``gather_param(w, names, dtype, shape)`` is ``gather_fn(w, names, dtype, shape)`` and
    ``param_shape(names, shape)`` is ``shape_fn(names, shape)``."""
    token = _GATHER_OVERRIDE.set((gather_fn, shape_fn))
    try:
        yield
    finally:
        _GATHER_OVERRIDE.reset(token)


def param_shape(names: Sequence[str | None], shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a model reads its weight of ``shape`` with: ``shape``, except inside an :func:`override_gather`
    region (ZeRO++ qgZ's, where a leaf ZeRO-3 splits over ``data`` is this rank's shard)."""
    override = _GATHER_OVERRIDE.get()
    return override[1](names, shape) if override is not None else tuple(shape)


def gather_param(w, names: Sequence[str | None], dtype, shape: Sequence[int] | None = None):
    """A weight cast to ``dtype`` in its compute layout: where ZeRO-3 gathers it (a no-op layout change below
    stage 3). Under ZeRO++ qwZ (:mod:`jzero.quantized_gather` active) the gather moves int8 blocks instead; inside
    an :func:`override_gather` region (ZeRO++ qgZ's manual region) it is that region's gather."""
    from jzero import quantized_gather as qwz

    override = _GATHER_OVERRIDE.get()
    if override is not None:   # w may be one rank's shard there: ``shape`` is the weight's
        return override[0](w, names, dtype, tuple(shape) if shape is not None else w.shape)

    active, q = _ACTIVE.get(), qwz.settings()
    dim = q[1].get((tuple(names), tuple(w.shape))) if active is not None and q is not None else None
    if dim is None:   # no qwZ, or a leaf ZeRO-3 keeps whole: there is no gather to quantize
        return constrain(w.astype(dtype), names)
    mesh, rules = active
    spec = logical_to_spec(names, rules)
    entry = spec[dim] if dim < len(spec) else None
    if math.prod(mesh.shape[a] for a in _spec_axes(entry)) > 1:
        raise NotImplementedError(f"ZeRO++ qwZ on a dim split over {entry} and data together is not implemented; "
                                  "use mesh.tensor=1")
    local = w.shape[-1] // (mesh.shape["data"] if dim == w.ndim - 1 else 1)
    return qwz.quantized_gather(w, mesh, dim, dtype, qwz.block_for(local, q[0]), _ConstrainTo(names))


def per_device_bytes(tree, device=None, memory_kind: str | None = None) -> int:
    """Bytes of ``tree``'s array shards that belong to ``device`` (default: the first addressable device);
    ``memory_kind`` ("device", "pinned_host") counts only arrays in that memory (None: all)."""
    device = device or jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        if memory_kind is not None and (leaf.sharding.memory_kind or "device") != memory_kind:
            continue
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total
