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

    def micro(carry, tokens):
        loss_sum, acc = carry
        loss, g = grad_fn(params, tokens)
        g = put(g)
        acc = jax.tree.map(lambda a, b: a + b.astype(accum_dtype), acc, g)
        return (loss_sum + loss, put(acc)), None

    refs = jax.tree.leaves((params, batch_AxBx))
    zeros = put(jax.tree.map(lambda p: _varying_like(jnp.zeros(p.shape, accum_dtype), refs), params))
    init = (_varying_like(jnp.zeros((), jnp.float32), refs), zeros)
    (loss_sum, acc), _ = jax.lax.scan(micro, init, batch_AxBx)
    grads = jax.tree.map(lambda a, p: (a / n_micro).astype(p.dtype), acc, params)
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
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls)
        return (new, metrics, out.grads) if with_grads else (new, metrics)
    return train_fn


# --------------------------------------------------------------------------- where the optimizer state lives


@dataclass
class OnDevice:
    """The strategy of params and optimizer state held on the devices (ZeRO layouts; 1-bit subclasses it).

    Every strategy gives the engine the same calls: ``init`` (optimizer state from fp32 params), ``train_fn`` (its
    step from :func:`make_step`), ``jit``, ``run`` (one compiled step), ``masters`` / ``with_params`` (the fp32
    weights out and in) and ``checkpoint_meta`` (what a checkpoint must record to rebuild those weights);
    :class:`jzero.offload.OptimizerOffload` is the host-memory one.
    """

    tx: optax.GradientTransformation
    opt_shardings: Any
    fp16: bool = False

    offloaded = False
    params_are_masters = True    # state.params are the fp32 weights themselves

    def init(self, params):
        """``(params, opt_state, opt_state shardings)`` from the fp32 params."""
        return params, jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params), self.opt_shardings

    def train_fn(self, loss_fn: Callable, grads_of: Callable, schedule: Callable, *, skip_nonfinite: bool,
                 context) -> Callable:
        grads_fn = loss_grads(loss_fn, grads_of, fp16=self.fp16, check_finite=skip_nonfinite)
        return make_step(grads_fn, optax_update(self.tx), schedule, skip_nonfinite=skip_nonfinite, context=context)

    def jit(self, train_fn: Callable, state_shardings, plan):
        """The whole step as one program; the state is donated (XLA reuses its buffers)."""
        return jax.jit(train_fn, out_shardings=(state_shardings, plan.replicated), donate_argnums=(0,))

    def run(self, compiled, state, batch):
        return compiled(state, batch)

    def masters(self, state, param_storage):
        return state.params

    def with_params(self, state, params_fp32):
        return state.replace(params=jax.tree.map(lambda x, c: x.astype(c.dtype), params_fp32, state.params))

    def checkpoint_meta(self) -> dict | None:
        return None
