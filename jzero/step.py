"""One optimizer step from two pieces: ``make_step(grads_fn, update_fn, ...)``.

Every way jzero trains builds its step here, supplying only what differs:

==========================  ================================================  ==================================
strategy                    grads piece                                       update piece
==========================  ================================================  ==================================
plain / ZeRO 0-3            :func:`loss_grads` over :func:`accumulate_grads`  :func:`optax_update`
hpZ (``vg`` slot)           ``accumulate_grads(value_and_grad=...)``           :func:`optax_update`
pipeline (mesh.pipeline)    :func:`loss_grads` over ``pipeline.pipelined_grads``  :func:`optax_update`
1-bit (jzero.optim.onebit)  local gradients inside a ``shard_map``            :func:`optax_update` (same map)
optimizer offload           gradient + clip multiplier (jzero.offload)        none: host chunks after the program
==========================  ================================================  ==================================

and :func:`make_step` does the rest the same way for all of them: the fp16 skip of a non-finite step (params,
optimizer state and LR untouched, as DeepSpeed), the loss scaler's update, the LR of this update
(:func:`lr_count`) and the metrics ``loss, <norm>, lr, loss_scale, skipped_steps``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jzero.precision import LossScaleState, all_finite, scale_loss, select_tree, unscale_grads, update_loss_scale


@struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken (int32, replicated)
    params: Any              # fp32 master params, in the plan's storage layout
    opt_state: Any           # optax state, param-shaped leaves in the ZeRO layout for stage >= 1
    loss_scale: LossScaleState   # fp16 dynamic/static loss scaler (static 1.0 without fp16); skipped_steps
    #: compute-dtype (bf16/fp16) copies of the weight matrices, made from the masters by the update that wrote them
    #: (:func:`compute_copies`; None where the strategy keeps none). Never checkpointed: rebuilt on restore.
    compute: Any = None


@struct.dataclass
class StepGrads:
    """What a grads piece hands :func:`make_step`."""

    loss: jax.Array       # the step's mean loss, unscaled
    grads: Any            # what the update piece takes (the unscaled gradient, for optax_update)
    finite: Any           # bool scalar: no inf/nan in the gradient (None when the step never skips)
    metrics: dict         # the gradient's norm under its metric name ({"grad_norm": ...})


# --------------------------------------------------------------------------- gradients


def accumulate_grads(loss_fn: Callable, params, batch_AxBx: Any, grad_shardings, accum_dtype=jnp.float32,
                     value_and_grad: Callable | None = None):
    """Mean loss and gradient over the leading micro-batch axis (``lax.scan``; one backward at a time).

    Each micro-batch gradient is put in ``grad_shardings`` right after its backward pass: replicated (all-reduce)
    for ZeRO 0/1, partitioned over ``data`` (reduce-scatter) for ZeRO 2/3, so the accumulator is partitioned too.
    ``value_and_grad`` replaces ``jax.value_and_grad(loss_fn)`` (hpZ's node-first reduction, jzero.topology).
    """
    if grad_shardings is None:   # inside a shard_map (1-bit step): layouts are manual, nothing to constrain
        put = lambda g: g  # noqa: E731
    else:
        put = lambda g: jax.tree.map(jax.lax.with_sharding_constraint, g, grad_shardings)  # noqa: E731
    grad_fn = value_and_grad or jax.value_and_grad(loss_fn)
    n_micro = jax.tree.leaves(batch_AxBx)[0].shape[0]
    if n_micro == 1:
        loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch_AxBx))
        return loss, put(grads)

    # A narrow (fp16/bf16) accumulator sums micro-gradients already divided by n_micro, as DeepSpeed's backward
    # divides each micro-batch loss by gradient_accumulation_steps: an fp16 sum of n loss-scaled gradients
    # overflows n times sooner than DeepSpeed's (a skipped step and a halved scale). fp32 divides once at the end.
    narrow = jnp.finfo(accum_dtype).bits < 32

    def micro(carry, tokens):
        loss_sum, acc = carry
        loss, g = grad_fn(params, tokens)
        g = put(g)
        acc = jax.tree.map(lambda a, b: a + (b / n_micro if narrow else b).astype(accum_dtype), acc, g)
        return (loss_sum + loss, put(acc)), None

    refs = jax.tree.leaves((params, batch_AxBx))
    zeros = put(jax.tree.map(lambda p: _varying_like(jnp.zeros(p.shape, accum_dtype), refs), params))
    init = (_varying_like(jnp.zeros((), jnp.float32), refs), zeros)
    (loss_sum, acc), _ = jax.lax.scan(micro, init, batch_AxBx)
    grads = jax.tree.map(lambda a, p: (a if narrow else a / n_micro).astype(p.dtype), acc, params)
    return loss_sum / n_micro, grads


def _varying_like(x: jax.Array, refs) -> jax.Array:
    """``x`` marked varying over every manual mesh axis any of ``refs`` varies over (a no-op outside a
    ``shard_map``). Inside one (the 1-bit step) a scan's zero-initialised carry must have the varying-axes type
    its body returns, which a gradient of varying params over varying rows has."""
    varying = lambda a: jax.typeof(a).manual_axis_type.varying  # noqa: E731
    axes = frozenset().union(*(varying(r) for r in refs)) - varying(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def scaled(loss_fn: Callable, loss_scale: LossScaleState, fp16: bool) -> Callable:
    """``loss_fn`` multiplied by the fp16 loss scale before the backward pass (as is without fp16)."""
    return (lambda p, b: scale_loss(loss_fn(p, b), loss_scale)) if fp16 else loss_fn


def micro_batch_grads(grad_shardings, accum_dtype, value_and_grad: Callable | None = None) -> Callable:
    """``grads_of(loss_fn, params, batch) -> (loss, grads)`` of :func:`accumulate_grads` in the ZeRO gradient
    layout. ``value_and_grad`` is the engine's one gradient-path slot: ``loss_fn -> value_and_grad fn`` (hpZ's
    hierarchical reduction), or None for ``jax.value_and_grad``."""
    def grads_of(loss_fn, params, batch):
        vg = value_and_grad(loss_fn) if value_and_grad is not None else None
        return accumulate_grads(loss_fn, params, batch, grad_shardings, accum_dtype, value_and_grad=vg)
    return grads_of


def loss_grads(loss_fn: Callable, grads_of: Callable, *, fp16: bool, check_finite: bool) -> Callable:
    """The grads piece of the on-device strategies: ``grads_of`` (:func:`micro_batch_grads`, or the pipeline's
    ``pipelined_grads``) of the loss, fp16-scaled; the gradient unscaled in fp32, its global norm as ``grad_norm``
    and (``check_finite``) whether it is finite."""
    def grads_fn(state: TrainState, batch) -> StepGrads:
        ls = state.loss_scale
        loss, grads = grads_of(scaled(loss_fn, ls, fp16), state.params, batch)
        if fp16:
            grads, loss = unscale_grads(grads, ls, jnp.float32), loss / ls.scale
        return StepGrads(loss=loss, grads=grads, finite=all_finite(grads) if check_finite else None,
                         metrics={"grad_norm": optax.tree.norm(grads)})
    return grads_fn


# --------------------------------------------------------------------------- compute-dtype weight copies


def compute_copies(params, dtype, matrices):
    """``dtype`` copies of the fp32 weight matrices (``matrices``: a bool per leaf, :func:`weight_matrices`), None
    for the rest (norm scales, biases: the model uses those in fp32 or casts them itself; they are small).

    Why: the model casts every weight to the compute dtype at its use, so without copies each step starts with a
    pass reading 4 and writing 2 bytes per parameter (Llama-1B: 2.4 ms of a 237 ms H200 step, BENCHMARKS.md
    "Session 8"). Made inside the step by the update that wrote the masters, the copy is 2 more bytes written in
    the same fused pass, and the next step's casts vanish (the model's ``astype`` of a bf16 copy to bf16 is no op).
    """
    return jax.tree.map(lambda p, m: p.astype(dtype) if m else None, params, matrices)


def weight_matrices(logical_names):
    """A bool per param leaf: is it a weight matrix (two or more dims besides the stacked ``layers``/``stage``
    ones)? ``logical_names``: the leaves' logical axis-name tuples (:func:`jzero.sharding.logical_names`)."""
    from jzero.sharding import NO_ZERO_DIMS

    return jax.tree.map(lambda names: sum(n not in NO_ZERO_DIMS for n in names) >= 2, logical_names,
                        is_leaf=lambda x: isinstance(x, tuple))


