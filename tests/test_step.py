"""jzero.step: make_step's pieces against a hand-written step (NumPy), the fp16 skip, and the LR count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jzero.optim import applied_steps
from jzero.precision import dynamic_loss_scale, static_loss_scale
from jzero.step import (OnDevice, TrainState, accumulate_grads, loss_grads, lr_count, make_step, micro_batch_grads,
                        optax_update)

W0 = np.array([0.5, -1.0, 2.0], np.float32)
X = np.array([[[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]], [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]], np.float32)  # [A=2, B=2, 3]


def loss_fn(w, x_BxD):
    return jnp.mean(jnp.square(x_BxD @ w - 1.0))


def _state(ls, tx):
    params = jnp.asarray(W0)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), loss_scale=ls)


def _reference_grad(w):
    """d/dw of the mean over micro-batches of mean((x w - 1)^2), by hand."""
    g = np.zeros(3, np.float64)
    loss = 0.0
    for x in X:
        r = x @ w - 1.0
        loss += np.mean(r ** 2) / len(X)
        g += 2 * x.T @ r / len(r) / len(X)
    return loss, g


def _step(tx, *, fp16, skip, schedule):
    grads_fn = loss_grads(loss_fn, micro_batch_grads(None, jnp.float32), fp16=fp16, check_finite=skip)
    return jax.jit(make_step(grads_fn, optax_update(tx), schedule, skip_nonfinite=skip))


def test_make_step_equals_a_hand_written_sgd_step():
    sched = optax.linear_schedule(0.1, 0.0, 10)
    tx = optax.chain(optax.scale_by_learning_rate(sched))
    state, metrics = _step(tx, fp16=False, skip=False, schedule=sched)(_state(static_loss_scale(), tx), X)
    loss, g = _reference_grad(W0.astype(np.float64))
    np.testing.assert_allclose(state.params, W0 - 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(g), rtol=1e-6)
    assert float(metrics["lr"]) == np.float32(0.1) and int(state.step) == 1
    assert set(metrics) == {"loss", "grad_norm", "lr", "loss_scale", "skipped_steps"}


def test_fp16_scaled_step_unscales_and_an_overflow_skips_everything():
    sched = optax.constant_schedule(0.1)
    tx = optax.chain(optax.scale_by_learning_rate(sched))
    ls = dynamic_loss_scale(init_scale=2.0 ** 8, scale_window=1000, min_scale=1.0, delayed_shift=1)
    step = _step(tx, fp16=True, skip=True, schedule=sched)
    state, metrics = step(_state(ls, tx), X)
    _, g = _reference_grad(W0.astype(np.float64))
    np.testing.assert_allclose(state.params, W0 - 0.1 * g, rtol=1e-5)   # the x256 scale is undone exactly
    assert int(metrics["skipped_steps"]) == 0 and float(metrics["loss_scale"]) == 256.0
    bad = X.copy()
    bad[0, 0, 0] = np.inf
    after, metrics = step(state, bad)
    np.testing.assert_array_equal(after.params, state.params)           # the step left params untouched
    assert int(metrics["skipped_steps"]) == 1 and float(after.loss_scale.scale) == 128.0
    assert int(lr_count(after)) == 1 == int(applied_steps(after.opt_state))   # the LR did not advance either


def test_accumulate_grads_is_the_mean_over_micro_batches():
    loss, g = accumulate_grads(loss_fn, jnp.asarray(W0), jnp.asarray(X), None)
    want_loss, want_g = _reference_grad(W0.astype(np.float64))
    np.testing.assert_allclose(g, want_g, rtol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)


def test_on_device_strategy_round_trips_fp32_weights():
    tx = optax.sgd(0.1)
    strategy = OnDevice(tx, opt_shardings=None)
    state = _state(static_loss_scale(), tx)
    new = strategy.with_params(state, jnp.asarray(W0 * 2))
    np.testing.assert_array_equal(strategy.masters(new, None), W0 * 2)
    assert strategy.checkpoint_meta() is None and strategy.params_are_masters


def test_weight_copies_are_the_matrices_cast_and_keep_the_masters_gradient():
    """compute_copies: a bf16 copy of each weight matrix (two dims besides the stacked 'layers'), None for norm
    scales and biases, stacked or not; with_copies: the forward reads the copy, the gradient is the fp32
    master's, bit for bit the gradient of casting the master in the forward (what the model did before)."""
    from jzero.step import compute_copies, weight_matrices, with_copies

    names = {"w": ("embed", "mlp"), "stacked_w": ("layers", "embed", "mlp"), "scale": ("embed",),
             "stacked_scale": ("layers", "embed")}
    mask = weight_matrices(names)
    assert mask == {"w": True, "stacked_w": True, "scale": False, "stacked_scale": False}
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"w": jax.random.normal(k[0], (8, 4)), "stacked_w": jax.random.normal(k[1], (2, 8, 4)),
              "scale": 1 + jax.random.normal(k[2], (8,)), "stacked_scale": jax.random.normal(k[3], (2, 8))}
    copies = compute_copies(params, jnp.bfloat16, mask)
    assert copies["scale"] is None and copies["stacked_scale"] is None
    for name in ("w", "stacked_w"):
        assert copies[name].dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(copies[name]), np.asarray(params[name].astype(jnp.bfloat16)))
    x = jax.random.normal(k[4], (3, 8))

    def loss(p):   # as a model does: weights cast to bf16 at use, the scales used in fp32
        h = (x * p["scale"] * p["stacked_scale"][0]).astype(jnp.bfloat16)
        y = h @ p["w"].astype(jnp.bfloat16) + (h @ p["stacked_w"][1].astype(jnp.bfloat16))
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    g_cast = jax.jit(jax.grad(loss))(params)
    g_copy = jax.jit(jax.grad(lambda p: loss(with_copies(p, copies))))(params)
    assert jax.tree.map(lambda g: g.dtype, g_copy) == jax.tree.map(lambda g: g.dtype, params)
    for name in params:
        assert np.array_equal(np.asarray(g_copy[name]), np.asarray(g_cast[name])), name
    assert float(jax.jit(lambda p: loss(with_copies(p, copies)))(params)) == float(jax.jit(loss)(params))
