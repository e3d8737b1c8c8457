"""Mixed precision: DeepSpeed's ``fp16``/``bf16``/``data_types`` sections and its fp16 loss scaler in pure JAX.

The dynamic loss scaler reproduces ``DynamicLossScaler.update_scale`` (deepspeedai/DeepSpeed
``deepspeed/runtime/fp16/loss_scaler.py``) step for step, as a pytree the compiled train step carries:

* overflow (a non-finite gradient): the step is skipped; if hysteresis is used up (``delayed_shift == 1`` or the
  counter is 1) the scale halves, floored at ``min_scale``, else the hysteresis counter drops by one;
* clean step: with ``consecutive_hysteresis`` the counter refills; after every ``scale_window`` clean steps
  since the last overflow the scale doubles (and, without consecutive_hysteresis, the counter refills).

``good_steps`` is DeepSpeed's ``cur_iter - last_overflow_iter - 1`` read before the update (clean steps since
the last overflow). Where DeepSpeed raises "Current loss scale already at minimum" (an overflow at
``min_scale`` with no hysteresis left), ``stalled_at_min_scale`` turns true and stays true: a jitted step
cannot raise, so the training loop's :class:`jzero.guard.TrainingGuard` reads it with the metrics it fetches at
each log step and raises :class:`jzero.errors.TrainingError`.

A static scale (``fp16.loss_scale > 0``) never changes, but DeepSpeed's fp16 optimizers still skip a step
whose gradients overflow, so ``skipped_steps`` counts those too. Without fp16 the scale is a static 1.0.

Typical use inside the train step::

    loss, grads = value_and_grad(lambda p: scale_loss(loss_fn(p), ls))(params)
    grads = unscale_grads(grads, ls)
    finite = all_finite(grads)
    new_params, new_opt = select_tree(finite, (p2, o2), (params, opt_state))  # p2, o2 from the optimizer
    ls = update_loss_scale(ls, finite)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import Field, field_validator

from jzero.section import Section


# --------------------------------------------------------------------------- config sections


class FP16Config(Section):
    """DeepSpeed's ``fp16`` section (``deepspeed/runtime/precision_config.py``), same keys and defaults.

    ``loss_scale`` 0 = dynamic scaling starting at ``2**initial_scale_power``; > 0 = that static scale.
    ``auto_cast`` has no effect under jzero (see :mod:`jzero.ds_keys`): the inputs are integer tokens and the
    model computes in fp16 whenever ``enabled``.
    """

    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = Field(16, ge=0, le=127)
    loss_scale_window: int = Field(1000, gt=0)
    hysteresis: int = Field(2, gt=0)
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(1.0, gt=0)
    fp16_master_weights_and_grads: bool = False

    @field_validator("loss_scale", mode="before")
    @classmethod
    def _loss_scale(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"fp16.loss_scale={v!r}: must be a finite number >= 0 (0 = dynamic loss scaling)")
        return float(v)

    @field_validator("min_loss_scale")
    @classmethod
    def _min_scale(cls, v):
        if not math.isfinite(v):
            raise ValueError(f"fp16.min_loss_scale={v!r}: must be a finite number > 0")
        return v

    @field_validator("fp16_master_weights_and_grads")
    @classmethod
    def _master(cls, v):
        if v:
            raise ValueError("fp16.fp16_master_weights_and_grads=true (fp16 master weights, DeepSpeedCPUAdam only) "
                             "is not implemented: jzero keeps fp32 master weights; remove it")
        return v


class BF16Config(Section):
    """DeepSpeed's ``bf16`` section: bf16 compute, fp32 master weights and optimizer state.

    ``check_grad_overflow``: skip a step whose gradients are not finite (as the fp16 path does, with no scaling).
    DeepSpeed's other bf16 keys are accepted only at their defaults (see the validators for why).
    """

    enabled: bool = False
    check_grad_overflow: bool = False
    immediate_grad_update: bool = False
    bf16_master_weights_and_grads: bool = False
    bf16_optimizer_states: bool = False

    @field_validator("immediate_grad_update")
    @classmethod
    def _immediate(cls, v):
        if v:
            raise ValueError("bf16.immediate_grad_update=true is a PyTorch backward-hook timing detail; jzero "
                             "accumulates micro-batch gradients in data_types.grad_accum_dtype inside the compiled "
                             "step; remove it")
        return v

    @field_validator("bf16_master_weights_and_grads", "bf16_optimizer_states")
    @classmethod
    def _bf16_state(cls, v, info):
        if v:
            raise ValueError(f"bf16.{info.field_name}=true is not implemented: jzero keeps master weights, "
                             "gradients and optimizer state in fp32; remove it")
        return v


class DataTypesConfig(Section):
    """DeepSpeed's ``data_types``: ``grad_accum_dtype`` is the micro-batch gradient accumulator's dtype
    (None = fp32)."""

    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    param_dtype: None = Field(None, description="not implemented; must be absent")
    buffer_dtype: None = Field(None, description="not implemented; must be absent")

    @field_validator("param_dtype", "buffer_dtype", mode="before")
    @classmethod
    def _not_implemented(cls, v, info):
        if v is not None:
            raise ValueError(f"data_types.{info.field_name} is not implemented: parameters follow fp16/bf16 and "
                             "the model's dtype; remove it")
        return v


_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def dtype_from_name(name: str | None, default=jnp.float32):
    """'fp32' | 'bf16' | 'fp16' -> the jnp dtype; None -> ``default``."""
    return default if name is None else _DTYPES[name]


def skips_nonfinite_steps(fp16: FP16Config, bf16: BF16Config) -> bool:
    """Whether a step with non-finite gradients is skipped: always under fp16 (static or dynamic scale, as
    DeepSpeed's fp16 optimizers do), under bf16 only with ``check_grad_overflow``; fp32 never checks."""
    return bool(fp16.enabled or (bf16.enabled and getattr(bf16, "check_grad_overflow", False)))


# --------------------------------------------------------------------------- loss scaler state


@struct.dataclass
class LossScaleState:
    """The loss scaler as a pytree: array leaves change per step, the config fields are static."""

    scale: jax.Array  # float32, the current loss scale
    good_steps: jax.Array  # int32, clean steps since the last overflow (DeepSpeed's stable_interval)
    hysteresis: jax.Array  # int32, overflows still absorbed before the scale drops (cur_hysteresis)
    skipped_steps: jax.Array  # int32, steps skipped for overflow (engine.skipped_steps)
    stalled_at_min_scale: jax.Array  # bool, an overflow hit min_scale with no hysteresis left (DeepSpeed raises)
    dynamic: bool = struct.field(pytree_node=False, default=True)
    scale_window: int = struct.field(pytree_node=False, default=1000)
    min_scale: float = struct.field(pytree_node=False, default=1.0)
    delayed_shift: int = struct.field(pytree_node=False, default=2)
    consecutive_hysteresis: bool = struct.field(pytree_node=False, default=False)
    scale_factor: float = struct.field(pytree_node=False, default=2.0)


def _state(scale: float, delayed_shift: int, **static) -> LossScaleState:
    return LossScaleState(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros([], jnp.int32),
                          hysteresis=jnp.asarray(delayed_shift, jnp.int32), skipped_steps=jnp.zeros([], jnp.int32),
                          stalled_at_min_scale=jnp.zeros([], jnp.bool_), delayed_shift=delayed_shift, **static)


def dynamic_loss_scale(init_scale: float = 2.0 ** 16, scale_window: int = 1000, min_scale: float = 1.0,
                       delayed_shift: int = 2, consecutive_hysteresis: bool = False) -> LossScaleState:
    """DeepSpeed's ``DynamicLossScaler(init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis)``
    with its fixed ``scale_factor`` 2."""
    return _state(init_scale, int(delayed_shift), dynamic=True, scale_window=int(scale_window),
                  min_scale=float(min_scale), consecutive_hysteresis=bool(consecutive_hysteresis))


def static_loss_scale(scale: float = 1.0) -> LossScaleState:
    """DeepSpeed's static ``LossScaler(scale)``: the scale never changes."""
    return _state(scale, 1, dynamic=False, min_scale=float(scale))


def init_loss_scale(fp16: FP16Config | None = None) -> LossScaleState:
    """The scaler DeepSpeed builds from the ``fp16`` section: dynamic when enabled with ``loss_scale`` 0
    (``init_scale = 2**initial_scale_power``, ``scale_window = loss_scale_window``, ``min_scale =
    min_loss_scale``, ``delayed_shift = hysteresis``), static ``loss_scale`` when > 0, static 1.0 without fp16."""
    if fp16 is None or not fp16.enabled:
        return static_loss_scale(1.0)
    if fp16.loss_scale > 0:
        return static_loss_scale(fp16.loss_scale)
    return dynamic_loss_scale(2.0 ** fp16.initial_scale_power, fp16.loss_scale_window, fp16.min_loss_scale,
                              fp16.hysteresis, fp16.consecutive_hysteresis)


def update_loss_scale(state: LossScaleState, grads_finite) -> LossScaleState:
    """The scaler after one step whose gradients were finite (``grads_finite`` true) or overflowed.

    Jit-safe (no Python branching on values); matches DeepSpeed's ``update_scale(overflow=not grads_finite)``.
    """
    finite = jnp.asarray(grads_finite, jnp.bool_)
    overflow = jnp.logical_not(finite)
    skipped = state.skipped_steps + overflow.astype(jnp.int32)
    good = jnp.where(overflow, 0, state.good_steps + 1).astype(jnp.int32)
    if not state.dynamic:
        return state.replace(good_steps=good, skipped_steps=skipped)

    scale, hyst, refill = state.scale, state.hysteresis, jnp.int32(state.delayed_shift)
    # overflow branch
    shrink = overflow & ((state.delayed_shift == 1) | (hyst == 1))
    stalled = state.stalled_at_min_scale | (shrink & (scale == state.min_scale))
    scale_over = jnp.where(shrink, jnp.maximum(scale / state.scale_factor, state.min_scale), scale)
    hyst_over = jnp.where(shrink, hyst, hyst - 1)
    # clean branch
    grow = (state.good_steps > 0) & (state.good_steps % state.scale_window == 0)
    scale_clean = jnp.where(grow, scale * state.scale_factor, scale)
    if state.consecutive_hysteresis:
        hyst_clean = refill
    else:
        hyst_clean = jnp.where(grow, refill, hyst)

    return state.replace(
        scale=jnp.where(overflow, scale_over, scale_clean).astype(jnp.float32),
        hysteresis=jnp.where(overflow, hyst_over, hyst_clean).astype(jnp.int32),
        good_steps=good, skipped_steps=skipped, stalled_at_min_scale=stalled)


# --------------------------------------------------------------------------- helpers for the train step


def scale_loss(loss, state: LossScaleState):
    """``loss * scale`` in float32 (an fp16 loss times 2**16 would overflow fp16 itself)."""
    return jnp.asarray(loss).astype(jnp.float32) * state.scale


def unscale_grads(grads, state: LossScaleState, dtype=None):
    """Every gradient divided by the scale, computed in float32, returned in ``dtype`` (None: each leaf's own)."""
    return jax.tree.map(lambda g: (g.astype(jnp.float32) / state.scale).astype(dtype or g.dtype), grads)


def all_finite(tree) -> jax.Array:
    """A scalar bool: no inf/nan in any leaf. Under jit on sharded arrays XLA reduces across the shards, so
    every device gets the same answer (DeepSpeed all-reduces its overflow flag for the same reason)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select_tree(pred, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` else ``old``, leaf by leaf (same structure): how a skipped step keeps the old
    params and optimizer state (and with them every step count inside the optimizer state)."""
    pred = jnp.asarray(pred, jnp.bool_)
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o).astype(n.dtype), new, old)
