"""DeepSpeed's learning-rate schedulers (``deepspeed/runtime/lr_schedules.py``) as jit-safe optax schedules.

Each builder returns ``schedule(step) -> lr`` where ``step`` is the number of optimizer steps already *applied*
(optax's ``count``: 0 for the first update). ``schedule(k)`` is exactly the LR DeepSpeed uses for its
(k+1)-th applied step. DeepSpeed's convention, which this reproduces:

* the scheduler is built with ``last_batch_iteration = -1`` and its constructor writes the LR for the first step
  (``min_lr`` for WarmupLR/WarmupDecayLR/OneCycle/LRRangeTest, and **0.0** for WarmupCosineLR, whose
  ``get_lr()`` returns 0 before the schedule has started);
* the engine calls ``scheduler.step()`` only after an applied step (a step skipped for fp16 overflow does not
  advance it), which sets ``last_batch_iteration += 1`` and writes ``get_lr()`` for the next step.

So ``schedule(k) = get_lr()`` evaluated at ``last_batch_iteration = k - 1``, with the constructor's value at
``k = 0``. Keeping the count inside the optax state makes skipped steps not advance the schedule for free.

Parameter names and defaults are the scheduler classes' own (the engine builds them as
``Scheduler(optimizer, **scheduler.params)``), not the argparse defaults of ``add_tuning_arguments``.
Reference: deepspeedai/DeepSpeed ``deepspeed/runtime/lr_schedules.py`` (the version with OneCycle stair counts
and the clamped WarmupCosineLR progress).

OneCycle's momentum cycle (``cycle_momentum``, default true in DeepSpeed) is built by
:func:`build_momentum_schedule`; DeepSpeed writes ``betas = (momentum, 0.99)``, i.e. it also forces beta2 to
0.99, and :func:`jzero.optim.build_optimizer` does the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp

from jzero.errors import ConfigError

Schedule = Callable[[Any], Any]

_REQUIRED = object()

# name -> {param: default}; the defaults of each DeepSpeed scheduler class's __init__.
_PARAMS: dict[str, dict[str, Any]] = {
    "WarmupLR": {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": None,  # None = the optimizer's lr
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    },
    "WarmupDecayLR": {
        "total_num_steps": _REQUIRED,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.001,
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    },
    "WarmupCosineLR": {
        "total_num_steps": _REQUIRED,
        "warmup_min_ratio": 0.0,
        "warmup_num_steps": 1000,
        "cos_min_ratio": 0.0001,
        "warmup_type": "log",
    },
    "OneCycle": {
        "cycle_min_lr": _REQUIRED,
        "cycle_max_lr": _REQUIRED,
        "decay_lr_rate": 0.0,
        "cycle_first_step_size": 2000,
        "cycle_second_step_size": None,
        "cycle_first_stair_count": 0,
        "cycle_second_stair_count": None,
        "decay_step_size": 0,
        "cycle_momentum": True,
        "cycle_min_mom": 0.8,
        "cycle_max_mom": 0.9,
        "decay_mom_rate": 0.0,
    },
    "LRRangeTest": {
        "lr_range_test_min_lr": 1e-3,
        "lr_range_test_step_size": 2000,
        "lr_range_test_step_rate": 1.0,
        "lr_range_test_staircase": False,
    },
}

VALID_SCHEDULES = tuple(_PARAMS)

# Keys that must be non-negative whole numbers (positive where marked), floats, or bools.
_INT_KEYS = {"warmup_num_steps", "cycle_first_stair_count", "cycle_second_stair_count"}
# warmup_num_steps may be 0 (the HF integration's "auto" with no warm-up): DeepSpeed uses max(2, N) as jzero does
_POSITIVE_KEYS = {"cycle_first_step_size", "cycle_second_step_size", "lr_range_test_step_size"}
_BOOL_KEYS = {"cycle_momentum", "lr_range_test_staircase"}


# --------------------------------------------------------------------------- validation


def _resolve(name: str, params: dict | None) -> dict[str, Any]:
    """Defaults filled in, unknown/missing/mistyped keys rejected with ``scheduler.params.<key>`` named."""
    spec = _PARAMS[name]
    params = dict(params or {})
    # every DeepSpeed scheduler's constructor takes last_batch_iteration (default -1: a fresh schedule); a resumed
    # jzero run takes the schedule's position from the checkpoint's optimizer state instead
    last = params.pop("last_batch_iteration", -1)
    if last != -1 or isinstance(last, bool):
        raise ConfigError(f"scheduler.params.last_batch_iteration={last!r}: jzero starts every schedule at -1 (as "
                          "DeepSpeed's default) and resumes its position from the checkpoint; remove it or set -1")
    for key in params:
        if key not in spec:
            raise ConfigError(f"scheduler.params.{key}: not a parameter of DeepSpeed's {name}; "
                              f"valid keys: {', '.join(spec)}")
    out = {}
    for key, default in spec.items():
        value = params.get(key, default)
        if value is _REQUIRED:
            raise ConfigError(f"scheduler.params.{key}: required by {name}; add it to scheduler.params")
        if value is None and default is not None:
            raise ConfigError(f"scheduler.params.{key}: null is not allowed for {name}; give a number")
        out[key] = _check_value(name, key, value)
    return out


def _check_value(name: str, key: str, value: Any) -> Any:
    where = f"scheduler.params.{key}"
    if value is None:
        return None
    if key == "warmup_type":
        if value not in ("log", "linear"):
            raise ConfigError(f"{where}={value!r}: {name} warms up 'log' or 'linear'; use one of those")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r}: must be a finite number (one value: jzero has one param group)")
    if key in _INT_KEYS and value != int(value):
        raise ConfigError(f"{where}={value!r}: must be a whole number")
    if key in _POSITIVE_KEYS and value <= 0:
        raise ConfigError(f"{where}={value!r}: must be > 0")
    if key in _INT_KEYS and value < 0:
        raise ConfigError(f"{where}={value!r}: must be >= 0")
    return int(value) if key in _INT_KEYS else value


# --------------------------------------------------------------------------- schedules


def constant(lr: float) -> Schedule:
    """No scheduler: the optimizer's ``lr`` at every step."""

    def schedule(step):
        return jnp.full(jnp.shape(step), lr, jnp.float32)

    return schedule


