"""jzero.optim.schedules against a plain-Python replay of DeepSpeed's scheduler objects.

Reference: deepspeedai/DeepSpeed ``deepspeed/runtime/lr_schedules.py`` -- classes WarmupLR, WarmupDecayLR,
WarmupCosineLR, OneCycle, LRRangeTest (``get_lr``/``_get_gamma``/``get_lr_ratio``/``_get_scale_factor``/
``_get_cycle_lr``/``_get_decay_lr``/``_get_cycle_mom``/``_get_decay_mom``/``_continuous_interval``/
``_staircase_interval``), and the engine's convention: the constructor (``last_batch_iteration=-1``) sets the LR
of the first optimizer step, then ``scheduler.step()`` after each applied step sets the next one. The
replay below drives the formulas exactly that way; schedule(k) must equal the LR of DeepSpeed's step k.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.errors import ConfigError
from jzero.optim.schedules import build_momentum_schedule, build_schedule

BASE_LR = 0.02  # the optimizer's params.lr


# --------------------------------------------------------------------------- reference (DeepSpeed formulas)


def ref_warmup_gamma(last, n, kind):  # WarmupLR._get_gamma while last < warmup_num_steps
    return math.log(last + 1) / math.log(n) if kind == "log" else last / n


def ref_warmup_lr(last, p, base_lr, total=None):  # WarmupLR.get_lr / WarmupDecayLR._get_gamma
    lo = p.get("warmup_min_lr", 0.0)
    hi = p.get("warmup_max_lr", base_lr if total is None else 0.001)
    n = max(2, p.get("warmup_num_steps", 1000))
    if last < 0:
        return lo
    if last < n:
        gamma = ref_warmup_gamma(last, n, p.get("warmup_type", "log"))
    elif total is None:
        gamma = 1.0
    else:
        gamma = max(0.0, float(total - last) / float(max(1.0, total - n)))
    return lo + (hi - lo) * gamma


def ref_warmup_cosine_lr(last, p, base_lr):  # WarmupCosineLR.get_lr / get_lr_ratio
    if last < 0:
        return 0.0
    n = max(2, p.get("warmup_num_steps", 1000))
    wmin, cmin = p.get("warmup_min_ratio", 0.0), p.get("cos_min_ratio", 0.0001)
    if last < n:
        ratio = wmin + ref_warmup_gamma(last, n, p.get("warmup_type", "log")) * (1.0 - wmin)
    else:
        progress = min(1.0, (last - n + 1) / max(1, p["total_num_steps"] - n))
        ratio = max(0.0, cmin + (1.0 - cmin) * (1 + math.cos(math.pi * progress)) / 2)
    return base_lr * ratio


class RefOneCycle:
    """OneCycle's shape and its lr/mom formulas at last_batch_iteration, incl. the constructor's first step."""

    def __init__(self, p):
        self.p = p
        self.first = float(p.get("cycle_first_step_size", 2000))
        second = p.get("cycle_second_step_size")
        self.second = self.first if second is None else float(second)
        self.total = self.first + self.second
        self.ratio = self.first / self.total
        self.first_stairs = p.get("cycle_first_stair_count", 0)
        s2 = p.get("cycle_second_stair_count")
        self.second_stairs = self.first_stairs if s2 is None else s2
        dss = p.get("decay_step_size", 0)
        self.skip_lr = math.isclose(dss, 0) or math.isclose(p.get("decay_lr_rate", 0.0), 0)
        self.skip_mom = math.isclose(dss, 0) or math.isclose(p.get("decay_mom_rate", 0.0), 0)

    def scale(self, last):  # _get_scale_factor
        it = last + 1
        x = 1.0 + it / self.total - math.floor(1 + it / self.total)
        if x <= self.ratio:
            sf, stairs = x / self.ratio, self.first_stairs
        else:
            sf, stairs = (x - 1) / (self.ratio - 1), self.second_stairs
        if stairs > 0:
            ci = it % self.total
            pos = ci * stairs / self.first if ci <= self.first else (self.total - ci) * stairs / self.second
            sf = math.floor(pos) / stairs
        return sf

    def lr(self, last):
        lo, hi = self.p["cycle_min_lr"], self.p["cycle_max_lr"]
        if last < 0:
            return lo  # constructor: group['lr'] = cycle_min_lr
        if last < self.total:
            return lo + (hi - lo) * self.scale(last)
        if self.skip_lr:
            return lo
        d = last - self.total + 1
        return lo / (1 + self.p["decay_lr_rate"] * d / self.p["decay_step_size"])

    def mom(self, last):
        lo, hi = self.p.get("cycle_min_mom", 0.8), self.p.get("cycle_max_mom", 0.9)
        if last < 0:
            return lo  # constructor: group['betas'] = (cycle_min_mom, 0.99)
        if last < self.total:
            return hi - (hi - lo) * self.scale(last)
        if self.skip_mom:
            return hi
        d = last - self.total + 1
        return hi * (1 + self.p["decay_mom_rate"] * d / self.p["decay_step_size"])


def ref_range_test(last, p):  # LRRangeTest.get_lr (constructor: min_lr == the formula at last = -1)
    interval = (last + 1) / p.get("lr_range_test_step_size", 2000)
    if p.get("lr_range_test_staircase", False):
        interval = math.floor(interval)
    return p.get("lr_range_test_min_lr", 1e-3) * (1 + p.get("lr_range_test_step_rate", 1.0) * interval)


def replay(fn, n):
    """LR used by DeepSpeed for optimizer steps 0..n-1: constructor value, then one scheduler.step() each."""
    return np.array([fn(k - 1) for k in range(n)])


def check(schedule, expected):
    # a traced int32 scalar step, as optax calls it, mapped over 0..N-1 in one compiled call
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(len(expected), dtype=jnp.int32)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr(kind):
    p = {"warmup_min_lr": 0.001, "warmup_max_lr": 0.05, "warmup_num_steps": 7, "warmup_type": kind}
    check(build_schedule("WarmupLR", p, BASE_LR), replay(lambda last: ref_warmup_lr(last, p, BASE_LR), 15))


def test_warmup_lr_defaults_use_optimizer_lr():
    # warmup_max_lr absent -> the optimizer's lr; warmup_num_steps 1000, log warm-up, min 0
    expected = replay(lambda last: ref_warmup_lr(last, {}, BASE_LR), 1003)
    assert expected[1] == 0.0 and expected[-1] == BASE_LR
    check(build_schedule("WarmupLR", {}, BASE_LR), expected)


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_decay_lr(kind):
    p = {"total_num_steps": 20, "warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 6,
         "warmup_type": kind}
    expected = replay(lambda last: ref_warmup_lr(last, p, BASE_LR, total=20), 26)
    assert expected[-1] == 0.0  # decayed past total_num_steps
    check(build_schedule("WarmupDecayLR", p, BASE_LR), expected)


def test_warmup_decay_lr_default_max_is_not_optimizer_lr():
    p = {"total_num_steps": 10, "warmup_num_steps": 1}  # warmup_num_steps < 2 -> 2; warmup_max_lr 0.001
    expected = replay(lambda last: ref_warmup_lr(last, p, BASE_LR, total=10), 12)
    assert max(expected) == pytest.approx(0.001)
    check(build_schedule("WarmupDecayLR", p, BASE_LR), expected)
    # warmup_num_steps 0 (the HF integration's 'auto' without warm-up) is 2 as well; last_batch_iteration -1 is
    # every DeepSpeed scheduler's default
    p0 = {"total_num_steps": 10, "warmup_num_steps": 0, "last_batch_iteration": -1}
    check(build_schedule("WarmupDecayLR", p0, BASE_LR), expected)


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_cosine_lr(kind):
    p = {"total_num_steps": 16, "warmup_min_ratio": 0.1, "warmup_num_steps": 5, "cos_min_ratio": 0.05,
         "warmup_type": kind}
    expected = replay(lambda last: ref_warmup_cosine_lr(last, p, BASE_LR), 24)
    assert expected[0] == 0.0  # DeepSpeed's first step runs at lr 0
    assert expected[-1] == pytest.approx(0.05 * BASE_LR)  # clamped at the floor after total_num_steps
    check(build_schedule("WarmupCosineLR", p, BASE_LR), expected)


ONE_CYCLE_CASES = [
    # continuous, symmetric, decay of lr and momentum
    {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 4, "decay_lr_rate": 0.5,
     "decay_step_size": 2, "decay_mom_rate": 0.1},
    # asymmetric cycle with stairs in both halves, no decay (decay_step_size 0)
    {"cycle_min_lr": 0.002, "cycle_max_lr": 0.03, "cycle_first_step_size": 6, "cycle_second_step_size": 9,
     "cycle_first_stair_count": 3, "cycle_second_stair_count": 2, "decay_lr_rate": 0.3,
     "cycle_min_mom": 0.85, "cycle_max_mom": 0.95},
    # stairs in the first half only (second count 0), lr decays, momentum does not
    {"cycle_min_lr": 0.001, "cycle_max_lr": 0.005, "cycle_first_step_size": 5, "cycle_second_step_size": 3,
     "cycle_first_stair_count": 2, "cycle_second_stair_count": 0, "decay_lr_rate": 1.0, "decay_step_size": 3},
]


@pytest.mark.parametrize("p", ONE_CYCLE_CASES)
def test_one_cycle_lr_and_momentum(p):
    ref = RefOneCycle(p)
    n = int(ref.total) + 9
    check(build_schedule("OneCycle", p, BASE_LR), replay(ref.lr, n))
    check(build_momentum_schedule("OneCycle", p), replay(ref.mom, n))


def test_one_cycle_momentum_off_and_other_schedules_have_none():
    p = {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_momentum": False}
    assert build_momentum_schedule("OneCycle", p) is None
    assert build_momentum_schedule("WarmupLR", {}) is None
    assert build_momentum_schedule(None, None) is None


@pytest.mark.parametrize("staircase", [False, True])
def test_lr_range_test(staircase):
    p = {"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 3, "lr_range_test_step_rate": 0.5,
         "lr_range_test_staircase": staircase}
    check(build_schedule("LRRangeTest", p, BASE_LR), replay(lambda last: ref_range_test(last, p), 12))


def test_no_scheduler_is_constant_base_lr():
    check(build_schedule(None, None, BASE_LR), np.full(5, BASE_LR))


@pytest.mark.parametrize("type_, params, match", [
    ("Cosine", {}, r"scheduler.type='Cosine'.*WarmupLR"),
    ("warmuplr", {}, r"case-sensitive"),
    ("WarmupLR", {"warmup_steps": 10}, r"scheduler.params.warmup_steps.*valid keys: warmup_min_lr"),
    ("WarmupDecayLR", {}, r"scheduler.params.total_num_steps: required"),
    ("OneCycle", {"cycle_min_lr": 0.1}, r"scheduler.params.cycle_max_lr: required"),
    ("WarmupLR", {"warmup_type": "cosine"}, r"scheduler.params.warmup_type='cosine'"),
    ("WarmupLR", {"warmup_num_steps": -1}, r"scheduler.params.warmup_num_steps=-1: must be >= 0"),
    ("WarmupLR", {"last_batch_iteration": 5}, r"scheduler.params.last_batch_iteration=5: jzero starts every"),
    ("WarmupLR", {"warmup_min_lr": [0.1, 0.2]}, r"scheduler.params.warmup_min_lr=.*one param group"),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 0.2, "cycle_momentum": "yes"},
     r"scheduler.params.cycle_momentum"),
])
def test_bad_scheduler_config_is_a_config_error(type_, params, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(type_, params, BASE_LR)