def _is_none(x) -> bool:
    return x is None


def with_copies(params, copies):
    """``params`` with each weight that has a copy replaced by it, still differentiated as the fp32 master
    (:func:`_from_copy`): the forward reads the copy, the gradient is the master's, fp32 as before."""
    return jax.tree.map(lambda c, p: p if c is None else _from_copy(p, c), copies, params, is_leaf=_is_none)


def copy_shardings(param_storage, copies):
    """The copies' layout: each where its master is (ZeRO-3: partitioned over ``data``, gathered in bf16)."""
    return jax.tree.map(lambda c, s: None if c is None else s, copies, param_storage, is_leaf=_is_none)


@jax.custom_vjp
def _from_copy(master, copy):
    return copy


def _from_copy_fwd(master, copy):
    return copy, None


def _from_copy_bwd(_, g):
    # the same cotangent the cast ``master.astype(copy.dtype)`` has: g converted back to the master's fp32
    return g.astype(jnp.float32), None


_from_copy.defvjp(_from_copy_fwd, _from_copy_bwd)


# --------------------------------------------------------------------------- updates and the step


def apply_update(tx: optax.GradientTransformation, params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def optax_update(tx: optax.GradientTransformation) -> Callable:
    """The update piece of an optax chain: ``(state, StepGrads) -> (params, opt_state)``."""
    return lambda state, out: apply_update(tx, state.params, state.opt_state, out.grads)


def lr_count(state: TrainState) -> jax.Array:
    """Optimizer updates applied so far: the steps taken less the skipped ones (DeepSpeed's scheduler does not
    advance on a skipped step). Equal to the schedule's own count in the optax state
    (:func:`jzero.optim.applied_steps`) of every strategy, and readable without touching the optimizer state
    (which optimizer offload keeps in host memory)."""
    return state.step - state.loss_scale.skipped_steps


def make_step(grads_fn: Callable, update_fn: Callable | None, schedule: Callable, *, skip_nonfinite: bool,
              context: Callable[[], Any] = contextlib.nullcontext, with_grads: bool = False) -> Callable:
    """``train_fn(state, batch) -> (TrainState, metrics)`` from a grads piece and an update piece.

    ``grads_fn(state, batch) -> StepGrads``; ``update_fn(state, StepGrads) -> (params, opt_state)``, both traced
    inside ``context()`` (the sharding rules, qwZ's gathers). ``skip_nonfinite``: a step whose gradient is not
    finite keeps the old params and optimizer state and takes the loss scaler's overflow branch.
    ``update_fn=None``: the update runs after this program (optimizer offload); params and optimizer state pass
    through, and ``with_grads=True`` returns the grads piece's ``grads`` as a third output for it.
    """
    def train_fn(state: TrainState, batch):
        with context():
            out = grads_fn(state, batch)
            if update_fn is not None:
                params, opt_state = update_fn(state, out)
            else:
                params, opt_state = state.params, state.opt_state
        lr = jnp.asarray(schedule(lr_count(state)), jnp.float32)
        ls = state.loss_scale
        if skip_nonfinite:   # DeepSpeed: an overflowed step leaves params, optimizer state and the LR untouched
            if update_fn is not None:
                params, opt_state = select_tree(out.finite, (params, opt_state), (state.params, state.opt_state))
            ls = update_loss_scale(ls, out.finite)
        metrics = {"loss": out.loss, **out.metrics, "lr": lr, "loss_scale": state.loss_scale.scale,
                   "skipped_steps": ls.skipped_steps}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls)
        return (new, metrics, out.grads) if with_grads else (new, metrics)
    return train_fn