def _warmup_gamma(last, warmup_num_steps: int, warmup_type: str):
    """WarmupLR._get_gamma during warm-up, for ``last >= 0``."""
    last = jnp.asarray(last, jnp.float32)
    if warmup_type == "log":
        return (1.0 / math.log(warmup_num_steps)) * jnp.log(last + 1.0)
    return last / warmup_num_steps


def warmup_lr(base_lr: float, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000, warmup_type="log",
              total_num_steps=None) -> Schedule:
    """WarmupLR (``total_num_steps=None``) and WarmupDecayLR (linear decay to 0 at ``total_num_steps``).

    gamma(last) = log(last+1)/log(N) or last/N while last < N (N = max(2, warmup_num_steps)), then 1 (WarmupLR)
    or max(0, (total - last) / max(1, total - N)) (WarmupDecayLR); lr = min + (max - min) * gamma.
    """
    max_lr = base_lr if warmup_max_lr is None else warmup_max_lr
    n = max(2, int(warmup_num_steps))
    delta = max_lr - warmup_min_lr

    def schedule(step):
        last = jnp.asarray(step, jnp.int32) - 1
        safe = jnp.maximum(last, 0)
        if total_num_steps is None:
            after = jnp.float32(1.0)
        else:
            after = jnp.maximum(0.0, (total_num_steps - safe.astype(jnp.float32)) / max(1.0, total_num_steps - n))
        gamma = jnp.where(safe < n, _warmup_gamma(safe, n, warmup_type), after)
        lr = warmup_min_lr + delta * gamma
        return jnp.where(last < 0, jnp.float32(warmup_min_lr), lr).astype(jnp.float32)

    return schedule


