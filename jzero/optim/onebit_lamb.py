"""1-bit LAMB (Li et al. 2021, arXiv:2104.06069; DeepSpeed `runtime/fp16/onebit/lamb.py`) as an optax transform.

LAMB scales each tensor's Adam step by a trust ratio ||param|| / ||step||. Under compression the step
direction is noisy, so 1-bit LAMB freezes both the variance and (a running average of) the trust ratios:

  warm-up (count < freeze_step): exact mean of the gradients over `data`; LAMB with the trust ratio clipped
      to [min_coeff, max_coeff] (1 when a norm is zero); each tensor keeps an EMA of its ratio
      (lamb_coeff_freeze, rate coeff_beta, updated whenever the ratio is not exactly 1).
  compression (count >= freeze_step): variance frozen. At the first compression step each tensor gets a
      scaling coefficient = (mean over tensors of rms(m)) / rms(m_tensor), so that all momenta have similar
      magnitudes and ONE fused 1-bit compressed all-reduce (one scale for the whole model) serves them all.
      Each rank folds its LOCAL gradient into the momentum, scales, compresses/averages, unscales. A "fresh"
      variance is kept from gradients reconstructed out of successive momenta, (m - b1 m_prev) / (1 - b1),
      and the frozen trust ratio is multiplied by factor = max(denom_frozen / denom_fresh) (mixed with 1 by
      the weight-decay share of the step), clipped to [factor_min, factor_max] and to within
      factor_threshold of the previous step's factor.

Per tensor means per layer: a leaf stacked over layers (``stacked_axes``, as :func:`jzero.optim.lamb.
scale_by_lamb_trust_ratio` takes it) is one tensor per index of its leading stacked dims, as DeepSpeed's per-layer
params are. Its trust ratio, lamb_coeff_freeze, last_factor, scaling coefficient (each layer's rms in the mean
over tensors) and fresh-variance factor are per layer; those state fields have the shape ``leaf.shape[:lead]``, and
``update`` reads the stacking from them (a state made by ``init`` carries it).

How it runs, phases, and the data_size == 1 case: as 1-bit Adam (see onebit_adam.py); with one rank it is the
warm-up LAMB throughout, which equals optax.lamb when no trust ratio hits min_coeff/max_coeff.
bias_correction=True applies Adam's bias correction inside the step (DeepSpeed never does: pass False for
its numbers); the frozen variance keeps its correction at freeze_step, the fresh one is corrected by 1 - b2^t.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jzero.optim.comm import FlatLayout, axis_size_checked, compressed_allreduce, local_row, to_varying
from jzero.optim.lamb import per_element, stacked_like, tensor_norm
from jzero.optim.onebit_adam import beta_at, check_hyperparams, clip_tree_by_global_norm, error_buffers, lr_at


class OneBitLambState(NamedTuple):
    """count: int32[]. mu, nu, nu_fresh: f32 trees like params. lamb_coeff_freeze, last_factor, scaling_coeff:
    f32 per tensor (trees like params: f32[] per leaf, f32[leaf.shape[:lead]] for a leaf stacked over layers).
    All the same on every rank except worker_error f32[data_size, S] and server_error f32[data_size, S / data_size]
    (S: all tensors fused, padded once)."""
    count: jax.Array
    mu: Any
    nu: Any
    nu_fresh: Any
    lamb_coeff_freeze: Any
    last_factor: Any
    scaling_coeff: Any
    worker_error: jax.Array
    server_error: jax.Array

    per_rank_fields = ("worker_error", "server_error")


def onebit_lamb(learning_rate, *, data_size: int, axis_name: str = "data", b1: Any = 0.9, b2: Any = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, freeze_step: int = 100000, max_coeff: float = 10.0,
                min_coeff: float = 0.01, coeff_beta: float = 0.9, factor_max: float = 4.0, factor_min: float = 0.5,
                factor_threshold: float = 0.1, bias_correction: bool = True, gradient_clipping: float = 0.0,
                phase: str = "auto", stacked_axes: Any = None) -> optax.GradientTransformation:
    """1-bit LAMB; the updates include -learning_rate. Parameter names and defaults are DeepSpeed's;
    gradient_clipping clips the exact average in warm-up and the local gradients after. stacked_axes: a pytree
    like the params of each leaf's leading layer-stacking dims (None: every leaf is one tensor), used by init.
    b1 / b2: floats or schedules ``count -> beta`` (:func:`jzero.optim.onebit_adam.beta_at`)."""
    check_hyperparams(data_size, phase, gradient_clipping, freeze_step=freeze_step)

    def init(params):
        _, worker_error, server_error = error_buffers(params, data_size, fused=True)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        lead = stacked_like(stacked_axes, params)
        scalar = lambda v: jax.tree.map(  # noqa: E731
            lambda p, k: jnp.full(jnp.shape(p)[:k], v, jnp.float32), params, lead)
        return OneBitLambState(jnp.zeros([], jnp.int32), zeros, zeros, zeros, scalar(0.0), scalar(1.0),
                               scalar(1.0), worker_error, server_error)

    def update(grads, state, params):
        n = axis_size_checked(axis_name, data_size)
        layout = FlatLayout.of(grads, n, fused=True)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
        p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        t = state.count + 1
        lead = jax.tree.map(jnp.ndim, state.last_factor)   # per-tensor fields: shape leaf.shape[:lead]
        per_tensor_size = jax.tree.map(lambda p, k: math.prod(jnp.shape(p)[k:]), params, lead)
        lr = lr_at(learning_rate, state.count)
        b1_t, b2_t = beta_at(b1, state.count), beta_at(b2, state.count)
        t_f = t.astype(jnp.float32)
        mu_scale = (1 / (1 - b1_t ** t_f)) if bias_correction else 1.0

        def nu_scale(steps):
            return (1 / (1 - b2_t ** jnp.asarray(steps, jnp.float32))) if bias_correction else 1.0

        def warmup(s):
            g_avg = clip_tree_by_global_norm(jax.lax.pmean(g, axis_name), gradient_clipping)
            mu = jax.tree.map(lambda m, x: b1_t * m + (1 - b1_t) * x, s.mu, g_avg)
            nu = jax.tree.map(lambda v, x: b2_t * v + (1 - b2_t) * x * x, s.nu, g_avg)

            def per_tensor(m, v, p, lcf, k):
                u = (m * mu_scale) / (jnp.sqrt(v * nu_scale(t)) + eps) + weight_decay * p
                w_norm, u_norm = tensor_norm(p, k), tensor_norm(u, k)
                coeff = jnp.where((w_norm > 0) & (u_norm > 0),
                                  jnp.clip(w_norm / jnp.where(u_norm > 0, u_norm, 1.0), min_coeff, max_coeff), 1.0)
                lcf = jnp.where(coeff != 1.0, coeff_beta * lcf + (1 - coeff_beta) * coeff, lcf)
                return -lr * per_element(coeff, u) * u, lcf

            out = jax.tree.map(per_tensor, mu, nu, p32, s.lamb_coeff_freeze, lead)
            updates, lcf = _unzip(out, mu)
            return updates, s._replace(mu=mu, nu=nu, lamb_coeff_freeze=lcf,
                                       worker_error=to_varying(s.worker_error, axis_name),
                                       server_error=to_varying(s.server_error, axis_name))

        def compressed(s):
            first = state.count == freeze_step
            # equalise the momenta's magnitudes once, from the momentum at the end of warm-up: every tensor's
            # (each layer's, in a stacked leaf) rms, and their mean over all non-empty tensors
            rms = jax.tree.map(lambda m, k, size: tensor_norm(m, k) / math.sqrt(max(size, 1)), s.mu, lead,
                               per_tensor_size)
            kept = [r for r, size in zip(jax.tree.leaves(rms), jax.tree.leaves(per_tensor_size)) if size]
            united = sum(jnp.sum(r) if r.ndim else r for r in kept) / max(sum(r.size for r in kept), 1)
            scaling = jax.tree.map(lambda r, sc: jnp.where(first, jnp.where(r > 0, united / r, 1.0), sc),
                                   rms, s.scaling_coeff)
            nu_fresh = jax.tree.map(lambda vf, v: jnp.where(first, v, vf), s.nu_fresh, s.nu)

            m_local = jax.tree.map(lambda m, x, sc: (b1_t * m + (1 - b1_t) * x) * per_element(sc, m), s.mu,
                                   clip_tree_by_global_norm(g, gradient_clipping), scaling)
            avg, worker_error, server_error = compressed_allreduce(layout.flatten(m_local), s.worker_error,
                                                                   s.server_error, axis_name, layout.segments)
            mu = jax.tree.map(lambda m, sc: m / per_element(sc, m), layout.unflatten(avg), scaling)
            nu_fresh = jax.tree.map(
                lambda vf, m, m_prev: b2_t * vf + (1 - b2_t) * ((m - b1_t * m_prev) / (1 - b1_t)) ** 2,
                nu_fresh, mu, s.mu)

            def per_tensor(m, v, vf, p, lcf, last, k, size):
                denom = jnp.sqrt(v * nu_scale(freeze_step)) + eps
                prelim = (m * mu_scale) / denom
                u = prelim + weight_decay * p
                if size == 0:
                    return -lr * per_element(lcf, u) * per_element(last, u) * u, last
                factor = jnp.max(denom / (jnp.sqrt(vf * nu_scale(t)) + eps),
                                 axis=None if k == 0 else tuple(range(k, m.ndim)))
                if weight_decay:
                    u_norm = tensor_norm(u, k)
                    ratio = jnp.where(u_norm > 0, jnp.minimum(
                        1.0, tensor_norm(prelim, k) / jnp.where(u_norm > 0, u_norm, 1)), 1.0)
                    factor = factor * ratio + (1.0 - ratio)
                factor = jnp.clip(factor, factor_min, factor_max)
                factor = jnp.clip(factor, last * (1.0 - factor_threshold), last * (1.0 + factor_threshold))
                return -lr * per_element(lcf, u) * per_element(factor, u) * u, factor

            out = jax.tree.map(per_tensor, mu, s.nu, nu_fresh, p32, s.lamb_coeff_freeze, s.last_factor, lead,
                               per_tensor_size)
            updates, last = _unzip(out, mu)
            return updates, s._replace(mu=mu, nu_fresh=nu_fresh, last_factor=last, scaling_coeff=scaling,
                                       worker_error=to_varying(worker_error, axis_name),
                                       server_error=to_varying(server_error, axis_name))

        s = state._replace(worker_error=local_row(state.worker_error), server_error=local_row(state.server_error))
        if n == 1 or phase == "warmup":
            updates, s = warmup(s)
        elif phase == "compressed":
            updates, s = compressed(s)
        else:
            updates, s = jax.lax.cond(state.count < freeze_step, warmup, compressed, s)
        updates = jax.tree.map(lambda x, p: x.astype(p.dtype), updates, params)
        return updates, s._replace(count=t, worker_error=s.worker_error[None], server_error=s.server_error[None])

    return optax.GradientTransformation(init, update)


def _unzip(pairs_tree, like):
    """A tree of (a, b) pairs shaped like `like` -> (tree of a, tree of b)."""
    treedef = jax.tree.structure(like)
    pairs = treedef.flatten_up_to(pairs_tree)
    return treedef.unflatten([a for a, _ in pairs]), treedef.unflatten([b for _, b in pairs])
