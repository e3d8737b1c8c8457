"""0/1 Adam (Lu et al. 2022, arXiv:2202.06009; DeepSpeed `runtime/fp16/onebit/zoadam.py`) as an optax transform.

0/1 Adam removes 1-bit Adam's full-precision warm-up: the variance is refreshed only on an exponentially
thinning set of steps, and after var_freeze_step ranks even skip synchronising for several steps.

  Stage 1 (count <= var_freeze_step), at 1-based step t:
    variance step (t % var_interval == 0): exact mean of the gradients (fp32 psum); update m and v.
    other steps: the LOCAL gradients are averaged by the 1-bit `compressed_allreduce`; update m only.
    Every var_update_scaler variance steps, var_interval doubles.
  Stage 2 (count > var_freeze_step): variance frozen. Each rank steps on its own with its LOCAL gradient,
    summing its parameter moves in u (momentum_accumulator) and the learning rates in lr_sum. Every
    local_interval steps the ranks sync: u * (sqrt(v) + eps) (an lr-weighted sum of momenta) is averaged by
    the 1-bit all-reduce, the momentum becomes -avg / lr_sum, and every rank moves from the last synced
    params by avg / (sqrt(v) + eps). Every local_step_scaler steps local_interval doubles, up to
    local_step_clipper. The error buffers are zeroed when stage 2 starts (they then hold errors of another
    quantity), as DeepSpeed does.

How it runs: as 1-bit Adam (see onebit_adam.py): `update(grads, state, params)` inside shard_map manual
over `axis_name`, grads = LOCAL gradients, all branches chosen by `lax.cond` on counters in the state.
Between syncs in stage 2 each rank's model is params + u (its own), while `params` (the same on every rank)
stay at the last synced value and the updates are zero; the engine must therefore take gradients at
`jzero.optim.onebit.local_params(params, state)` (which is params + u on this rank), and apply the updates
to params as usual. The momentum is kept as mu (synced, the same on every rank) + mu_delta (this rank's
drift since the last sync, zero in stage 1): the synced part keeps the updates and params provably the same
on every rank (shard_map's varying/invariant types), at the cost of one extra param-sized f32 buffer.

Differences from DeepSpeed, on purpose: bias_correction=True applies Adam's bias correction (momentum by
1 - b1^t, variance by 1 - b2^k with k the number of variance steps so far; DeepSpeed never applies it: pass
False for its numbers); no extra "initialization step"; with one data-parallel rank nothing is compressed,
no step is local and the variance is never frozen, so it is exactly optax.adamw (adam when weight_decay=0).
DeepSpeed's first step() call is that initialization: it applies no update but advances its step counter,
so for the same var_freeze_step DeepSpeed's schedule runs one real update ahead of ours; as functions of the
counter (1, 2, ... here) the variance, freeze and local-step schedules are DeepSpeed's. With
bias_correction=False every rank's model equals DeepSpeed's after every step (tests/test_onebit.py holds a
NumPy model of zoadam.py in DeepSpeed's order of operations, with gradients taken at each rank's own model).

Settings: DeepSpeed's defaults (var_update_scaler 16, local_step_scaler 32678, local_step_clipper 16) are made
for runs of ~10^5 steps. For short runs, benchmarks/onebit_convergence.py uses (for N steps, F = 0.15 N):
var_freeze_step F, var_update_scaler F + 2 (variance refreshed every step until the freeze),
local_step_scaler (N - F) // 2, local_step_clipper 2; for 200 steps that is 30 / 32 / 85 / 2, within 3% of
Adam's final loss on the embedded GPT (benchmarks/ONEBIT_NOTES.md has the other settings tried and why).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jzero.optim.comm import axis_size_checked, compressed_allreduce, local_row, to_varying
from jzero.optim.onebit_adam import beta_at, check_hyperparams, checked_layout, clip_tree_by_global_norm, \
    error_buffers, lr_at


class ZeroOneAdamState(NamedTuple):
    """count, var_interval, var_counter, var_steps, local_interval, local_counter: int32[] (same on all ranks);
    lr_sum: f32[]; mu, nu: f32 trees like params (same on all ranks); mu_delta, momentum_accumulator: f32 trees
    [data_size, *param.shape] (row r = rank r); worker_error f32[data_size, S], server_error [data_size, S/D]."""
    count: jax.Array
    mu: Any
    nu: Any
    mu_delta: Any
    momentum_accumulator: Any
    var_interval: jax.Array
    var_counter: jax.Array
    var_steps: jax.Array
    local_interval: jax.Array
    local_counter: jax.Array
    lr_sum: jax.Array
    worker_error: jax.Array
    server_error: jax.Array

    per_rank_fields = ("mu_delta", "momentum_accumulator", "worker_error", "server_error")


def _tmap(fn, *trees):
    return jax.tree.map(fn, *trees)


def zero_one_adam(learning_rate, *, data_size: int, axis_name: str = "data", b1: Any = 0.9, b2: Any = 0.999,
                  eps: float = 1e-8, weight_decay: float = 0.0, var_freeze_step: int = 100000,
                  var_update_scaler: int = 16, local_step_scaler: int = 32678, local_step_clipper: int = 16,
                  bias_correction: bool = True, gradient_clipping: float = 0.0,
                  stacked_axes: Any = None) -> optax.GradientTransformation:
    """0/1 Adam; the updates include -learning_rate. Parameter names and defaults are DeepSpeed's;
    gradient_clipping clips the exact average on variance steps and the local gradients otherwise.
    stacked_axes: each leaf's leading layer-stacking dims; each layer is compressed as its own tensor (see
    :func:`jzero.optim.onebit_adam.onebit_adam`). b1 / b2: floats or schedules ``count -> beta``
    (:func:`jzero.optim.onebit_adam.beta_at`)."""
    check_hyperparams(data_size, "auto", gradient_clipping, var_freeze_step=var_freeze_step,
                      var_update_scaler=var_update_scaler, local_step_scaler=local_step_scaler,
                      local_step_clipper=local_step_clipper)

    def init(params):
        _, worker_error, server_error = error_buffers(params, data_size, stacked_axes=stacked_axes)
        zeros = _tmap(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        rows = _tmap(lambda p: jnp.zeros((data_size,) + jnp.shape(p), jnp.float32), params)
        one, zero = jnp.ones([], jnp.int32), jnp.zeros([], jnp.int32)
        return ZeroOneAdamState(zero, zeros, zeros, rows, rows, one, zero, zero, one, zero,
                                jnp.zeros([], jnp.float32), worker_error, server_error)

    def update(grads, state, params):
        n = axis_size_checked(axis_name, data_size)
        layout = checked_layout(grads, n, stacked_axes, local_row(state.worker_error), "zero_one_adam")
        g = _tmap(lambda x: x.astype(jnp.float32), grads)
        p32 = _tmap(lambda p: p.astype(jnp.float32), params)
        t = state.count + 1
        lr = lr_at(learning_rate, state.count)
        b1_t, b2_t = beta_at(b1, state.count), beta_at(b2, state.count)
        mu_scale = (1 / (1 - b1_t ** t.astype(jnp.float32))) if bias_correction else 1.0

        def denominator(nu, var_steps):
            nu_scale = (1 / (1 - b2_t ** jnp.maximum(var_steps, 1).astype(jnp.float32))) if bias_correction else 1.0
            return _tmap(lambda v: jnp.sqrt(v * nu_scale) + eps, nu)

        def adam_updates(mu, denom):
            return _tmap(lambda m, d, p: -lr * ((m * mu_scale) / d + weight_decay * p), mu, denom, p32)

        # ---- stage 1: exact variance steps and 1-bit momentum steps
        def stage1(s):
            def exact(mu, nu, var_steps, errors):
                g_avg = clip_tree_by_global_norm(jax.lax.pmean(g, axis_name), gradient_clipping)
                mu = _tmap(lambda m, x: b1_t * m + (1 - b1_t) * x, mu, g_avg)
                nu = _tmap(lambda v, x: b2_t * v + (1 - b2_t) * x * x, nu, g_avg)
                return mu, nu, var_steps + 1, to_varying(errors, axis_name)

            def onebit(mu, nu, var_steps, errors):
                g_local = clip_tree_by_global_norm(g, gradient_clipping)
                avg, *errors = compressed_allreduce(layout.flatten(g_local), *errors, axis_name, layout.segments)
                mu = _tmap(lambda m, x: b1_t * m + (1 - b1_t) * x, mu, layout.unflatten(avg))
                return mu, nu, var_steps, to_varying(tuple(errors), axis_name)

            is_var_step = t % s["var_interval"] == 0
            if n == 1:
                mu, nu, var_steps, errors = exact(s["mu"], s["nu"], s["var_steps"], s["errors"])
            else:
                mu, nu, var_steps, errors = jax.lax.cond(is_var_step, exact, onebit, s["mu"], s["nu"],
                                                         s["var_steps"], s["errors"])
            var_counter = s["var_counter"] + is_var_step.astype(jnp.int32)
            full = var_counter == var_update_scaler
            out = dict(s, mu=mu, nu=nu, var_steps=var_steps, errors=errors,
                       var_counter=jnp.where(full, 0, var_counter),
                       var_interval=jnp.where(full, s["var_interval"] * 2, s["var_interval"]))
            return adam_updates(mu, denominator(nu, var_steps)), out

        # ---- stage 2: frozen variance, local steps, 1-bit sync every local_interval steps
        def stage2(s):
            first = state.count == var_freeze_step + 1
            errors = tuple(jnp.where(first, 0.0, e) for e in s["errors"])
            denom = denominator(s["nu"], s["var_steps"])
            m_local = _tmap(lambda m, dm, x: b1_t * (m + dm) + (1 - b1_t) * x, s["mu"], s["mu_delta"],
                            clip_tree_by_global_norm(g, gradient_clipping))
            move = adam_updates(m_local, denom)  # this rank's step, at its own params p + u
            move = _tmap(lambda mv, u: mv - lr * weight_decay * u, move, s["u"]) if weight_decay else move
            u = _tmap(lambda a, b: a + b, s["u"], move)
            lr_sum = s["lr_sum"] + lr

            def sync(mu, u, lr_sum, errors):
                w = _tmap(lambda a, d: a * d, u, denom)
                avg, *errors = compressed_allreduce(layout.flatten(w), *errors, axis_name, layout.segments)
                w_avg = layout.unflatten(avg)
                mu = _tmap(lambda a: jnp.where(lr_sum > 0, -a / lr_sum, 0.0) / mu_scale, w_avg)
                zeros = to_varying(_tmap(jnp.zeros_like, u), axis_name)
                updates = _tmap(lambda a, d: a / d, w_avg, denom)
                return updates, mu, zeros, zeros, jnp.zeros_like(lr_sum), to_varying(tuple(errors), axis_name)

            def local(mu, u, lr_sum, errors):
                delta = _tmap(lambda ml, m: ml - m, m_local, mu)
                return (_tmap(jnp.zeros_like, p32), mu, to_varying(delta, axis_name), to_varying(u, axis_name),
                        lr_sum, to_varying(errors, axis_name))

            updates, mu, mu_delta, u, lr_sum, errors = jax.lax.cond(
                t % s["local_interval"] == 0, sync, local, s["mu"], u, lr_sum, errors)
            local_counter = s["local_counter"] + 1
            full = local_counter == local_step_scaler
            out = dict(s, mu=mu, mu_delta=mu_delta, u=u, lr_sum=lr_sum, errors=errors,
                       local_counter=jnp.where(full, 0, local_counter),
                       local_interval=jnp.where(full, jnp.minimum(local_step_clipper, s["local_interval"] * 2),
                                                s["local_interval"]))
            return updates, out

        s = dict(mu=state.mu, nu=state.nu, var_interval=state.var_interval, var_counter=state.var_counter,
                 var_steps=state.var_steps, local_interval=state.local_interval, local_counter=state.local_counter,
                 lr_sum=state.lr_sum, mu_delta=_tmap(local_row, state.mu_delta),
                 u=_tmap(local_row, state.momentum_accumulator),
                 errors=(local_row(state.worker_error), local_row(state.server_error)))
        if n == 1:
            updates, s = stage1(s)
        else:
            updates, s = jax.lax.cond(state.count > var_freeze_step, stage2, stage1, s)
        updates = _tmap(lambda x, p: x.astype(p.dtype), updates, params)
        rows = lambda tree: _tmap(lambda x: x[None], tree)  # noqa: E731
        new_state = ZeroOneAdamState(t, s["mu"], s["nu"], rows(s["mu_delta"]), rows(s["u"]), s["var_interval"],
                                     s["var_counter"], s["var_steps"], s["local_interval"], s["local_counter"],
                                     s["lr_sum"], s["errors"][0][None], s["errors"][1][None])
        return updates, new_state

    return optax.GradientTransformation(init, update)