def warmup_cosine_lr(base_lr: float, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                     cos_min_ratio=0.0001, warmup_type="log") -> Schedule:
    """WarmupCosineLR: ``base_lr * ratio``; ratio warms from warmup_min_ratio to 1, then cosine to cos_min_ratio.

    DeepSpeed's first step runs at lr 0 (its get_lr() before start returns 0.0); the cosine progress is clamped
    to [0, 1] so the ratio rests at cos_min_ratio after total_num_steps.
    """
    n = max(2, int(warmup_num_steps))
    real_total = max(1, total_num_steps - n)

    def schedule(step):
        last = jnp.asarray(step, jnp.int32) - 1
        safe = jnp.maximum(last, 0)
        warm = warmup_min_ratio + _warmup_gamma(safe, n, warmup_type) * (1.0 - warmup_min_ratio)
        progress = jnp.minimum(1.0, (safe - n + 1).astype(jnp.float32) / real_total)
        cos = jnp.maximum(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0)
        ratio = jnp.where(safe < n, warm, cos)
        return jnp.where(last < 0, 0.0, base_lr * ratio).astype(jnp.float32)

    return schedule


def _one_cycle_scale(k, first: float, second: float, first_stairs: int, second_stairs: int):
    """OneCycle._get_scale_factor at batch_iteration ``k`` (= last_batch_iteration + 1).

    Computed from the position inside the cycle ``c = k mod (first + second)``: c/first rising, then
    (total - c)/second falling, which equals DeepSpeed's ``x / step_ratio`` and ``(x - 1)/(step_ratio - 1)``.
    A stair count > 0 floors the position to that many stairs, as DeepSpeed does from the integer offset.
    """
    total = first + second
    if total.is_integer():  # integer modulo: exact for any step count
        c = jnp.mod(jnp.asarray(k, jnp.int32), int(total)).astype(jnp.float32)
    else:
        c = jnp.mod(jnp.asarray(k, jnp.float32), total)
    rising = c <= first
    scale = jnp.where(rising, c / first, (total - c) / second)
    if first_stairs > 0:
        scale = jnp.where(rising, jnp.floor(c * first_stairs / first) / first_stairs, scale)
    if second_stairs > 0:
        scale = jnp.where(rising, scale, jnp.floor((total - c) * second_stairs / second) / second_stairs)
    return scale


def _one_cycle_shape(p: dict) -> tuple[float, float, int, int, float]:
    first = float(p["cycle_first_step_size"])
    second = first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"])
    first_stairs = p["cycle_first_stair_count"]
    second_stairs = first_stairs if p["cycle_second_stair_count"] is None else p["cycle_second_stair_count"]
    return first, second, first_stairs, second_stairs, first + second


def one_cycle(p: dict) -> Schedule:
    """OneCycle LR: min -> max over cycle_first_step_size, back over cycle_second_step_size, then decay.

    Decay (after the cycle): ``cycle_min_lr / (1 + decay_lr_rate * d / decay_step_size)`` with d = steps past the
    cycle; none (stays cycle_min_lr) when decay_step_size or decay_lr_rate is 0.
    """
    first, second, first_stairs, second_stairs, total = _one_cycle_shape(p)
    lo, hi = p["cycle_min_lr"], p["cycle_max_lr"]
    skip_decay = math.isclose(p["decay_step_size"], 0) or math.isclose(p["decay_lr_rate"], 0)

    def schedule(step):
        k = jnp.asarray(step, jnp.int32)
        cycle_lr = lo + (hi - lo) * _one_cycle_scale(k, first, second, first_stairs, second_stairs)
        if skip_decay:
            decay_lr = jnp.float32(lo)
        else:
            d = (k - total).astype(jnp.float32)
            decay_lr = lo / (1.0 + p["decay_lr_rate"] * d / p["decay_step_size"])
        return jnp.where(k - 1 < total, cycle_lr, decay_lr).astype(jnp.float32)

    return schedule


