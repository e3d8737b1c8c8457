"""jzero.optim.build_optimizer against NumPy replays of DeepSpeed's optimizer steps.

References (deepspeedai/DeepSpeed):
* FusedAdam: ``deepspeed/ops/adam/fused_adam.py`` + ``csrc/adam/multi_tensor_adam.cu``. Mode 0 (adam_w_mode
  false, L2): g += decay*w, then m, v, w -= lr * m_hat/(sqrt(v_hat)+eps). Mode 1 (AdamW):
  w -= lr * (m_hat/(sqrt(v_hat)+eps) + decay*w). m_hat = m/(1-b1^t), v_hat = v/(1-b2^t).
* Engine optimizer choice: ``deepspeed/runtime/engine.py::_configure_basic_optimizer`` -- type names lower-cased
  (``config.py``: ``optimizer_name.lower() in DEEPSPEED_OPTIMIZERS``); ``AdamW`` forces adam_w_mode; ``torch_adam``
  picks torch.optim.Adam/AdamW (AdamW's default weight_decay 0.01).
  The kernels receive lr/betas/eps as C ``float``, so the replay rounds the betas to float32 first (1 - b2^t is
  sensitive to that rounding: 1e-5 relative for b2 = 0.999 at t = 1).
* Gradient clipping: ``deepspeed/runtime/utils.py::clip_grad_norm_``: coef = max_norm / (total_norm + 1e-6),
  clamped to 1, total_norm over all gradients.
* OneCycle momentum: ``lr_schedules.py::OneCycle`` writes ``betas = (momentum, 0.99)``.
* Skipped steps: ``engine.py::_take_model_step`` calls ``lr_scheduler.step()`` only when the step was applied.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jzero.errors import ConfigError
from jzero.optim import applied_steps, build_optimizer, clip_by_global_norm, learning_rate_at

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(4, 3)).astype(np.float32), "b": RNG.normal(size=(3,)).astype(np.float32)}
GRADS = [{k: (RNG.normal(size=v.shape) * s).astype(np.float32) for k, v in PARAMS.items()} for s in (3.0, 0.1, 1.0, 5.0)]


def ref_adam(lrs, betas, eps, decay, adam_w_mode, clip=0.0, grads=GRADS):
    """FusedAdam, one param group, after DeepSpeed's gradient clipping; lrs/betas per step."""
    w = {k: v.astype(np.float64) for k, v in PARAMS.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v_ = {k: np.zeros_like(v) for k, v in w.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        if clip > 0:
            norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
            coef = min(1.0, clip / (norm + 1e-6))
            g = {k: x * coef for k, x in g.items()}
        b1, b2 = (float(np.float32(b)) for b in betas[t - 1])  # the kernel takes betas as C floats
        for k in w:
            gk = g[k] + decay * w[k] if not adam_w_mode else g[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v_[k] = b2 * v_[k] + (1 - b2) * gk * gk
            upd = (m[k] / (1 - b1 ** t)) / (np.sqrt(v_[k] / (1 - b2 ** t)) + eps)
            if adam_w_mode:
                upd = upd + decay * w[k]
            w[k] = w[k] - lrs[t - 1] * upd
    return w


def run(tx, grads=GRADS, skip=()):
    """Apply ``grads`` in order; steps listed in ``skip`` get NaN gradients and keep the old params/state,
    the way an engine skips an overflowed step (no Python-side counter anywhere)."""
    p = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, new_state = tx.update(g, state, p)
        new_p = optax.apply_updates(p, updates)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), (new_p, new_state), (p, state))

    for i, g in enumerate(grads):
        g = jax.tree.map(jnp.asarray, g)
        if i in skip:
            g = jax.tree.map(lambda x: x * jnp.nan, g)
        p, state = step(p, state, g)
    return p, state


def assert_close(got, want):
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-6, atol=1e-7, err_msg=k)


WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 3,
                                         "warmup_type": "linear"}}
WARMUP_LRS = [0.0, 0.0, 0.01 / 3, 0.02 / 3]  # DeepSpeed WarmupLR at last_batch_iteration -1, 0, 1, 2


@pytest.mark.parametrize("type_, params, adam_w_mode", [
    ("Adam", {"weight_decay": 0.1}, True),  # FusedAdam default adam_w_mode=True
    ("Adam", {"weight_decay": 0.1, "adam_w_mode": False}, False),  # L2 added to the gradient
    ("AdamW", {"weight_decay": 0.1, "adam_w_mode": False}, True),  # AdamW forces decoupled decay
    ("adam", {}, True),  # lower case accepted, no decay
])
def test_adam_modes_match_fused_adam(type_, params, adam_w_mode):
    betas, eps = (0.8, 0.99), 1e-6
    tx, schedule = build_optimizer({"type": type_, "params": {"lr": 0.5, "betas": list(betas), "eps": eps, **params}},
                                   WARMUP)
    got, state = run(tx)
    assert_close(got, ref_adam(WARMUP_LRS, [betas] * 4, eps, params.get("weight_decay", 0.0), adam_w_mode))
    assert int(applied_steps(state)) == 4
    assert learning_rate_at(schedule, applied_steps(state)) == pytest.approx(0.01, abs=1e-9)


