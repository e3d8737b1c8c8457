"""Optimizers from DeepSpeed's ``optimizer: {type, params}`` and ``scheduler: {type, params}`` sections.

``build_optimizer`` returns an optax ``GradientTransformation`` and the LR schedule it reads:

    clip (gradient_clipping)  ->  [L2: + wd * w]  ->  Adam/LAMB direction  ->  [AdamW: + wd * w]  ->  * -lr(count)

Types, matched case-insensitively as DeepSpeed lower-cases its own optimizer names:

* ``Adam`` -- DeepSpeed's FusedAdam: ``adam_w_mode`` (default **true**) decouples weight decay (AdamW);
  false adds ``weight_decay * w`` to the gradient (torch Adam's L2). ``torch_adam: true`` selects torch's
  Adam/AdamW in DeepSpeed: same formulas, but torch's defaults (AdamW's weight_decay 0.01).
* ``AdamW`` -- the same, always decoupled (DeepSpeed forces adam_w_mode for this name).
* ``Lamb`` -- DeepSpeed's FusedLamb (:mod:`jzero.optim.lamb`).

Weight decay applies to every parameter, as DeepSpeed's single param group does. LAMB's trust ratio is per
tensor, and a leaf stacked over layers (``stacked_axes``, :func:`layer_stacked_axes` of the logical names) holds
one tensor per layer. Every step count lives in the optax state (the schedule's ``count`` advances once per
applied update), so an engine that skips a step by keeping the old optimizer state (fp16 overflow) also keeps
the schedule where it was, like DeepSpeed, which calls ``lr_scheduler.step()`` only after an applied step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jzero.errors import ConfigError
from jzero.optim.lamb import lamb, layer_stacked_axes, scale_by_adam_moments, scale_by_lamb_trust_ratio
from jzero.optim.schedules import (ONE_CYCLE_BETA2, VALID_SCHEDULES, Schedule, build_momentum_schedule,
                                   build_schedule)

__all__ = [
    "build_optimizer", "build_schedule", "learning_rate_at", "applied_steps", "clip_by_global_norm",
    "lamb", "layer_stacked_axes", "scale_by_adam_moments", "scale_by_lamb_trust_ratio", "VALID_OPTIMIZERS",
    "VALID_SCHEDULES",
]

_ADAM = {"lr": 1e-3, "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-8, "adam_w_mode": True,
         "weight_decay": 0.0, "amsgrad": False, "set_grad_none": True, "torch_adam": False}
_LAMB = {"lr": 1e-3, "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-8, "eps_inside_sqrt": False,
         "weight_decay": 0.0, "max_grad_norm": 0.0, "max_coeff": 10.0, "min_coeff": 0.01, "amsgrad": False}
_PARAMS = {"adam": _ADAM, "adamw": _ADAM, "lamb": _LAMB}
VALID_OPTIMIZERS = ("Adam", "AdamW", "Lamb")
_BOOLS = {"bias_correction", "adam_w_mode", "amsgrad", "set_grad_none", "torch_adam", "eps_inside_sqrt"}


def default_params(type_: str) -> dict[str, Any]:
    """DeepSpeed's defaults for ``optimizer.params`` of ``type_`` (Adam / AdamW / Lamb, any case): what a key left
    out of a ds_config's ``params`` means."""
    return dict(_PARAMS[type_.lower()])


