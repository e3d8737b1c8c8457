"""jzero.precision: the fp16 loss scaler against a plain-Python port of DeepSpeed's DynamicLossScaler.

Reference: deepspeedai/DeepSpeed ``deepspeed/runtime/fp16/loss_scaler.py::DynamicLossScaler.update_scale``
(cur_iter, last_overflow_iter, cur_hysteresis, scale_factor 2, raise_error_at_min_scale) and the engine's
``skipped_steps += 1`` on overflow (``deepspeed/runtime/engine.py::_take_model_step``). Extra anchors are the
sequences DeepSpeed's own ``tests/unit/runtime/half_precision/test_dynamic_loss_scale.py`` asserts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pydantic import ValidationError

from jzero.precision import (BF16Config, DataTypesConfig, FP16Config, all_finite, dtype_from_name,
                             dynamic_loss_scale, init_loss_scale, scale_loss, select_tree, skips_nonfinite_steps,
                             static_loss_scale, unscale_grads, update_loss_scale)


class RefDynamicLossScaler:
    """DeepSpeed's DynamicLossScaler.update_scale, line for line; ``raised`` marks where it would raise."""

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = 2.0, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.skipped_steps, self.raised = 0, False

    def update_scale(self, overflow):
        if overflow:
            self.skipped_steps += 1  # engine: the step is skipped
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    self.raised = True  # "Current loss scale already at minimum" (scale stays at min)
                else:
                    self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def replay_jax(state, overflows):
    """All updates in one compiled scan; per-step (scale, skipped, hysteresis, good_steps, stalled)."""

    def body(s, overflow):
        s = update_loss_scale(s, jnp.logical_not(overflow))
        return s, (s.scale, s.skipped_steps, s.hysteresis, s.good_steps, s.stalled_at_min_scale)

    _, out = jax.jit(lambda s, o: jax.lax.scan(body, s, o))(state, jnp.asarray(overflows, jnp.bool_))
    return [np.asarray(x) for x in out]


# overflow (1) / clean (0) script: isolated overflows, bursts, long clean runs (several windows), a run at min
PATTERN = ([0] * 5 + [1] + [0] * 3 + [1, 1] + [0] * 9 + [1, 0, 1, 0, 1] + [1] * 12 + [0] * 7 + [1, 1, 1]
           + [0] * 10 + [1, 0, 0, 1, 1, 0])


@pytest.mark.parametrize("delayed_shift", [1, 2, 3])
@pytest.mark.parametrize("consecutive", [False, True])
def test_dynamic_scaler_replays_deepspeed(delayed_shift, consecutive):
    args = dict(init_scale=2.0 ** 8, scale_window=4, min_scale=2.0, delayed_shift=delayed_shift,
                consecutive_hysteresis=consecutive)
    ref = RefDynamicLossScaler(**args)
    scales, skipped, hyst, good, stalled = replay_jax(dynamic_loss_scale(**args), PATTERN)
    for i, overflow in enumerate(PATTERN):
        ref.update_scale(bool(overflow))
        assert scales[i] == ref.cur_scale, f"step {i}: scale {scales[i]} != {ref.cur_scale}"
        assert skipped[i] == ref.skipped_steps, f"step {i}"
        assert hyst[i] == ref.cur_hysteresis, f"step {i}"
        assert good[i] == ref.cur_iter - ref.last_overflow_iter - 1, f"step {i}"
        assert bool(stalled[i]) == ref.raised, f"step {i}"
    assert ref.raised  # the script reaches min_scale with overflows left over
    assert len(set(scales.tolist())) >= 4  # and the scale really moved both ways


def test_deepspeed_unit_test_sequences():
    # test_some_overflow: power 8, window 2, hysteresis 1: [inf, nan] -> 2**6; 3 clean -> 2**7; [inf] -> 2**6
    cfg = FP16Config(enabled=True, initial_scale_power=8, loss_scale_window=2, hysteresis=1)
    scales, skipped, *_ = replay_jax(init_loss_scale(cfg), [1, 1, 0, 0, 0, 1])
    assert scales[1] == 2 ** 6 and scales[4] == 2 ** 7 and scales[5] == 2 ** 6 and skipped[-1] == 3
    # test_no_overflow: power 8, window 2, default hysteresis 2: doubles after every 2nd clean iteration
    cfg = FP16Config(enabled=True, initial_scale_power=8, loss_scale_window=2)
    scales, *_ = replay_jax(init_loss_scale(cfg), [0] * 10)
    expected, want = 2.0 ** 8, []
    for i in range(10):  # DeepSpeed: after step i assert cur_scale == expected; double when cur_iter % 2 == 0
        want.append(expected)
        if (i + 1) % 2 == 0:
            expected *= 2
    assert scales.tolist() == want
    # TestZeroStage0Hysteresis.test_hysteresis: hysteresis 3, four overflows -> [2**8, 2**8, 2**7, 2**6]
    scales, *_ = replay_jax(init_loss_scale(FP16Config(enabled=True, initial_scale_power=8, hysteresis=3)), [1] * 4)
    assert scales.tolist() == [2 ** 8, 2 ** 8, 2 ** 7, 2 ** 6]
    # test_consecutive_hysteresis: alternating overflow/clean with consecutive_hysteresis never lowers the scale
    cfg = FP16Config(enabled=True, initial_scale_power=8, hysteresis=2, consecutive_hysteresis=True)
    scales, *_ = replay_jax(init_loss_scale(cfg), [1, 0] * 4)
    assert scales[-1] == 2 ** 8


