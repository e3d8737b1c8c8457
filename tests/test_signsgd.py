"""EF-SignSGD / Signum (jzero.optim.signsgd) against a NumPy model on 8 fake devices, by the compiled program's
collectives (packed bits only, from the first step) and from DeepSpeed-style config. (The engine path, via
jzero.optim.onebit, is run by benchmarks/onebit_convergence.py; no engine test here.)"""
import jax
import numpy as np
import optax
import pytest

from jzero.errors import ConfigError
from jzero.optim.comm import collective_bytes, collective_ops
from jzero.optim.onebit import build_onebit, communication_report
from jzero.optim.signsgd import signsgd
from helpers import BIG, N, PARAMS, _Car, _clip, _close, _compiled_update_hlo, _fp32_allreduce_hlo, _grads, \
    _mesh, _run


def ref_signsgd(grads_seq, lr, momentum, wd, clip=0.0, n=N, error_feedback=True):
    """EF-Signum in NumPy: each rank's local momentum, averaged by the NumPy compressed all-reduce
    (error_feedback=False: its error buffers zeroed before every step, i.e. plain scaled-sign compression)."""
    p = {k: v.copy() for k, v in PARAMS.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    car = _Car(p, n)
    for g in grads_seq:
        if not error_feedback:
            car.we, car.se = [np.zeros_like(e) for e in car.we], [np.zeros_like(e) for e in car.se]
        local = [_clip({k: g[k][r] for k in p}, clip) for r in range(n)]
        m = car([{k: momentum * m[k] + (1 - momentum) * local[r][k] for k in p} for r in range(n)])
        p = {k: p[k] - lr * (m[k] + wd * p[k]) for k in p}
    return p


@pytest.mark.parametrize("momentum,wd,clip", [(0.9, 0.01, 5.0), (0.0, 0.0, 0.0)], ids=["signum", "signsgd"])
def test_signsgd_matches_numpy_reference(momentum, wd, clip):
    grads = _grads(5)
    p, state, _ = _run(signsgd(0.05, data_size=N, momentum=momentum, weight_decay=wd, gradient_clipping=clip), grads)
    _close(p, ref_signsgd(grads, 0.05, momentum, wd, clip))
    assert int(state.count) == 5
    # error feedback is live: the worker errors are not zero, and differ between ranks
    we = np.asarray(state.worker_error)
    assert np.abs(we).max() > 1e-3 and not np.allclose(we[0], we[1])
    # and it changes the result: the same steps without feedback land elsewhere
    no_ef = ref_signsgd(grads, 0.05, momentum, wd, clip, error_feedback=False)
    assert not np.allclose(no_ef["w"], np.asarray(p["w"]), atol=1e-3)


def test_every_step_moves_packed_bits_only():
    hlo = _compiled_update_hlo(signsgd(1e-3, data_size=N), BIG)
    ops = collective_ops(hlo)
    assert not [o for o in ops if o["op"] == "all-reduce"], "no exact all-reduce, not even a warm-up one"
    assert any(o["op"] == "all-to-all" and o["dtypes"] == ["u8"] for o in ops)
    compressed, exact = collective_bytes(hlo)["total"], collective_bytes(_fp32_allreduce_hlo(BIG))["total"]
    numel = sum(x.size for x in BIG.values())
    # per rank: 1/8 byte per element out in the all-to-all and in the all-gather (7/8 of each leaves), + scales
    assert round(2 * 7 / 8 * numel / 8) <= compressed <= exact / 30, (compressed, exact)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in BIG.items()}
    r = communication_report("SignSGD", {}, shapes, _mesh(N))
    assert r["compression"] == compressed and r["fp32_allreduce"] == exact and "warmup" not in r


def test_build_from_deepspeed_params():
    grads = _grads(3)
    tx = build_onebit("signsgd", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01, "comm_backend_name": "nccl"},
                      data_size=N, gradient_clipping=5.0)
    p, _, _ = _run(tx, grads)
    _close(p, ref_signsgd(grads, 0.05, 0.5, 0.01, 5.0))
    p, _, _ = _run(build_onebit("SignSGD", {"momentum": 0.5}, optax.constant_schedule(0.05), data_size=N), grads)
    _close(p, ref_signsgd(grads, 0.05, 0.5, 0.0))


@pytest.mark.parametrize("params,match", [
    ({"betas": [0.9, 0.99]}, "optimizer.params.betas: unknown for SignSGD"),
    ({"freeze_step": 10}, "optimizer.params.freeze_step: unknown"),
    ({"momentum": 1.0}, r"optimizer.params.momentum: want a number in \[0, 1\)"),
    ({"momentum": -0.1}, "optimizer.params.momentum: want a number >= 0"),
])
def test_build_rejects_bad_params(params, match):
    with pytest.raises(ConfigError, match=match):
        build_onebit("SignSGD", params, data_size=N)
    with pytest.raises(ConfigError, match="no warm-up"):
        build_onebit("SignSGD", {}, data_size=N, phase="warmup")


def test_a_stacked_leaf_steps_as_its_unrolled_layers():
    """stacked_axes: a layer-stacked leaf is compressed one layer at a time (own scales, padding and chunks), so
    every rank's model equals the same run on the unrolled params; one scale for the whole leaf does not."""
    from helpers import unroll_layers

    scales = np.array([0.01, 1.0, 10.0], np.float32)[:, None, None]
    stacked = {"b": np.zeros((6,), np.float32),
               "w": np.random.default_rng(3).standard_normal((3, 4, 20)).astype(np.float32) * scales}
    grads = [dict(g, w=g["w"] * scales[None]) for g in _grads(4, seed=31, params=stacked)]
    grads_u = [unroll_layers(g, "w", axis=1) for g in grads]
    hp = dict(data_size=N, momentum=0.9, weight_decay=0.01)
    seen, _ = _run(signsgd(0.05, stacked_axes={"b": 0, "w": 1}, **hp), grads, params=stacked, history=True)
    want, _ = _run(signsgd(0.05, **hp), grads_u, params=unroll_layers(stacked, "w"), history=True)
    for (_, got), (_, ref) in zip(seen, want):   # each rank's own model after every step
        _close(unroll_layers(got, "w", axis=1), ref)
    whole, _ = _run(signsgd(0.05, **hp), grads, params=stacked, history=True)
    assert not np.allclose(whole[-1][0]["w"][0], want[-1][0]["w_0"], rtol=1e-2)