def one_cycle_momentum(p: dict) -> Schedule:
    """OneCycle beta1: max -> min -> max inversely to the LR, then ``cycle_max_mom * (1 + decay_mom_rate * d /
    decay_step_size)`` (no decay when decay_step_size or decay_mom_rate is 0).

    DeepSpeed's constructor sets betas to ``cycle_min_mom`` for the very first step (not the formula's
    cycle_max_mom); that is reproduced.
    """
    first, second, first_stairs, second_stairs, total = _one_cycle_shape(p)
    lo, hi = p["cycle_min_mom"], p["cycle_max_mom"]
    skip_decay = math.isclose(p["decay_step_size"], 0) or math.isclose(p["decay_mom_rate"], 0)

    def schedule(step):
        k = jnp.asarray(step, jnp.int32)
        cycle_mom = hi - (hi - lo) * _one_cycle_scale(k, first, second, first_stairs, second_stairs)
        if skip_decay:
            decay_mom = jnp.float32(hi)
        else:
            d = (k - total).astype(jnp.float32)
            decay_mom = hi * (1.0 + p["decay_mom_rate"] * d / p["decay_step_size"])
        mom = jnp.where(k - 1 < total, cycle_mom, decay_mom)
        return jnp.where(k == 0, jnp.float32(lo), mom).astype(jnp.float32)

    return schedule


def lr_range_test(lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000, lr_range_test_step_rate=1.0,
                  lr_range_test_staircase=False) -> Schedule:
    """LRRangeTest: ``min_lr * (1 + step_rate * interval)``, interval = k/step_size (floored if staircase)."""

    def schedule(step):
        k = jnp.asarray(step, jnp.int32)
        interval = k.astype(jnp.float32) / lr_range_test_step_size
        if lr_range_test_staircase:
            interval = jnp.floor(interval)
        return (lr_range_test_min_lr * (1.0 + lr_range_test_step_rate * interval)).astype(jnp.float32)

    return schedule


# --------------------------------------------------------------------------- entry points


def _check_type(name: str | None) -> None:
    if name is not None and name not in _PARAMS:
        raise ConfigError(f"scheduler.type={name!r}: not a DeepSpeed LR schedule jzero implements; "
                          f"use one of {', '.join(VALID_SCHEDULES)} (names are case-sensitive, as in DeepSpeed)")


def build_schedule(type: str | None, params: dict | None, base_lr: float) -> Schedule:
    """``schedule(step) -> lr`` for DeepSpeed's ``scheduler: {type, params}``; ``type=None``: constant base_lr.

    ``base_lr`` is ``optimizer.params.lr``; WarmupLR uses it when ``warmup_max_lr`` is absent and WarmupCosineLR
    multiplies its ratio by it, as DeepSpeed reads the optimizer's lr. The others set the LR outright.
    """
    _check_type(type)
    if type is None:
        if params:
            raise ConfigError("scheduler.params given without scheduler.type; add a type or remove params")
        return constant(base_lr)
    p = _resolve(type, params)
    if type == "WarmupLR":
        return warmup_lr(base_lr, p["warmup_min_lr"], p["warmup_max_lr"], p["warmup_num_steps"], p["warmup_type"])
    if type == "WarmupDecayLR":
        return warmup_lr(base_lr, p["warmup_min_lr"], p["warmup_max_lr"], p["warmup_num_steps"], p["warmup_type"],
                         total_num_steps=p["total_num_steps"])
    if type == "WarmupCosineLR":
        return warmup_cosine_lr(base_lr, p["total_num_steps"], p["warmup_min_ratio"], p["warmup_num_steps"],
                                p["cos_min_ratio"], p["warmup_type"])
    if type == "OneCycle":
        return one_cycle(p)
    return lr_range_test(**p)


def build_momentum_schedule(type: str | None, params: dict | None) -> Schedule | None:
    """beta1 schedule when the scheduler cycles momentum (OneCycle with ``cycle_momentum`` true), else None.

    When not None, DeepSpeed also sets beta2 to 0.99 for every step (``betas = (momentum, 0.99)``).
    """
    _check_type(type)
    if type != "OneCycle":
        return None
    p = _resolve(type, params)
    return one_cycle_momentum(p) if p["cycle_momentum"] else None


ONE_CYCLE_BETA2 = 0.99
"""beta2 DeepSpeed's OneCycle writes into the optimizer while it cycles momentum."""