def test_static_scale_never_moves_but_overflows_are_skipped():
    scales, skipped, _, good, stalled = replay_jax(static_loss_scale(128.0), [0, 1, 1, 0, 0])
    assert scales.tolist() == [128.0] * 5 and skipped.tolist() == [0, 1, 2, 2, 2] and good[-1] == 2
    assert not stalled.any()
    assert float(init_loss_scale(FP16Config(enabled=True, loss_scale=64)).scale) == 64.0
    assert float(init_loss_scale(FP16Config()).scale) == 1.0 and not init_loss_scale(None).dynamic
    assert float(init_loss_scale(FP16Config(enabled=True)).scale) == 2.0 ** 16  # DeepSpeed default power 16


def test_scale_unscale_and_sharded_all_finite():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    state = dynamic_loss_scale(init_scale=2.0 ** 16)
    # fp16 loss times 2**16 would overflow fp16 (max 65504); scale_loss works in fp32
    assert float(scale_loss(jnp.float16(2.0), state)) == 2.0 ** 17
    grads = {"a": jax.device_put(jnp.arange(16, dtype=jnp.float32) * 2.0 ** 16, sharding), "b": jnp.ones(3)}

    @jax.jit
    def check(g):
        return all_finite(g), unscale_grads(g, state, dtype=jnp.bfloat16)

    ok, unscaled = check(grads)
    assert bool(ok) and unscaled["a"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(unscaled["a"], np.float32), np.arange(16))
    bad = jax.device_put(jnp.zeros(16).at[13].set(jnp.inf), sharding)  # inf on one shard only
    assert not bool(check({"a": bad, "b": jnp.ones(3)})[0])
    assert not bool(jax.jit(all_finite)({"a": jnp.zeros(16).at[2].set(jnp.nan)}))


def test_select_tree_keeps_old_on_skip():
    new, old = {"p": jnp.ones(3), "n": jnp.int32(5)}, {"p": jnp.zeros(3), "n": jnp.int32(4)}
    kept = jax.jit(select_tree)(jnp.bool_(False), new, old)
    taken = jax.jit(select_tree)(jnp.bool_(True), new, old)
    assert kept["p"].tolist() == [0, 0, 0] and int(kept["n"]) == 4
    assert taken["p"].tolist() == [1, 1, 1] and int(taken["n"]) == 5


def test_config_sections():
    fp16 = FP16Config()
    assert (fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
            fp16.consecutive_hysteresis, fp16.min_loss_scale) == (0.0, 16, 1000, 2, False, 1.0)
    for bad, match in [({"loss_scale": -1}, "fp16.loss_scale"), ({"loss_scale": True}, "fp16.loss_scale"),
                       ({"hysteresis": 0}, "hysteresis"), ({"min_loss_scale": 0}, "min_loss_scale"),
                       ({"fp16_master_weights_and_grads": True}, "fp32 master weights"),
                       ({"initial_scale_power": 200}, "initial_scale_power"), ({"loss_scale_windw": 5}, "extra")]:
        with pytest.raises(ValidationError, match=match):
            FP16Config(**bad)
    assert BF16Config(enabled=True, check_grad_overflow=True).check_grad_overflow
    for key in ("immediate_grad_update", "bf16_master_weights_and_grads", "bf16_optimizer_states"):
        with pytest.raises(ValidationError, match=f"bf16.{key}"):
            BF16Config(**{key: True})
    assert skips_nonfinite_steps(FP16Config(enabled=True), BF16Config())
    assert skips_nonfinite_steps(FP16Config(), BF16Config(enabled=True, check_grad_overflow=True))
    assert not skips_nonfinite_steps(FP16Config(), BF16Config(enabled=True))
    assert dtype_from_name(DataTypesConfig(grad_accum_dtype="bf16").grad_accum_dtype) == jnp.bfloat16
    assert dtype_from_name(DataTypesConfig().grad_accum_dtype) == jnp.float32
    with pytest.raises(ValidationError, match="grad_accum_dtype"):
        DataTypesConfig(grad_accum_dtype="fp8")
    with pytest.raises(ValidationError, match="data_types.param_dtype is not implemented"):
        DataTypesConfig(param_dtype="bf16")


@pytest.mark.parametrize("accum", [jnp.float32, jnp.float16])
def test_fp16_accumulator_overflows_no_sooner_than_deepspeeds(accum):
    """fp16 loss scaling with gradient accumulation in an fp16 accumulator (data_types.grad_accum_dtype=fp16):
    DeepSpeed divides each micro-batch loss by gradient_accumulation_steps before its backward, so the fp16
    accumulator holds the scaled MEAN. Here 4 micro-batches each give a scaled gradient 1.5 * 2**15 = 49152 (finite
    in fp16): DeepSpeed accumulates 4 x 12288 = 49152, applies the step (w = 1 - 0.1 * 1.5) and keeps the scale; a
    sum of the undivided ones (196608) overflowed, skipped the step and halved the scale."""
    import optax

    from jzero.step import TrainState, loss_grads, make_step, micro_batch_grads, optax_update

    loss_fn = lambda w, x: jnp.mean(w * x)  # noqa: E731
    tx = optax.sgd(0.1)
    step = jax.jit(make_step(loss_grads(loss_fn, micro_batch_grads(None, accum), fp16=True, check_finite=True),
                             optax_update(tx), optax.constant_schedule(0.1), skip_nonfinite=True))
    w = jnp.float32(1.0)
    state = TrainState(step=jnp.int32(0), params=w, opt_state=tx.init(w),
                       loss_scale=dynamic_loss_scale(init_scale=2.0 ** 15, delayed_shift=1))
    new, metrics = step(state, np.full((4, 2), 1.5, np.float32))
    assert int(metrics["skipped_steps"]) == 0 and float(new.loss_scale.scale) == 2.0 ** 15
    assert float(new.params) == pytest.approx(1.0 - 0.1 * 1.5, abs=1e-6)
