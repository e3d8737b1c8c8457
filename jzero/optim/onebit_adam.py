"""1-bit Adam (Tang et al. 2021, arXiv:2102.02888; DeepSpeed `runtime/fp16/onebit/adam.py`) as an optax transform.

Adam's variance becomes nearly constant after a warm-up; once it is frozen, the update is linear in the
momentum, so ranks can average their momenta instead of their gradients, and an average of 1-bit
(sign + scale) momenta with error feedback converges like the exact one. Hence two stages:

  warm-up (count < freeze_step): exact mean of the gradients over `data` (a psum of fp32), plain Adam.
  compression (count >= freeze_step): variance frozen; each rank folds its LOCAL gradient into the
      momentum, then the momenta are averaged by `comm.compressed_allreduce` (1 bit per element + scales,
      error feedback per rank); every rank ends with the same momentum and the same update.

How it runs: `update(grads, state, params)` is called inside `jax.shard_map` that is manual over
`axis_name` (`axis_names={axis_name}`), with grads = this rank's LOCAL gradients (not averaged: the
optimizer averages them itself, exactly in warm-up, compressed afterwards). params/mu/nu/count are the same
on every rank (in_specs P()), the error buffers differ per rank and are stored [data_size, ...] sharded over
`axis_name` (see `jzero.optim.onebit.onebit_state_specs`). The returned updates are the same on every rank.

Per tensor means per layer: as DeepSpeed compresses each parameter tensor with its own scales, a leaf stacked over
layers (``stacked_axes``, as the engine passes it for a scanned model) is one tensor per layer in the compressed
all-reduce: each layer is padded, scaled (worker and server) and chunked over the ranks on its own, so a scanned and
an unrolled model take the same steps (`comm.FlatLayout`; all layers still share the same four collectives).

Phases: phase='auto' picks the stage each step with `lax.cond` on the count (one program holding both);
'warmup' / 'compressed' build a program with one stage only, so the engine can compile two step functions
and switch at freeze_step (and so the compression stage's HLO can be checked on its own).

Differences from DeepSpeed, on purpose: bias_correction=True applies Adam's bias correction (DeepSpeed
accepts the flag but never applies it; pass False for its numbers), with the variance's correction frozen
at freeze_step; there is no "initialization step" that updates the moments but not the params; with one
data-parallel rank there is nothing to compress and the variance is not frozen: the transform is then
exactly optax.adamw(learning_rate, b1, b2, eps, weight_decay) (optax.adam when weight_decay=0).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jzero.optim.comm import FlatLayout, axis_size_checked, compressed_allreduce, local_row, to_varying

PHASES = ("auto", "warmup", "compressed")


class OneBitAdamState(NamedTuple):
    """count: int32[] steps taken. mu, nu: f32 trees like params, the same on every rank.
    worker_error: f32[data_size, S], server_error: f32[data_size, S / data_size]; row r belongs to rank r."""
    count: jax.Array
    mu: Any
    nu: Any
    worker_error: jax.Array
    server_error: jax.Array

    per_rank_fields = ("worker_error", "server_error")


def lr_at(learning_rate, count):
    """A float or an optax schedule evaluated at the 0-based step count."""
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate, jnp.float32)


def beta_at(beta, count):
    """A beta (float, used as is) or a schedule ``count -> beta`` evaluated at the 0-based step count.

    DeepSpeed's OneCycle (``cycle_momentum``) rewrites ``param_group['betas']`` after every step and the 1-bit
    optimizers read the current betas in each ``step()``: in the moment updates, in 1-bit LAMB's reconstructed
    gradient, and here also in the bias corrections (with the current beta, as FusedAdam/FusedLamb do)."""
    return beta(count) if callable(beta) else beta


def clip_tree_by_global_norm(tree, max_norm: float):
    """DeepSpeed's gradient_clipping: scale by min(1, max_norm / (||tree|| + 1e-6)); max_norm 0 = off.

    The 1-bit optimizers clip where DeepSpeed does: the averaged gradient while it is exact (warm-up,
    variance steps), each rank's local gradient when ranks no longer average gradients."""
    if not max_norm:
        return tree
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda x: x * scale, tree)


