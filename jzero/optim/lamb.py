"""DeepSpeed's LAMB (``FusedLamb``) and the Adam moments it shares with ``FusedAdam``, as optax transforms.

The formulas are those of DeepSpeed's CUDA kernels (``csrc/lamb/fused_lamb_cuda_kernel.cu`` and FusedAdam's
``multi_tensor_adam.cu``), per parameter tensor, step t = 1, 2, ...::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)          (both 1 when bias_correction is false)
    denom = sqrt(v_hat) + eps        (sqrt(v_hat + eps) with eps_inside_sqrt, FusedLamb's eps mode 0)
    u = m_hat / denom + weight_decay * w
    LAMB: coeff = clamp(||w|| / ||u||, min_coeff, max_coeff), or 1.0 when either norm is 0
          w <- w - lr * coeff * u

Bias correction divides m and v themselves (LAMB's Algorithm 2), as the current kernel does; older DeepSpeed
releases folded it into the step size, which the trust ratio then partly undid. Norms are per tensor and are
computed on the whole (global) array, so under ZeRO sharding XLA reduces them across shards.

``b1``/``b2`` may be schedules ``count -> beta``: DeepSpeed's OneCycle rewrites the optimizer's betas every
step and the kernel uses the current beta1 in both the moment update and ``1 - b1^t``; so does this.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Beta = float | Callable[[Any], Any]


class AdamMomentsState(NamedTuple):
    """``count``: updates applied so far (the kernel's step is count + 1); ``mu``/``nu``: first/second moments."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _at(beta: Beta, count):
    """beta for this step as a float32 scalar: the kernels take betas as C floats, so ``1 - beta`` is computed
    from the float32 beta (for 0.999 that differs from float32(0.001) by 1.3e-5 relative)."""
    return jnp.asarray(beta(count) if callable(beta) else beta, jnp.float32)


def _one_minus_pow(beta, t):
    """``1 - beta**t`` accurate to float32 rounding: ``1 - pow(0.999, 1)`` in float32 loses ~5 digits to
    cancellation (pow's last-ulp error is 6e-5 of the result); ``-expm1(t * log1p(beta - 1))`` does not, and
    matches the kernels' ``1 - std::pow(beta, step)`` computed in double from the float beta."""
    beta = jnp.asarray(beta, jnp.float32)
    return -jnp.expm1(t * jnp.log1p(beta - 1.0))


def scale_by_adam_moments(b1: Beta = 0.9, b2: Beta = 0.999, eps: float = 1e-8, *, bias_correction: bool = True,
                          eps_inside_sqrt: bool = False) -> optax.GradientTransformation:
    """Adam direction ``m_hat / denom`` exactly as DeepSpeed's fused kernels compute it (no lr, no decay).

    Unlike ``optax.scale_by_adam`` it can turn bias correction off (DeepSpeed's ``bias_correction: false``),
    puts eps inside the square root on request (FusedLamb's ``eps_inside_sqrt``) and takes scheduled betas.
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamMomentsState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        beta1, beta2 = _at(b1, state.count), _at(b2, state.count)
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, updates)
        count = optax.safe_increment(state.count)
        if bias_correction:
            t = count.astype(jnp.float32)
            bc1, bc2 = _one_minus_pow(beta1, t), _one_minus_pow(beta2, t)
        else:
            bc1 = bc2 = 1.0

        def direction(m, v):
            m_hat, v_hat = m / bc1, v / bc2
            denom = jnp.sqrt(v_hat + eps) if eps_inside_sqrt else jnp.sqrt(v_hat) + eps
            return (m_hat / denom).astype(m.dtype)

        return jax.tree.map(direction, mu, nu), AdamMomentsState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _norm(x) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def scale_by_lamb_trust_ratio(weight_decay: float = 0.0, min_coeff: float = 0.01,
                              max_coeff: float = 10.0) -> optax.GradientTransformation:
    """``u = direction + weight_decay * w`` scaled by FusedLamb's clamped per-tensor trust ratio ||w||/||u||.

    The ratio is 1.0 when ||w|| or ||u|| is zero (the kernel's ``if (reg_w != 0 && reg_u != 0)``); the clamp
    applies max then min, in the kernel's order.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("LAMB's trust ratio needs the parameters: call tx.update(grads, state, params)")

        def one(d, w):
            u = d + weight_decay * w if weight_decay else d
            w_norm, u_norm = _norm(w), _norm(u)
            ratio = jnp.maximum(jnp.minimum(w_norm / jnp.where(u_norm == 0, 1.0, u_norm), max_coeff), min_coeff)
            coeff = jnp.where((w_norm != 0) & (u_norm != 0), ratio, 1.0)
            return (coeff * u).astype(u.dtype)

        return jax.tree.map(one, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def lamb(learning_rate: float | Callable, b1: Beta = 0.9, b2: Beta = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, min_coeff: float = 0.01, max_coeff: float = 10.0, *,
         bias_correction: bool = True, eps_inside_sqrt: bool = False) -> optax.GradientTransformation:
    """DeepSpeed's FusedLamb with FusedLamb's defaults: ``w <- w - lr * coeff * (m_hat/denom + wd * w)``."""
    return optax.chain(
        scale_by_adam_moments(b1, b2, eps, bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt),
        scale_by_lamb_trust_ratio(weight_decay, min_coeff, max_coeff),
        optax.scale_by_learning_rate(learning_rate),
    )
