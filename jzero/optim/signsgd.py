"""SignSGD / Signum with error feedback (EF-SignSGD, Karimireddy et al. 2019, arXiv:1901.09847) as an optax
transform whose only communication is the packed-bit compressed all-reduce of `jzero.optim.comm`.

Every step, on every data-parallel rank (inside `jax.shard_map`, manual over `axis_name`, LOCAL gradients):

    m_local = momentum * m + (1 - momentum) * clip(g_local)           # momentum 0: SignSGD, > 0: Signum
    m = compressed_allreduce(m_local)     # worker: EF + scaled sign (scale = ||x||_2 / sqrt(numel) per tensor),
                                          # 1 bit per element over the wire; server: the same on each chunk
    update = -lr * (m + weight_decay * param)

`m` is therefore a scaled sign per tensor and per server chunk (the compressor's output), the same on every rank;
what the 1-bit code dropped is kept in each rank's worker error and each chunk's server error and added back next
step, which is what makes a sign method converge like its uncompressed counterpart (EF-SignSGD's theorem; plain
sign without feedback does not). This is 1-bit Adam's compression stage (`onebit_adam.py`) with the variance
fixed at 1 and no exact warm-up: it compresses from the first step, so every step moves ~1/32 of an fp32
all-reduce. Because the scale is the RMS of the (momentum + error), the step has SGD's magnitude, not Adam's:
its learning rate is an SGD learning rate (EF-SignSGD's `lr * g` is compressed in the paper; here the momentum
is, and lr multiplies the result, which is the same up to the schedule changing between steps).

DeepSpeed has no SignSGD; its config shape is kept: `optimizer: {type: SignSGD, params: {lr, momentum,
weight_decay}}`, plus the 1-bit optimizers' compatibility keys (`jzero.optim.onebit`). With one data-parallel
rank the compressed all-reduce still runs (its collectives are over one rank): the method stays EF-SignSGD.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jzero.optim.comm import FlatLayout, axis_size_checked, compressed_allreduce, local_row, to_varying
from jzero.optim.onebit_adam import clip_tree_by_global_norm, lr_at


class SignSGDState(NamedTuple):
    """count: int32[] steps taken. mu: f32 tree like params (the last compressed momentum, the same on every
    rank). worker_error: f32[data_size, S], server_error: f32[data_size, S / data_size]; row r is rank r's."""
    count: jax.Array
    mu: Any
    worker_error: jax.Array
    server_error: jax.Array

    per_rank_fields = ("worker_error", "server_error")


def signsgd(learning_rate, *, data_size: int, axis_name: str = "data", momentum: float = 0.9,
            weight_decay: float = 0.0, gradient_clipping: float = 0.0,
            stacked_axes=None) -> optax.GradientTransformation:
    """EF-SignSGD (momentum 0) / EF-Signum (momentum in (0, 1)); updates include -learning_rate.

    data_size: the size of `axis_name` (shapes the per-rank error buffers). weight_decay: decoupled (added to the
    update, scaled by the lr). gradient_clipping: DeepSpeed's global-norm clip, applied to each rank's LOCAL
    gradient (ranks never see the exact average). stacked_axes: each leaf's leading layer-stacking dims (a pytree
    like the params; :func:`jzero.optim.layer_stacked_axes`): a stacked leaf is compressed one layer at a time, each
    with its own scale, as the same model with its layers unrolled would be.
    """
    if not isinstance(data_size, int) or data_size < 1:
        raise ValueError(f"data_size must be an int >= 1, got {data_size!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not weight_decay >= 0 or not gradient_clipping >= 0:
        raise ValueError(f"weight_decay and gradient_clipping must be >= 0, got {weight_decay!r}, "
                         f"{gradient_clipping!r}")

    def init(params):
        layout = FlatLayout.of(params, data_size, stacked_axes=stacked_axes)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return SignSGDState(jnp.zeros([], jnp.int32), zeros, jnp.zeros((data_size, layout.total), jnp.float32),
                            jnp.zeros((data_size, layout.chunk), jnp.float32))

    def update(grads, state, params=None):
        if params is None and weight_decay:
            raise ValueError("signsgd with weight_decay needs params in update()")
        n = axis_size_checked(axis_name, data_size)
        layout = FlatLayout.of(grads, n, stacked_axes=stacked_axes)
        g = clip_tree_by_global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), grads), gradient_clipping)
        m_local = jax.tree.map(lambda m, x: momentum * m + (1 - momentum) * x, state.mu, g)
        avg, worker_error, server_error = compressed_allreduce(
            layout.flatten(m_local), local_row(state.worker_error), local_row(state.server_error), axis_name,
            layout.segments)
        mu = layout.unflatten(avg)
        lr = lr_at(learning_rate, state.count)

        def step(m, p):
            u = m + weight_decay * p.astype(jnp.float32) if weight_decay else m
            return (-lr * u).astype(p.dtype)

        updates = jax.tree.map(step, mu, params if params is not None else grads)
        worker_error, server_error = to_varying((worker_error, server_error), axis_name)
        return updates, SignSGDState(state.count + 1, mu, worker_error[None], server_error[None])

    return optax.GradientTransformation(init, update)