def error_buffers(params, data_size: int, fused: bool = False,
                  stacked_axes: Any = None) -> tuple[FlatLayout, jax.Array, jax.Array]:
    """The layout of the compressed buffer and zero worker/server errors [data_size, S] and [data_size, S/D].
    With data_size 1 nothing is compressed and the buffers are empty. stacked_axes: see `FlatLayout.of`."""
    layout = FlatLayout.of(params, data_size, fused, stacked_axes)
    total = layout.total if data_size > 1 else 0
    return layout, jnp.zeros((data_size, total), jnp.float32), jnp.zeros((data_size, total // data_size),
                                                                            jnp.float32)


def checked_layout(grads, n: int, stacked_axes: Any, worker_error: jax.Array, name: str) -> FlatLayout:
    """The per-tensor layout of grads (one tensor per layer of a stacked leaf), checked against the state's
    per-rank worker_error (local row): a state made by init with other stacked_axes has another length."""
    layout = FlatLayout.of(grads, n, stacked_axes=stacked_axes)
    want = layout.total if n > 1 else 0
    if worker_error.shape != (want,):
        raise ValueError(f"{name}: the state's worker_error has shape {worker_error.shape}, this transform's layout "
                         f"wants ({want},): build the state with init() of a transform of the same stacked_axes "
                         f"and data_size")
    return layout


def check_hyperparams(data_size: int, phase: str, gradient_clipping: float, **steps: int) -> None:
    """Reject values the algorithms cannot run with (the config layer names the config key)."""
    if not gradient_clipping >= 0:
        raise ValueError(f"gradient_clipping must be >= 0 (0 = off), got {gradient_clipping!r}")
    if not isinstance(data_size, int) or data_size < 1:
        raise ValueError(f"data_size must be an int >= 1, got {data_size!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for name, value in steps.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def onebit_adam(learning_rate, *, data_size: int, axis_name: str = "data", b1: Any = 0.9, b2: Any = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, freeze_step: int = 100000,
                bias_correction: bool = True, gradient_clipping: float = 0.0,
                phase: str = "auto", stacked_axes: Any = None) -> optax.GradientTransformation:
    """1-bit Adam; the updates include -learning_rate (apply with optax.apply_updates).

    data_size: size of `axis_name` (shapes the per-rank error buffers). weight_decay is decoupled as in
    DeepSpeed (update += weight_decay * param, then scaled by the learning rate). gradient_clipping: see
    `clip_tree_by_global_norm` (do not chain another clip in front: it would see local gradients in warm-up).
    stacked_axes: a pytree like the params of each leaf's leading layer-stacking dims
    (:func:`jzero.optim.layer_stacked_axes`; None: every leaf is one tensor): each layer of a stacked leaf is
    compressed as its own tensor (its own worker and server scales, its own chunking over the ranks), as
    DeepSpeed's per-parameter compressed_allreduce of an unrolled model. b1 / b2: floats, or schedules
    ``count -> beta`` (:func:`beta_at`: OneCycle's cycled momentum).
    """
    check_hyperparams(data_size, phase, gradient_clipping, freeze_step=freeze_step)

    def init(params):
        _, worker_error, server_error = error_buffers(params, data_size, stacked_axes=stacked_axes)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return OneBitAdamState(jnp.zeros([], jnp.int32), zeros, zeros, worker_error, server_error)

    def update(grads, state, params=None):
        if params is None and weight_decay:
            raise ValueError("onebit_adam with weight_decay needs params in update()")
        n = axis_size_checked(axis_name, data_size)
        errors = (local_row(state.worker_error), local_row(state.server_error))
        layout = checked_layout(grads, n, stacked_axes, errors[0], "onebit_adam")
        g = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
        t = state.count + 1
        b1_t, b2_t = beta_at(b1, state.count), beta_at(b2, state.count)

        def warmup(mu, nu, errors):
            g_avg = clip_tree_by_global_norm(jax.lax.pmean(g, axis_name), gradient_clipping)
            mu = jax.tree.map(lambda m, x: b1_t * m + (1 - b1_t) * x, mu, g_avg)
            nu = jax.tree.map(lambda v, x: b2_t * v + (1 - b2_t) * x * x, nu, g_avg)
            return mu, nu, to_varying(errors, axis_name), t

        def compressed(mu, nu, errors):
            g_local = clip_tree_by_global_norm(g, gradient_clipping)
            mu_local = jax.tree.map(lambda m, x: b1_t * m + (1 - b1_t) * x, mu, g_local)
            avg, worker_error, server_error = compressed_allreduce(layout.flatten(mu_local), *errors, axis_name,
                                                                   layout.segments)
            return layout.unflatten(avg), nu, to_varying((worker_error, server_error), axis_name), \
                jnp.asarray(freeze_step, jnp.int32)

        operands = (state.mu, state.nu, errors)
        if n == 1 or phase == "warmup":
            mu, nu, errors, nu_steps = warmup(*operands)
        elif phase == "compressed":
            mu, nu, errors, nu_steps = compressed(*operands)
        else:
            mu, nu, errors, nu_steps = jax.lax.cond(state.count < freeze_step, warmup, compressed, *operands)

        if bias_correction:
            mu_scale = 1 / (1 - b1_t ** t.astype(jnp.float32))
            nu_scale = 1 / (1 - b2_t ** nu_steps.astype(jnp.float32))
        else:
            mu_scale = nu_scale = 1.0
        lr = lr_at(learning_rate, state.count)

        def step(m, v, p):
            u = (m * mu_scale) / (jnp.sqrt(v * nu_scale) + eps)
            if weight_decay:
                u = u + weight_decay * p.astype(jnp.float32)
            return (-lr * u).astype(p.dtype)

        updates = jax.tree.map(step, mu, nu, params if params is not None else grads)
        new_state = OneBitAdamState(t, mu, nu, errors[0][None], errors[1][None])
        return updates, new_state

    return optax.GradientTransformation(init, update)
