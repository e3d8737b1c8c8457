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

A "tensor" is one layer's weight, as in DeepSpeed's per-layer modules: a leaf of a scanned model stacks
``n_layer`` of them on a leading ``'layers'`` axis (``model.scan_layers``, the pipeline's storage too), and the
trust ratio of that leaf is one per layer (norms over all but the stacked axes, the ratio broadcast back), given
``stacked_axes``: a pytree like the params of each leaf's number of leading stacking axes
(:func:`layer_stacked_axes` reads it off the logical axis names; None = every leaf is one tensor).

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


#: Logical axis names of a leading dim that stacks whole layers (each index a separate DeepSpeed tensor): the
#: scanned stack's 'layers' (also the pipeline's storage layout) and a stage-major view's 'stage'.
LAYER_STACK_AXES = ("layers", "stage")


def layer_stacked_axes(param_names) -> Any:
    """Per leaf of ``param_names`` (a pytree of logical-name tuples, :func:`jzero.sharding.logical_names`), how
    many leading dims stack layers (names in :data:`LAYER_STACK_AXES`): 1 for ``('layers', 'embed', 'mlp')``,
    0 for ``('vocab', 'embed')``. What ``stacked_axes`` of the LAMB transforms takes."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731

    def lead(names):
        k = 0
        while k < len(names) and names[k] in LAYER_STACK_AXES:
            k += 1
        return k

    return jax.tree.map(lead, param_names, is_leaf=is_names)


def stacked_like(stacked_axes, tree) -> Any:
    """``stacked_axes`` (None: all 0) as a pytree of ints of ``tree``'s structure, checked against its ranks."""
    if stacked_axes is None:
        return jax.tree.map(lambda _: 0, tree)
    leaves, treedef = jax.tree.flatten(tree)
    ks = treedef.flatten_up_to(stacked_axes)
    for k, x in zip(ks, leaves):
        if not 0 <= int(k) <= jnp.ndim(x):
            raise ValueError(f"stacked_axes: {k} leading stacked axes for a leaf of shape {jnp.shape(x)}")
    return treedef.unflatten([int(k) for k in ks])


def tensor_norm(x, lead: int = 0) -> jax.Array:
    """fp32 L2 norm of each tensor of ``x``: over all its dims but the ``lead`` stacked ones (shape
    ``x.shape[:lead]``; a scalar when ``lead`` is 0)."""
    if lead == 0:
        return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(lead, x.ndim))))


def per_element(c, x) -> jax.Array:
    """A per-tensor quantity ``c`` (shape ``x.shape[:lead]``) broadcast against ``x`` (trailing dims of size 1)."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def scale_by_lamb_trust_ratio(weight_decay: float = 0.0, min_coeff: float = 0.01, max_coeff: float = 10.0,
                              stacked_axes: Any = None) -> optax.GradientTransformation:
    """``u = direction + weight_decay * w`` scaled by FusedLamb's clamped per-tensor trust ratio ||w||/||u||.

    The ratio is 1.0 when ||w|| or ||u|| is zero (the kernel's ``if (reg_w != 0 && reg_u != 0)``); the clamp
    applies max then min, in the kernel's order. ``stacked_axes`` (a pytree of ints like the params, or None):
    a leaf's leading stacked dims hold separate tensors (layers), each with its own ratio.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("LAMB's trust ratio needs the parameters: call tx.update(grads, state, params)")

        def one(d, w, lead):
            u = d + weight_decay * w if weight_decay else d
            w_norm, u_norm = tensor_norm(w, lead), tensor_norm(u, lead)
            ratio = jnp.maximum(jnp.minimum(w_norm / jnp.where(u_norm == 0, 1.0, u_norm), max_coeff), min_coeff)
            coeff = jnp.where((w_norm != 0) & (u_norm != 0), ratio, 1.0)
            return (per_element(coeff, u) * u).astype(u.dtype)

        return jax.tree.map(one, updates, params, stacked_like(stacked_axes, params)), state

    return optax.GradientTransformation(init_fn, update_fn)


def lamb(learning_rate: float | Callable, b1: Beta = 0.9, b2: Beta = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, min_coeff: float = 0.01, max_coeff: float = 10.0, *,
         bias_correction: bool = True, eps_inside_sqrt: bool = False,
         stacked_axes: Any = None) -> optax.GradientTransformation:
    """DeepSpeed's FusedLamb with FusedLamb's defaults: ``w <- w - lr * coeff * (m_hat/denom + wd * w)``
    (``stacked_axes``: see :func:`scale_by_lamb_trust_ratio`)."""
    return optax.chain(
        scale_by_adam_moments(b1, b2, eps, bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt),
        scale_by_lamb_trust_ratio(weight_decay, min_coeff, max_coeff, stacked_axes),
        optax.scale_by_learning_rate(learning_rate),
    )