def test_gradient_clipping_is_global_norm_with_deepspeed_epsilon():
    tx, _ = build_optimizer({"type": "Adam", "params": {"lr": 0.1, "eps": 1e-3}}, None, gradient_clipping=1.5)
    got, _ = run(tx)
    assert_close(got, ref_adam([0.1] * 4, [(0.9, 0.999)] * 4, 1e-3, 0.0, True, clip=1.5))
    # and the clip transform alone: coef = max_norm / (norm + 1e-6), never above 1
    g = {"a": jnp.array([3.0, 4.0])}
    out, _ = clip_by_global_norm(2.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(np.asarray(out["a"]), np.array([3.0, 4.0]) * 2.0 / (5.0 + 1e-6), rtol=1e-7)
    out, _ = clip_by_global_norm(10.0).update(g, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(out["a"]), [3.0, 4.0])


def test_skipped_steps_do_not_advance_the_schedule():
    tx, schedule = build_optimizer({"type": "AdamW", "params": {"lr": 0.5, "weight_decay": 0.01}}, WARMUP)
    grads = [GRADS[0], GRADS[1], GRADS[1], GRADS[2]]  # step 1 overflows and is skipped
    got, state = run(tx, grads, skip={1})
    assert int(applied_steps(state)) == 3
    # the applied steps used the LRs of DeepSpeed's applied steps 0, 1, 2
    assert_close(got, ref_adam(WARMUP_LRS[:3], [(0.9, 0.999)] * 3, 1e-8, 0.01, True, grads=[GRADS[0], GRADS[1],
                                                                                            GRADS[2]]))
    assert learning_rate_at(schedule, applied_steps(state)) == pytest.approx(0.02 / 3, abs=1e-9)


def test_one_cycle_cycles_beta1_and_forces_beta2():
    # OneCycle(cycle_first_step_size=2): steps 0..3 use (lr, beta1) = (.01,.8) [constructor], (.02,.85), (.03,.8),
    # (.02,.85); beta2 is 0.99 whatever optimizer.params.betas says.
    sched = {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.03, "cycle_first_step_size": 2,
                                            "cycle_min_mom": 0.8, "cycle_max_mom": 0.9}}
    tx, _ = build_optimizer({"type": "Adam", "params": {"lr": 1.0, "betas": [0.5, 0.5]}}, sched)
    got, _ = run(tx)
    betas = [(0.8, 0.99), (0.85, 0.99), (0.8, 0.99), (0.85, 0.99)]
    assert_close(got, ref_adam([0.01, 0.02, 0.03, 0.02], betas, 1e-8, 0.0, True))


def test_torch_adam_uses_torch_adamw_default_weight_decay():
    tx, _ = build_optimizer({"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}})
    got, _ = run(tx)
    assert_close(got, ref_adam([0.1] * 4, [(0.9, 0.999)] * 4, 1e-8, 0.01, True))


def test_lamb_type_is_case_insensitive_and_builds():
    tx, schedule = build_optimizer({"type": "LAMB", "params": {"lr": 0.01, "max_coeff": 5.0, "min_coeff": 0.1}})
    got, state = run(tx)
    assert int(applied_steps(state)) == 4 and learning_rate_at(schedule, 0) == pytest.approx(0.01)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(got))
    assert not np.allclose(np.asarray(got["w"]), PARAMS["w"])


@pytest.mark.parametrize("optimizer, scheduler, clip, match", [
    (None, None, 0.0, r"optimizer: missing"),
    ({"type": "SGD", "params": {}}, None, 0.0, r"optimizer.type='SGD'.*Adam, AdamW, Lamb, OneBitAdam, ZeroOneAdam, OneBitLamb, SignSGD \("),
    ({"type": "Adam", "params": {"lr": 0.1, "beta1": 0.9}}, None, 0.0, r"optimizer.params.beta1.*valid keys"),
    ({"type": "Adam", "params": {"amsgrad": True}}, None, 0.0, r"optimizer.params.amsgrad"),
    ({"type": "Adam", "params": {"max_grad_norm": 1.0}}, None, 0.0, r"optimizer.params.max_grad_norm.*gradient_clipping"),
    ({"type": "Lamb", "params": {"max_grad_norm": 1.0}}, None, 0.0, r"optimizer.params.max_grad_norm.*gradient_clipping"),
    ({"type": "Adam", "params": {"betas": [0.9]}}, None, 0.0, r"optimizer.params.betas"),
    ({"type": "Adam", "params": {"lr": "fast"}}, None, 0.0, r"optimizer.params.lr='fast'"),
    ({"type": "Adam", "params": {"adam_w_mode": 1}}, None, 0.0, r"optimizer.params.adam_w_mode=1"),
    ({"type": "Adam", "params": {"set_grad_none": False}}, None, 0.0, r"optimizer.params.set_grad_none"),
    ({"type": "Adam", "params": {"torch_adam": True, "bias_correction": False}}, None, 0.0,
     r"optimizer.params.bias_correction: torch.optim.Adam"),
    ({"type": "Adam", "params": {}, "fused": True}, None, 0.0, r"optimizer.fused: unknown key"),
    ({"type": "Adam", "params": {}}, {"type": "WarmupLR", "params": {"x": 1}}, 0.0, r"scheduler.params.x"),
    ({"type": "Adam", "params": {}}, None, -1.0, r"gradient_clipping=-1.0"),
])
def test_bad_optimizer_config_is_a_config_error(optimizer, scheduler, clip, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(optimizer, scheduler, clip)