def global_norm(tree) -> jax.Array:
    """fp32 L2 norm over every leaf of ``tree`` (16-bit leaves are upcast per leaf before squaring)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def clip_coefficient(norm: jax.Array, max_norm: float) -> jax.Array:
    """DeepSpeed's clip factor ``min(1, max_norm / (norm + 1e-6))``; 1 when ``max_norm`` is 0 (clipping off)."""
    if not max_norm:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, max_norm / (norm + 1e-6))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """DeepSpeed's ``gradient_clipping``: scale all gradients by ``min(1, max_norm / (||g|| + 1e-6))``.

    The global norm spans every leaf (``deepspeed.runtime.utils.clip_grad_norm_``, and the fp16 optimizers'
    ``clip = (norm + 1e-6) / max_norm`` divisor); the 1e-6 is DeepSpeed's, which optax's clip omits.
    """

    def update_fn(updates, state, params=None):
        del params
        coef = clip_coefficient(global_norm(updates), max_norm)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _number(key: str, value: Any, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ConfigError(f"optimizer.params.{key}={value!r}: must be a finite number >= {lo}")
    return float(value)


def _resolve(name: str, type_: str, params: dict | None) -> dict[str, Any]:
    spec = _PARAMS[name]
    params = dict(params or {})
    for key, value in params.items():
        if key not in spec:
            hint = ""
            if key == "max_grad_norm":
                hint = " (DeepSpeed does not support it as an optimizer parameter either: use top-level " \
                       "gradient_clipping)"
            raise ConfigError(f"optimizer.params.{key}: not a parameter of DeepSpeed's {type_}{hint}; "
                              f"valid keys: {', '.join(spec)}")
        if key in _BOOLS and not isinstance(value, bool):
            raise ConfigError(f"optimizer.params.{key}={value!r}: must be true or false")
    p = {**spec, **params}
    betas = p["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.params.betas={betas!r}: must be [beta1, beta2], each in [0, 1)")
    p["betas"] = (float(betas[0]), float(betas[1]))
    for key in ("lr", "eps", "weight_decay"):
        p[key] = _number(key, p[key])
    if p["amsgrad"]:
        raise ConfigError(f"optimizer.params.amsgrad=true: DeepSpeed's Fused{type_.capitalize()} does not "
                          "support AMSGrad and jzero does not implement it; remove it")
    if name == "lamb":
        if _number("max_grad_norm", p["max_grad_norm"]) > 0:
            raise ConfigError("optimizer.params.max_grad_norm: DeepSpeed does not support it as an optimizer "
                              "parameter; set top-level gradient_clipping instead")
        p["max_coeff"], p["min_coeff"] = _number("max_coeff", p["max_coeff"]), _number("min_coeff", p["min_coeff"])
    else:
        if not p["set_grad_none"]:
            raise ConfigError("optimizer.params.set_grad_none=false: a PyTorch zero_grad detail (zero the .grad "
                              "tensors instead of freeing them); jzero keeps no gradients between steps; remove it")
        if p["torch_adam"]:
            for key in ("bias_correction", "set_grad_none"):
                if key in params:
                    raise ConfigError(f"optimizer.params.{key}: torch.optim.Adam (torch_adam: true) has no such "
                                      "parameter; remove it or drop torch_adam")
    return p


def build_optimizer(optimizer: dict | None, scheduler: dict | None = None, gradient_clipping: float = 0.0, *,
                    stacked_axes: Any = None) -> tuple[optax.GradientTransformation, Schedule]:
    """``(tx, lr_schedule)`` from DeepSpeed's ``optimizer`` and ``scheduler`` dicts ({"type", "params"}).

    ``gradient_clipping`` > 0 clips the global gradient norm first (0 = off). ``lr_schedule(count)`` is the LR
    of the update after ``count`` applied ones (see :func:`applied_steps`, :func:`learning_rate_at`).
    ``stacked_axes``: per param leaf, its leading layer-stacking dims (:func:`layer_stacked_axes`; None: none), so
    LAMB's trust ratio is per layer as in an unrolled model (Adam, element-wise, ignores it).
    """
    if not optimizer:
        raise ConfigError("optimizer: missing; give e.g. {\"type\": \"AdamW\", \"params\": {\"lr\": 3e-4}}")
    for section, d, allowed in (("optimizer", optimizer, ("type", "params")),
                                ("scheduler", scheduler or {}, ("type", "params"))):
        for key in d:
            if key not in allowed:
                raise ConfigError(f"{section}.{key}: unknown key; {section} takes only 'type' and 'params'")
    type_ = optimizer.get("type")
    if not isinstance(type_, str) or type_.lower() not in _PARAMS:
        from jzero.optim.onebit import ONEBIT_TYPES

        raise ConfigError(f"optimizer.type={type_!r}: jzero implements "
                          f"{', '.join(VALID_OPTIMIZERS + tuple(ONEBIT_TYPES.values()))} (case-insensitive, as DeepSpeed)")
    name = type_.lower()
    p = _resolve(name, type_, optimizer.get("params"))
    clip = 0.0 if gradient_clipping is None else gradient_clipping
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise ConfigError(f"gradient_clipping={gradient_clipping!r}: must be a number >= 0 (0 = no clipping)")

    sched_type = (scheduler or {}).get("type")
    sched_params = (scheduler or {}).get("params")
    schedule = build_schedule(sched_type, sched_params, p["lr"])
    b1, b2 = p["betas"]
    momentum = build_momentum_schedule(sched_type, sched_params)
    if momentum is not None:  # OneCycle with cycle_momentum: DeepSpeed sets betas = (momentum, 0.99)
        b1, b2 = momentum, ONE_CYCLE_BETA2

    wd = p["weight_decay"]
    parts = [clip_by_global_norm(clip)] if clip > 0 else []
    if name == "lamb":
        parts += [scale_by_adam_moments(b1, b2, p["eps"], bias_correction=p["bias_correction"],
                                        eps_inside_sqrt=p["eps_inside_sqrt"]),
                  scale_by_lamb_trust_ratio(wd, p["min_coeff"], p["max_coeff"], stacked_axes)]
    else:
        decoupled = name == "adamw" or p["adam_w_mode"]
        if p["torch_adam"] and decoupled and "weight_decay" not in (optimizer.get("params") or {}):
            wd = 0.01  # torch.optim.AdamW's default
        moments = scale_by_adam_moments(b1, b2, p["eps"], bias_correction=p["bias_correction"])
        decay = [optax.add_decayed_weights(wd)] if wd else []
        parts += ([moments] + decay) if decoupled else (decay + [moments])
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


def applied_steps(opt_state) -> jax.Array:
    """The schedule's count in an optimizer state from :func:`build_optimizer` (wrapped or not): the number
    of updates applied so far, which is DeepSpeed's ``lr_scheduler.last_batch_iteration + 1``."""
    from jzero.optim.onebit import _STATES as onebit_states   # 1-bit states count their applied updates

    is_sched = lambda x: isinstance(x, (optax.ScaleByScheduleState,) + onebit_states)  # noqa: E731
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
    if len(found) != 1:
        raise ValueError(f"expected one schedule state in the optimizer state, found {len(found)}")
    return found[0]


def learning_rate_at(schedule: Schedule, step) -> float:
    """The LR ``schedule`` gives the update after ``step`` applied ones, as a Python float (host side).

    ``learning_rate_at(schedule, applied_steps(opt_state))`` is what DeepSpeed's ``engine.get_lr()`` reports.
    """
    return float(schedule(jnp.asarray(step, jnp.int32)))


def resolved_params(optimizer) -> dict:
    """The parameters ``optimizer`` trains with: the given ones over DeepSpeed's defaults for its type
    (:func:`jzero.optim.default_params`), so that building the optimizer from them is building it from the given
    ones. Under ``torch_adam: true`` the defaults are torch's (no ``bias_correction`` / ``set_grad_none``; AdamW's
    ``weight_decay`` 0.01, as :func:`jzero.optim.build_optimizer`). Types other than Adam / AdamW / Lamb (the
    1-bit family, a misspelt type that the engine refuses) keep ``params`` as given."""
    name, given = optimizer.type.lower(), dict(optimizer.params)
    if name not in {t.lower() for t in VALID_OPTIMIZERS}:
        return given
    defaults = default_params(name)
    if name != "lamb" and given.get("torch_adam") is True:
        defaults = {k: v for k, v in defaults.items() if k not in ("bias_correction", "set_grad_none")}
        if name == "adamw" or given.get("adam_w_mode", defaults["adam_w_mode"]) is True:
            defaults["weight_decay"] = 0.01   # torch.optim.AdamW's default
    out = {**defaults, **given}
    if isinstance(out.get("betas"), tuple):
        out["betas"] = list(out["betas"])
    return out