# --------------------------------------------------------------------------- where the optimizer state lives


@dataclass
class OnDevice:
    """The strategy of params and optimizer state held on the devices (ZeRO layouts; 1-bit subclasses it).

    Every strategy gives the engine the same calls: ``init`` (optimizer state from fp32 params), ``train_fn`` (its
    step from :func:`make_step`), ``jit``, ``run`` (one compiled step), ``masters`` / ``with_params`` (the fp32
    weights out and in) and ``checkpoint_meta`` (what a checkpoint must record to rebuild those weights);
    :class:`jzero.offload.OptimizerOffload` is the host-memory one. This one also keeps the weights' compute-dtype
    copies (``copy_dtype``): ``copies`` makes them, ``refresh`` remakes them after a restore.
    """

    tx: optax.GradientTransformation
    opt_shardings: Any
    fp16: bool = False
    #: keep :func:`compute_copies` of the weights in this dtype in ``TrainState.compute`` (None: the model casts the
    #: masters each step). The engine sets it for its own models in bf16/fp16 (:func:`jzero.engine._copy_dtype`).
    copy_dtype: Any = None
    copy_matrices: Any = None    # which leaves get a copy (:func:`weight_matrices`), with ``copy_dtype``

    offloaded = False
    params_are_masters = True    # state.params are the fp32 weights themselves

    def init(self, params):
        """``(params, opt_state, opt_state shardings)`` from the fp32 params."""
        return params, jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params), self.opt_shardings

    def train_fn(self, loss_fn: Callable, grads_of: Callable, schedule: Callable, *, skip_nonfinite: bool,
                 context) -> Callable:
        def build(fn):
            grads_fn = loss_grads(fn, grads_of, fp16=self.fp16, check_finite=skip_nonfinite)
            return make_step(grads_fn, optax_update(self.tx), schedule, skip_nonfinite=skip_nonfinite,
                             context=context)

        if self.copy_dtype is None:
            return build(loss_fn)

        def step(state: TrainState, batch):
            new, metrics = build(lambda p, b: loss_fn(with_copies(p, state.compute), b))(state, batch)
            return new.replace(compute=compute_copies(new.params, self.copy_dtype, self.copy_matrices)), metrics
        return step

    def copies(self, params):
        """The weight copies ``TrainState.compute`` holds for these masters (None without ``copy_dtype``)."""
        return None if self.copy_dtype is None else self._copy_fn(params)

    @functools.cached_property
    def _copy_fn(self):   # one jitted program for init, set_params and every restore (compiled once per shape)
        return jax.jit(functools.partial(compute_copies, dtype=self.copy_dtype, matrices=self.copy_matrices))

    def refresh(self, state: TrainState) -> TrainState:
        """``state`` with its weight copies remade from its masters (after a restore, which saves none)."""
        return state.replace(compute=self.copies(state.params))

    def jit(self, train_fn: Callable, state_shardings, plan):
        """The whole step as one program; the state is donated (XLA reuses its buffers)."""
        return jax.jit(train_fn, out_shardings=(state_shardings, plan.replicated), donate_argnums=(0,))

    def run(self, compiled, state, batch):
        return compiled(state, batch)

    def masters(self, state, param_storage):
        return state.params

    def with_params(self, state, params_fp32):
        params = jax.tree.map(lambda x, c: x.astype(c.dtype), params_fp32, state.params)
        return state.replace(params=params, compute=self.copies(params))

    def checkpoint_meta(self) -> dict | None:
        return None
