"""1-bit Adam, 0/1 Adam and 1-bit LAMB: against NumPy models of DeepSpeed's algorithms on 8 fake devices, against
optax with one data-parallel rank, by the compiled program's collectives, and on a small regression."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jzero.errors import ConfigError
from jzero.optim.comm import collective_bytes, collective_ops, padded_size
from jzero.optim.onebit import build_onebit, local_params, onebit_state_specs
from jzero.optim.onebit_adam import onebit_adam
from jzero.optim.onebit_lamb import onebit_lamb
from jzero.optim.zero_one_adam import zero_one_adam
from helpers import BIG, N, PARAMS, _PARAMS, _Car, _clip, _close, _compiled_update_hlo, _fp32_allreduce_hlo, _grads, \
    _mesh, _run, unroll_layers

def _beta(b, c):
    """A reference's beta at 0-based step c: a float, or a per-step list (DeepSpeed's OneCycle betas)."""
    return b[c] if isinstance(b, (list, tuple)) else b


def ref_onebit_adam(grads_seq, lr, b1, b2, eps, wd, freeze_step, clip=0.0, n=N, params=None):
    p = {k: v.copy() for k, v in (PARAMS if params is None else params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    car = _Car(p, n)
    for c, g in enumerate(grads_seq):
        b1_c, b2_c = _beta(b1, c), _beta(b2, c)
        t = c + 1
        if c < freeze_step:
            ga = _clip({k: g[k].mean(0) for k in p}, clip)
            for k in p:
                m[k], v[k] = b1_c * m[k] + (1 - b1_c) * ga[k], b2_c * v[k] + (1 - b2_c) * ga[k] ** 2
            v_steps = t
        else:
            local = [_clip({k: g[k][r] for k in p}, clip) for r in range(n)]
            m = car([{k: b1_c * m[k] + (1 - b1_c) * local[r][k] for k in p} for r in range(n)])
            v_steps = freeze_step
        for k in p:
            p[k] = p[k] - lr * ((m[k] / (1 - b1_c ** t)) / (np.sqrt(v[k] / (1 - b2_c ** v_steps)) + eps) + wd * p[k])
    return p


def ref_zero_one_adam(grads_seq, lr, b1, b2, eps, wd, var_freeze_step, var_update_scaler, local_step_scaler,
                      local_step_clipper, clip=0.0, n=N):
    """DeepSpeed's zoadam.py step by step, with one params copy per rank (they differ between syncs)."""
    ps = [{k: v.copy() for k, v in PARAMS.items()} for _ in range(n)]
    ms = [{k: np.zeros_like(v) for k, v in PARAMS.items()} for _ in range(n)]
    us = [{k: np.zeros_like(v) for k, v in PARAMS.items()} for _ in range(n)]
    v = {k: np.zeros_like(x) for k, x in PARAMS.items()}
    var_interval, var_counter, var_steps, local_interval, local_counter, lrs = 1, 0, 0, 1, 0, 0.0
    car = _Car(PARAMS, n)
    for c, g in enumerate(grads_seq):
        b1_c, b2_c = _beta(b1, c), _beta(b2, c)
        t = c + 1
        frozen = c > var_freeze_step
        if frozen and c == var_freeze_step + 1:
            car = _Car(PARAMS, n)  # errors zeroed when local steps begin
        if not frozen:
            if t % var_interval == 0:
                ga = _clip({k: g[k].mean(0) for k in PARAMS}, clip)
                v = {k: b2_c * v[k] + (1 - b2_c) * ga[k] ** 2 for k in PARAMS}
                var_steps += 1
            else:
                ga = car([_clip({k: g[k][r] for k in PARAMS}, clip) for r in range(n)])
            ms = [{k: b1_c * m[k] + (1 - b1_c) * ga[k] for k in PARAMS} for m in ms]
        else:
            local = [_clip({k: g[k][r] for k in PARAMS}, clip) for r in range(n)]
            ms = [{k: b1_c * m[k] + (1 - b1_c) * local[r][k] for k in PARAMS} for r, m in enumerate(ms)]
            lrs += lr
        d = {k: np.sqrt(v[k] / (1 - b2_c ** var_steps)) + eps for k in PARAMS}
        for r in range(n):
            for k in PARAMS:
                step = lr * ((ms[r][k] / (1 - b1_c ** t)) / d[k] + wd * ps[r][k])
                ps[r][k] = ps[r][k] - step
                if frozen:
                    us[r][k] = us[r][k] - step
        if frozen and t % local_interval == 0:
            w = car([{k: us[r][k] * d[k] for k in PARAMS} for r in range(n)])
            for r in range(n):
                for k in PARAMS:
                    ps[r][k] = ps[r][k] - us[r][k] + w[k] / d[k]
                    ms[r][k] = -w[k] / lrs * (1 - b1_c ** t)
                    us[r][k] = np.zeros_like(us[r][k])
            lrs = 0.0
        if not frozen:
            if t % var_interval == 0:
                var_counter += 1
                if var_counter == var_update_scaler:
                    var_counter, var_interval = 0, var_interval * 2
        else:
            local_counter += 1
            if local_counter == local_step_scaler:
                local_counter, local_interval = 0, min(local_step_clipper, local_interval * 2)
    return ps, (var_interval, local_interval)


def ref_zero_one_adam_deepspeed_order(grads_seq, lr, b1, b2, eps, wd, var_freeze_step, var_update_scaler,
                                      local_step_scaler, local_step_clipper, n=N, params=None, steps=None):
    """DeepSpeed's ZeroOneAdam.step in its own order of operations and with its own state (bias_correction off,
    as DeepSpeed never applies it; no clipping; DeepSpeed's initialization call left out, so its step counter
    is t): freeze_key flips at the END of step t > var_freeze_step, the error buffers are zeroed then; in
    the frozen stage every rank moves its own params and adds the move to comm_buffer, and at a sync undoes
    the moves, all-reduces comm_buffer * (sqrt(v) + eps), sets exp_avg = -avg / lrs and moves by
    avg / (sqrt(v) + eps). Independent of ref_zero_one_adam (written from the DeepSpeed source, not from ours).
    grads_seq: per-step dicts of [n, ...] gradients, or a function (step, rank, that rank's params) -> gradient
    dict (then `steps` steps), for gradients taken where DeepSpeed takes them: at each rank's own p.data."""
    PARAMS = _PARAMS if params is None else params  # noqa: N806
    ps = [{k: np.array(v, np.float32) for k, v in PARAMS.items()} for _ in range(n)]
    exp_avg = [{k: np.zeros_like(v) for k, v in PARAMS.items()} for _ in range(n)]
    comm_buffer = [{k: np.zeros_like(v) for k, v in PARAMS.items()} for _ in range(n)]
    exp_avg_sq = {k: np.zeros_like(v) for k, v in PARAMS.items()}
    st = dict(var_interval=1, var_counter=0, local_step_interval=1, local_step_counter=0, lrs=0.0)
    freeze_key, reinitial_error_buffer = False, False
    car = _Car(PARAMS, n)
    if callable(grads_seq):
        grad_fn, grads_seq = grads_seq, range(steps)
    else:
        grad_fn = None
    for step, g in enumerate(grads_seq, start=1):
        if grad_fn is not None:
            per_rank = [grad_fn(step, r, ps[r]) for r in range(n)]
            g = {k: np.stack([x[k] for x in per_rank]) for k in PARAMS}
        if not freeze_key:
            if step % st["var_interval"] == 0:   # the engine all-reduced this step's gradients exactly
                grad = {k: g[k].mean(0) for k in PARAMS}
                exp_avg_sq = {k: b2 * exp_avg_sq[k] + (1 - b2) * grad[k] ** 2 for k in PARAMS}
            else:                                # local gradients, averaged by the 1-bit all-reduce
                grad = car([{k: g[k][r] for k in PARAMS} for r in range(n)])
            exp_avg = [{k: b1 * m[k] + (1 - b1) * grad[k] for k in PARAMS} for m in exp_avg]
        else:
            exp_avg = [{k: b1 * exp_avg[r][k] + (1 - b1) * g[k][r] for k in PARAMS} for r in range(n)]
            st["lrs"] += lr
        denom = {k: np.sqrt(exp_avg_sq[k]) + eps for k in PARAMS}
        for r in range(n):
            for k in PARAMS:
                update = exp_avg[r][k] / denom[k] + wd * ps[r][k]
                ps[r][k] = ps[r][k] - lr * update
                if freeze_key:
                    comm_buffer[r][k] = comm_buffer[r][k] - lr * update
        if freeze_key and step % st["local_step_interval"] == 0:
            for r in range(n):
                for k in PARAMS:
                    ps[r][k] = ps[r][k] - comm_buffer[r][k]
            avg = car([{k: comm_buffer[r][k] * denom[k] for k in PARAMS} for r in range(n)])
            for r in range(n):
                for k in PARAMS:
                    exp_avg[r][k] = -avg[k] / st["lrs"]
                    ps[r][k] = ps[r][k] + avg[k] / denom[k]
                    comm_buffer[r][k] = np.zeros_like(comm_buffer[r][k])
            st["lrs"] = 0.0
        if not freeze_key:
            if step % st["var_interval"] == 0:
                st["var_counter"] += 1
                if st["var_counter"] == var_update_scaler:
                    st["var_counter"], st["var_interval"] = 0, st["var_interval"] * 2
        else:
            st["local_step_counter"] += 1
            if st["local_step_counter"] == local_step_scaler:
                st["local_step_counter"] = 0
                st["local_step_interval"] = min(local_step_clipper, st["local_step_interval"] * 2)
        if step > var_freeze_step:
            freeze_key = True
        if freeze_key and not reinitial_error_buffer:
            car = _Car(PARAMS, n)
            reinitial_error_buffer = True
    return ps, (st["var_interval"], st["local_step_interval"])


def ref_onebit_lamb(grads_seq, lr, b1, b2, eps, wd, freeze_step, max_coeff, min_coeff, coeff_beta, factor_max,
                    factor_min, factor_threshold, clip=0.0, n=N, bias_correction=True, params=None,
                    with_state=False):
    """DeepSpeed's onebit/lamb.py; bias_correction=False is DeepSpeed's own numbers (it never corrects).
    ``params``: the tensors (default PARAMS); ``with_state``: also its per-tensor lamb_coeff_freeze, last_factor
    and scaling_coeff dicts."""
    bc = (lambda b, s: 1 - b ** s) if bias_correction else (lambda b, s: 1.0)  # noqa: E731
    p = {k: v.copy() for k, v in (PARAMS if params is None else params).items()}
    m, v, vf = ({k: np.zeros_like(x) for k, x in p.items()} for _ in range(3))
    lcf, last, scaling = {k: 0.0 for k in p}, {k: 1.0 for k in p}, {}
    car = _Car(p, n, fused=True)
    for c, g in enumerate(grads_seq):
        b1_c, b2_c = _beta(b1, c), _beta(b2, c)
        t = c + 1
        if c < freeze_step:
            ga = _clip({k: g[k].mean(0) for k in p}, clip)
            for k in p:
                m[k], v[k] = b1_c * m[k] + (1 - b1_c) * ga[k], b2_c * v[k] + (1 - b2_c) * ga[k] ** 2
                u = (m[k] / bc(b1_c, t)) / (np.sqrt(v[k] / bc(b2_c, t)) + eps) + wd * p[k]
                wn, un = np.linalg.norm(p[k]), np.linalg.norm(u)
                coeff = float(np.clip(wn / un, min_coeff, max_coeff)) if wn > 0 and un > 0 else 1.0
                if coeff != 1.0:
                    lcf[k] = coeff_beta * lcf[k] + (1 - coeff_beta) * coeff
                p[k] = p[k] - lr * coeff * u
            continue
        if c == freeze_step:
            rms = {k: np.linalg.norm(m[k]) / np.sqrt(m[k].size) for k in p}
            united = np.mean(list(rms.values()))
            scaling = {k: united / rms[k] for k in p}
            vf = {k: v[k].copy() for k in p}
        m_prev = m
        local = [_clip({k: g[k][r] for k in p}, clip) for r in range(n)]
        m = car([{k: (b1_c * m[k] + (1 - b1_c) * local[r][k]) * scaling[k] for k in p} for r in range(n)])
        m = {k: m[k] / scaling[k] for k in p}
        for k in p:
            vf[k] = b2_c * vf[k] + (1 - b2_c) * ((m[k] - b1_c * m_prev[k]) / (1 - b1_c)) ** 2
            denom = np.sqrt(v[k] / bc(b2_c, freeze_step)) + eps
            prelim = (m[k] / bc(b1_c, t)) / denom
            u = prelim + wd * p[k]
            factor = np.max(denom / (np.sqrt(vf[k] / bc(b2_c, t)) + eps))
            ratio = min(1.0, np.linalg.norm(prelim) / np.linalg.norm(u))
            factor = factor * ratio + (1 - ratio)
            factor = np.clip(factor, factor_min, factor_max)
            factor = np.clip(factor, last[k] * (1 - factor_threshold), last[k] * (1 + factor_threshold))
            last[k] = factor
            p[k] = p[k] - lr * lcf[k] * factor * u
    return (p, lcf, last, scaling) if with_state else p


# --------------------------------------------------------------------------------------- tests
def test_onebit_adam_matches_numpy_reference_across_freeze():
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01)
    grads = _grads(7)  # global norms ~5.5 (mean) and ~6 (one rank's): clipping at 5 acts on some steps
    p, state, p_local = _run(onebit_adam(0.05, data_size=N, freeze_step=3, gradient_clipping=5.0, **hp), grads)
    ref = ref_onebit_adam(grads, 0.05, hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], 3, clip=5.0)
    unclipped = ref_onebit_adam(grads, 0.05, hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], 3)
    assert not np.allclose(ref["w"], unclipped["w"], atol=1e-3)  # the clip did act
    _close(p, ref)
    for r in range(N):
        _close({k: v[r] for k, v in p_local.items()}, ref)
    assert np.abs(np.asarray(state.worker_error)).sum() > 0
    # every rank kept its own error: rows differ
    assert not np.allclose(state.worker_error[0], state.worker_error[1])


def test_zero_one_adam_matches_numpy_reference_through_local_steps():
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, var_freeze_step=6, var_update_scaler=2,
              local_step_scaler=2, local_step_clipper=4)
    grads = _grads(17, seed=3)
    seen, state = _run(zero_one_adam(0.05, data_size=N, gradient_clipping=5.0, **hp), grads, history=True)
    refs, (var_interval, local_interval) = ref_zero_one_adam(grads, 0.05, *hp.values(), clip=5.0)
    assert (int(state.var_interval), int(state.local_interval)) == (var_interval, local_interval) == (4, 4)
    for r in range(N):  # each rank's model after step 17, one local step past the sync at 16
        _close({k: v[r] for k, v in seen[16][1].items()}, refs[r])
    assert not np.allclose(seen[16][1]["w"][0], seen[16][1]["w"][1])  # ranks drifted apart
    _close(seen[16][0], seen[15][0], tol=0)  # the shared params wait for the next sync
    refs16, _ = ref_zero_one_adam(grads[:16], 0.05, *hp.values(), clip=5.0)
    for r in range(N):  # right after the sync at step 16 every rank's model is the shared params
        _close(seen[15][0], refs16[r])
        _close({k: v[r] for k, v in seen[15][1].items()}, refs16[r])


def test_zero_one_adam_without_bias_correction_is_deepspeeds_step():
    """bias_correction=False gives DeepSpeed's numbers: each rank's model after every step equals a NumPy model of
    zoadam.py written in DeepSpeed's order of operations, through thinned variance steps, 1-bit gradient
    steps, the error reset, local steps with growing intervals and the syncs."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, var_freeze_step=7, var_update_scaler=2,
              local_step_scaler=3, local_step_clipper=4)
    grads = _grads(20, seed=11)
    seen, state = _run(zero_one_adam(0.02, data_size=N, bias_correction=False, **hp), grads, history=True)
    for t in (6, 9, 13, 17, 20):  # stage 1 / first local steps / around syncs at intervals 2 and 4
        refs, intervals = ref_zero_one_adam_deepspeed_order(grads[:t], 0.02, *hp.values())
        for r in range(N):
            _close({k: v[r] for k, v in seen[t - 1][1].items()}, refs[r], tol=5e-5)
    assert (int(state.var_interval), int(state.local_interval)) == intervals == (4, 4)


# a leaf of 3 layers at scales 1e3 apart (a shared scale would be the big layer's), each layer 80 numbers (padded
# to 128 per layer on 8 ranks: 3 x 16 per rank, where the whole leaf would pad 240 to 256: 32 per rank)
LAYER_SCALES = np.array([0.01, 1.0, 10.0], np.float32)[:, None, None]
STACKED = {"b": PARAMS["b"],
           "w": np.random.default_rng(2).standard_normal((3, 4, 20)).astype(np.float32) * LAYER_SCALES}


def _stacked_grads(steps, seed):
    """Per-rank gradients of STACKED whose layers are at the layers' scales, and the same unrolled (w_0, w_1, ...)."""
    grads = [dict(g, w=g["w"] * LAYER_SCALES[None]) for g in _grads(steps, seed=seed, params=STACKED)]
    return grads, [unroll_layers(g, "w", axis=1) for g in grads]


def test_onebit_adam_compresses_each_layer_of_a_stacked_leaf():
    """stacked_axes: each layer of a stacked leaf is its own DeepSpeed tensor in the compressed all-reduce (own
    worker and server scales, own padding and chunking over the ranks): the NumPy reference on the unrolled params,
    across the freeze; one scale for the whole leaf is not that."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01)
    grads, grads_u = _stacked_grads(6, seed=21)
    tx = onebit_adam(0.05, data_size=N, freeze_step=2, stacked_axes={"b": 0, "w": 1}, **hp)
    p, state, p_local = _run(tx, grads, params=STACKED)
    want = ref_onebit_adam(grads_u, 0.05, *hp.values(), 2, params=unroll_layers(STACKED, "w"))
    assert state.worker_error.shape == (N, padded_size(6, N) + 3 * padded_size(80, N))
    _close(unroll_layers({k: np.asarray(v) for k, v in p.items()}, "w"), want)
    for r in range(N):
        _close(unroll_layers({k: v[r] for k, v in p_local.items()}, "w"), want)
    whole, _, _ = _run(onebit_adam(0.05, data_size=N, freeze_step=2, **hp), grads, params=STACKED)
    assert not np.allclose(np.asarray(whole["w"][0]), want["w_0"], rtol=1e-2)


def test_zero_one_adam_stacked_leaf_steps_as_unrolled_layers():
    """0/1 Adam with stacked_axes gives every rank the model of the unrolled params (one leaf per layer), step by
    step through 1-bit gradient steps, the error reset and the 1-bit syncs of local steps."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, var_freeze_step=4, var_update_scaler=1,
              local_step_scaler=2, local_step_clipper=2)
    grads, grads_u = _stacked_grads(9, seed=22)
    seen, _ = _run(zero_one_adam(0.05, data_size=N, stacked_axes={"b": 0, "w": 1}, **hp), grads, params=STACKED,
                   history=True)
    want, _ = _run(zero_one_adam(0.05, data_size=N, **hp), grads_u, params=unroll_layers(STACKED, "w"),
                   history=True)
    for (_, got), (_, ref) in zip(seen, want):   # each rank's own model after every step
        _close(unroll_layers(got, "w", axis=1), ref)
    whole, _ = _run(zero_one_adam(0.05, data_size=N, **hp), grads, params=STACKED, history=True)
    assert not np.allclose(whole[-1][0]["w"][0], want[-1][0]["w_0"], rtol=1e-2)


def test_onebit_lamb_matches_numpy_reference_across_freeze():
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, freeze_step=4, max_coeff=10.0, min_coeff=0.01,
              coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)
    grads = _grads(8, seed=5)
    p, state, _ = _run(onebit_lamb(0.05, data_size=N, gradient_clipping=5.0, **hp), grads)
    _close(p, ref_onebit_lamb(grads, 0.05, *hp.values(), clip=5.0))
    assert all(0.5 <= float(f) <= 4.0 for f in jax.tree.leaves(state.last_factor))


def test_onebit_lamb_without_bias_correction_is_deepspeeds_step():
    """bias_correction=False: DeepSpeed's uncorrected moments in the trust ratios, the frozen denominator and the
    fresh-variance factor, across the freeze (scaling coefficients, factor clamps and threshold)."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, freeze_step=4, max_coeff=10.0, min_coeff=0.01,
              coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)
    grads = _grads(10, seed=13)
    p, state, _ = _run(onebit_lamb(0.05, data_size=N, bias_correction=False, **hp), grads)
    ref = ref_onebit_lamb(grads, 0.05, *hp.values(), bias_correction=False)
    assert not np.allclose(ref["w"], ref_onebit_lamb(grads, 0.05, *hp.values())["w"], atol=1e-4)
    _close(p, ref)


def test_onebit_lamb_stacked_leaf_is_one_tensor_per_layer():
    """A leaf stacked over layers (stacked_axes): each layer is a DeepSpeed tensor, with its own trust ratio,
    lamb_coeff_freeze, scaling coefficient (its rms counted once in the mean over tensors), fresh-variance factor
    and last_factor; the same numbers as the NumPy reference on the unrolled params, across the freeze. (The fused
    compressed all-reduce sees the same flat buffer either way.)"""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, freeze_step=4, max_coeff=10.0, min_coeff=0.01,
              coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)
    scales = np.array([1e-3, 0.3, 3.0, 100.0], np.float32)[:, None]   # min clamp, inside (2), max clamp
    params = {"b": PARAMS["b"], "w": PARAMS["w"] * scales}
    grads = _grads(8, seed=5)
    rows = range(params["w"].shape[0])

    def unroll(tree, axis=0):
        return {"b": tree["b"], **{f"w_{i}": np.take(tree["w"], i, axis=axis) for i in rows}}

    p, state, p_local = _run(onebit_lamb(0.05, data_size=N, gradient_clipping=5.0, stacked_axes={"b": 0, "w": 1},
                                         **hp), grads, params=params)
    want, lcf, last, scaling = ref_onebit_lamb([unroll(g, axis=1) for g in grads], 0.05, *hp.values(), clip=5.0,
                                               params=unroll(params), with_state=True)
    _close(unroll({k: np.asarray(v) for k, v in p.items()}), want)
    _close(unroll(p_local, axis=1), {k: np.stack([v] * N) for k, v in want.items()})
    for field, ref in (("lamb_coeff_freeze", lcf), ("last_factor", last), ("scaling_coeff", scaling)):
        got = getattr(state, field)
        assert got["w"].shape == (4,) and got["b"].shape == (), field
        _close(unroll({k: np.asarray(v) for k, v in got.items()}), {k: np.float32(x) for k, x in ref.items()})
    assert len(set(np.round(np.asarray(state.lamb_coeff_freeze["w"]), 6))) == 4   # four layers, four ratios
    # one ratio for the whole leaf (no stacked_axes) is not DeepSpeed's per-layer step
    whole, _, _ = _run(onebit_lamb(0.05, data_size=N, gradient_clipping=5.0, **hp), grads, params=params)
    assert not np.allclose(np.asarray(whole["w"][0]), want["w_0"], rtol=1e-3)


def test_engine_gives_onebit_lamb_per_layer_state():
    """initialize() passes the model's 'layers' stacking to OneBitLamb: its per-tensor state is per layer."""
    import jzero
    from jzero.config import load_config

    eng = jzero.initialize(load_config(base={}, overrides=[
        "model.preset=gpt2-tiny", "model.n_layer=3", "model.d_model=64", "model.d_ff=128", "data.seq_len=16",
        "train_batch_size=8", "optimizer.type=OneBitLamb", "optimizer.params.freeze_step=2"]), abstract=True)
    lf = eng.state.opt_state.last_factor
    assert lf["blocks"]["attn"]["qkv_kernel"].shape == (3,) and lf["wte"].shape == ()


def _ds_clip(max_norm):
    """DeepSpeed's gradient_clipping as an optax transform (optax's own omits the + 1e-6)."""
    def clip(updates, params=None):
        norm = optax.tree.norm(updates)
        return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), updates)
    return optax.stateless(clip)


@pytest.mark.parametrize("name", ["adam", "zero_one", "lamb"])
def test_one_rank_is_plain_optax(name):
    """With one data-parallel rank: nothing compressed, nothing frozen: optax.adamw / optax.lamb after the clip."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.01, gradient_clipping=5.0)
    adamw = optax.chain(_ds_clip(5.0), optax.adamw(0.05, hp["b1"], hp["b2"], hp["eps"], weight_decay=0.01))
    if name == "adam":
        tx, ref = onebit_adam(0.05, data_size=1, freeze_step=2, **hp), adamw
    elif name == "zero_one":
        tx = zero_one_adam(0.05, data_size=1, var_freeze_step=2, var_update_scaler=1, local_step_scaler=1,
                           local_step_clipper=4, **hp)
        ref = adamw
    else:
        tx = onebit_lamb(0.05, data_size=1, freeze_step=2, max_coeff=1e9, min_coeff=0.0, **hp)
        ref = optax.chain(_ds_clip(5.0), optax.lamb(0.05, hp["b1"], hp["b2"], hp["eps"], weight_decay=0.01))
    grads = _grads(8, n=1, seed=7)
    p, _, _ = _run(tx, grads, n=1)
    q, s = dict(PARAMS), ref.init(PARAMS)
    for g in grads:
        u, s = ref.update({k: v[0] for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    _close(p, {k: np.asarray(v) for k, v in q.items()}, tol=1e-6)


@pytest.mark.parametrize("build", [lambda: onebit_adam(1e-3, data_size=N, freeze_step=10, phase="compressed"),
                                   lambda: onebit_lamb(1e-3, data_size=N, freeze_step=10, phase="compressed")],
                         ids=["onebit_adam", "onebit_lamb"])
def test_compression_stage_moves_packed_bits_only(build):
    hlo = _compiled_update_hlo(build(), BIG)
    ops = collective_ops(hlo)
    assert not [o for o in ops if o["op"] == "all-reduce"], "the momentum must not be all-reduced"
    assert any(o["op"] == "all-to-all" and o["dtypes"] == ["u8"] for o in ops)
    assert any(o["op"] == "all-gather" and o["dtypes"] == ["u8"] for o in ops)
    compressed = collective_bytes(hlo)["total"]
    exact = collective_bytes(_fp32_allreduce_hlo(BIG))
    numel = sum(x.size for x in BIG.values())
    assert exact["all-reduce"] == exact["total"] == round(2 * 7 / 8 * 4 * numel)
    assert compressed <= exact["total"] / 16, (compressed, exact["total"])


def test_per_layer_compression_keeps_the_same_four_collectives():
    """Per-layer scales for stacked leaves (12 layers x 2 leaves + 1 unstacked leaf = 25 tensors) ride in the same
    one all-to-all and three all-gathers as the per-leaf ones: no collective per layer, the bits still packed u8,
    25 scales per rank in each scale all-gather."""
    params = {"w": np.zeros((12, 64, 32), np.float32), "b": np.zeros((12, 32), np.float32),
              "e": np.zeros((100, 64), np.float32)}
    build = lambda **k: onebit_adam(1e-3, data_size=N, freeze_step=10, phase="compressed", **k)  # noqa: E731
    per_leaf = collective_ops(_compiled_update_hlo(build(), params))
    per_layer = collective_ops(_compiled_update_hlo(build(stacked_axes={"w": 1, "b": 1, "e": 0}), params))
    kinds = lambda ops: sorted((o["op"], tuple(o["dtypes"])) for o in ops)  # noqa: E731
    assert kinds(per_layer) == kinds(per_leaf) == [("all-gather", ("f32",))] * 2 + [("all-gather", ("u8",)),
                                                                                     ("all-to-all", ("u8",))]
    assert sorted(o["result_bytes"] for o in per_layer if o["dtypes"] == ["f32"]) == [N * 25 * 4] * 2
    bits = sum(padded_size(x, N) for x in [64 * 32] * 12 + [32] * 12 + [6400]) // 8
    assert [o["result_bytes"] for o in per_layer if o["op"] == "all-to-all"] == [bits]


def test_warmup_and_auto_programs_hold_the_exact_allreduce():
    warm = collective_ops(_compiled_update_hlo(onebit_adam(1e-3, data_size=N, freeze_step=10, phase="warmup"),
                                               PARAMS))
    assert {o["op"] for o in warm} == {"all-reduce"}
    auto = {o["op"] for o in collective_ops(_compiled_update_hlo(zero_one_adam(1e-3, data_size=N), PARAMS))}
    assert {"all-reduce", "all-to-all", "all-gather"} <= auto


def test_state_specs_shard_per_rank_buffers_only():
    state = (optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), zero_one_adam(1e-3, data_size=N).init(PARAMS))
    specs = onebit_state_specs(state)
    assert specs[0].count == P()
    zs = specs[1]
    assert zs.worker_error == zs.server_error == P("data") and zs.mu_delta["w"] == P("data")
    assert zs.mu["w"] == zs.nu["b"] == zs.count == P()
    assert state[1].momentum_accumulator["w"].shape == (N, 4, 6)
    assert state[1].worker_error.shape == (N, 2 * padded_size(24, N))


STEPS, D, K, B, SIGMA = 300, 32, 4, 16, 1.0


def _regression_data(seed=0):
    """Noisy linear regression: every step each rank draws B fresh rows; labels carry N(0, SIGMA^2) noise."""
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal((D, K)).astype(np.float32)
    xs = rng.standard_normal((STEPS, N, B, D)).astype(np.float32)
    ys = xs @ w_true + SIGMA * rng.standard_normal((STEPS, N, B, K)).astype(np.float32)
    x_test = rng.standard_normal((4096, D)).astype(np.float32)
    params = {"w": (rng.standard_normal((D, K)) / np.sqrt(D)).astype(np.float32), "b": np.zeros((K,), np.float32)}
    return params, xs, ys, x_test, x_test @ w_true


def _loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _train_sharded(tx, params, xs, ys):
    """All steps in one program: scan inside shard_map; each rank differentiates on its own rows only."""
    state = tx.init(params)
    rep, specs = jax.tree.map(lambda _: P(), params), onebit_state_specs(state)

    def body(p, s, xs, ys):
        def step(carry, batch):
            p, s = carry
            grads = jax.grad(_loss)(local_params(p, s), batch[0][0], batch[1][0])  # local: no psum
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None
        return jax.lax.scan(step, (p, s), (xs, ys))[0]

    run = jax.jit(jax.shard_map(body, mesh=_mesh(N), in_specs=(rep, specs, P(None, "data"), P(None, "data")),
                                out_specs=(rep, specs), axis_names={"data"}))
    return run(params, state, xs, ys)


def _train_reference(tx, params, xs, ys):
    """The uncompressed optimizer on the same rows, all ranks' rows in one batch (= exact gradient mean)."""
    def step(carry, batch):
        p, s = carry
        updates, s = tx.update(jax.grad(_loss)(p, batch[0].reshape(-1, D), batch[1].reshape(-1, K)), s, p)
        return (optax.apply_updates(p, updates), s), None
    return jax.jit(lambda p, xs, ys: jax.lax.scan(step, (p, tx.init(p)), (xs, ys))[0])(params, xs, ys)


@pytest.mark.parametrize("name", ["adam", "zero_one", "lamb"])
def test_regression_converges_like_uncompressed(name):
    """Trained with a cosine schedule, warm-up/variance-freeze at 20%: the held-out loss (label noise included,
    as an eval loss) is within 3% of the uncompressed optimizer's and the excess over the noise floor within 2x."""
    lr = optax.cosine_decay_schedule(0.05, STEPS)
    if name == "adam":
        tx, ref = onebit_adam(lr, data_size=N, freeze_step=STEPS // 5), optax.adam(lr)
    elif name == "zero_one":
        tx = zero_one_adam(lr, data_size=N, var_freeze_step=2 * STEPS // 5, var_update_scaler=4,
                           local_step_scaler=STEPS // 5, local_step_clipper=4)
        ref = optax.adam(lr)
    else:
        tx, ref = onebit_lamb(lr, data_size=N, freeze_step=STEPS // 5), optax.lamb(lr, eps=1e-8)
    params, xs, ys, x_test, y_test = _regression_data()
    (p, state), (q, _) = _train_sharded(tx, params, xs, ys), _train_reference(ref, params, xs, ys)
    excess, excess_ref = float(_loss(p, x_test, y_test)), float(_loss(q, x_test, y_test))
    start = float(_loss(params, x_test, y_test))
    assert excess_ref < 1e-3 * start  # the uncompressed optimizer solves the problem
    assert SIGMA ** 2 + excess <= 1.03 * (SIGMA ** 2 + excess_ref), (excess, excess_ref)
    assert excess <= 2 * excess_ref, (excess, excess_ref)
    if name == "zero_one":  # the run went through thinned variance steps and multi-step local stages
        assert int(state.var_interval) > 1 and int(state.local_interval) == 4


def test_zero_one_adam_local_steps_take_gradients_at_each_ranks_model():
    """Gradients that depend on the params, taken where the engine takes them (jzero.optim.onebit.local_params):
    through local steps every rank differentiates at its own drifted model, as DeepSpeed does at its p.data;
    after the sync at step 20 the shared params equal DeepSpeed's on every rank (bias_correction off)."""
    hp = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, var_freeze_step=7, var_update_scaler=2,
              local_step_scaler=3, local_step_clipper=4)
    steps = 20  # stage 2 from step 9; intervals 1, 2, 4; step 20 is a sync
    params, xs, ys, _, _ = _regression_data(seed=2)
    xs, ys = xs[:steps], ys[:steps]
    p, state = _train_sharded(zero_one_adam(0.02, data_size=N, bias_correction=False, **hp), params, xs, ys)

    def grad_fn(step, r, pr):
        x, y = xs[step - 1, r].astype(np.float64), ys[step - 1, r].astype(np.float64)
        resid = 2 * (x @ pr["w"] + pr["b"] - y) / y.size
        return {"w": (x.T @ resid).astype(np.float32), "b": resid.sum(0).astype(np.float32)}

    refs, intervals = ref_zero_one_adam_deepspeed_order(grad_fn, 0.02, *hp.values(), params=params, steps=steps)
    assert (int(state.var_interval), int(state.local_interval)) == intervals == (4, 4)
    for r in range(N):
        _close(p, refs[r], tol=5e-5)
    drifted, _ = ref_zero_one_adam_deepspeed_order(grad_fn, 0.02, *hp.values(), params=params, steps=steps - 1)
    assert not np.allclose(drifted[0]["w"], drifted[1]["w"], atol=1e-4)  # between syncs the ranks' models differ


def test_build_onebit_from_deepspeed_params():
    params = {"lr": 0.05, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01, "freeze_step": 3,
              "cuda_aware": True, "comm_backend_name": "nccl"}   # cuda_aware: MPI only, no effect
    grads = _grads(5)
    p, _, _ = _run(build_onebit("OneBitAdam", params, data_size=N), grads)
    _close(p, ref_onebit_adam(grads, 0.05, 0.9, 0.99, 1e-8, 0.01, 3))
    assert build_onebit("zerooneadam", {"var_freeze_step": 5}, optax.constant_schedule(1e-3), data_size=N)
    assert build_onebit("OneBitLamb", {"max_coeff": 0.3, "factor_threshold": 0.05}, data_size=N, phase="warmup")


# DeepSpeed's OneCycle(cycle_first_step_size=2, cycle_min_mom=0.8, cycle_max_mom=0.9) writes betas (0.8, 0.99) in
# its constructor, then (mom, 0.99) after each step: mom at last_batch_iteration 0, 1, 2 = 0.85, 0.8, 0.85, then
# cycle_max_mom once the cycle (4 steps) is over. The 1-bit optimizers read group['betas'] in every step().
ONE_CYCLE = {"type": "OneCycle", "params": {"cycle_min_lr": 0.05, "cycle_max_lr": 0.05, "cycle_first_step_size": 2,
                                            "cycle_min_mom": 0.8, "cycle_max_mom": 0.9}}
ONE_CYCLE_B1 = [0.8, 0.85, 0.8, 0.85, 0.9, 0.9, 0.9]


@pytest.mark.parametrize("opt", [
    {"type": "OneBitAdam", "params": {"freeze_step": 3}},
    {"type": "ZeroOneAdam", "params": {"var_freeze_step": 3, "var_update_scaler": 2, "local_step_scaler": 2,
                                       "local_step_clipper": 2}},
    {"type": "OneBitLamb", "params": {"freeze_step": 3}},
], ids=lambda o: o["type"])
def test_one_cycle_momentum_cycles_the_onebit_betas(opt):
    """OneCycle's cycle_momentum (on by default) drives the 1-bit optimizers' betas as (momentum, 0.99), as
    DeepSpeed's OneCycle rewrites param_group['betas']: the engine's optimizer against the NumPy references fed
    those betas per step (the configured betas [0.7, 0.95] are overridden), across the freeze / local steps."""
    from jzero.config import load_config
    from jzero.engine import _build_tx

    params = {"lr": 0.05, "betas": [0.7, 0.95], "eps": 1e-8, "weight_decay": 0.01, **opt["params"]}
    cfg = load_config({"optimizer": {"type": opt["type"], "params": params}, "scheduler": ONE_CYCLE})
    tx, _ = _build_tx(cfg, _mesh(N))
    grads = _grads(7, seed=17)
    seen, _ = _run(tx, grads, history=True)
    b1, b2 = ONE_CYCLE_B1, [0.99] * 7
    hp = (0.05, b1, b2, 1e-8, 0.01)
    if opt["type"] == "OneBitAdam":
        want = [ref_onebit_adam(grads, *hp, 3)] * N
    elif opt["type"] == "ZeroOneAdam":
        want, _ = ref_zero_one_adam(grads, *hp, 3, 2, 2, 2)
    else:
        want = [ref_onebit_lamb(grads, *hp, 3, 10.0, 0.01, 0.9, 4.0, 0.5, 0.1)] * N
    for r in range(N):   # each rank's own model
        _close({k: v[r] for k, v in seen[-1][1].items()}, want[r])


@pytest.mark.parametrize("optimizer_type,params,match", [
    ("OneBitAdam", {"cuda_aware": 1}, "optimizer.params.cuda_aware=1: must be true or false"),
    ("OneBitAdam", {"comm_backend_name": "mpi"}, "optimizer.params.comm_backend_name"),
    ("OneBitAdam", {"var_freeze_step": 5}, "optimizer.params.var_freeze_step: unknown"),
    ("ZeroOneAdam", {"freeze_step": 5}, "optimizer.params.freeze_step: unknown"),
    ("OneBitLamb", {"freeze_step": 0}, "optimizer.params.freeze_step: want an integer"),
    ("OneBitLamb", {"betas": [0.9]}, "optimizer.params.betas"),
    ("OneBitAdam", {"max_grad_norm": 1.0}, "gradient_clipping"),
    ("OneBitAdamW", {}, "optimizer.type"),
])
def test_build_onebit_rejects_bad_params(optimizer_type, params, match):
    with pytest.raises(ConfigError, match=match):
        build_onebit(optimizer_type, params, data_size=N)


@pytest.mark.parametrize("kind", ["OneBitAdam", "OneBitLamb"])
def test_communication_report_of_real_param_shapes(kind):
    """What train.pretrain writes to summary.json: warm-up moves exactly the fp32 all-reduce's bytes, the
    compression stage at most 1/16 of them (HLO-counted on an 8-rank data axis)."""
    from jzero.optim.onebit import communication_report

    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in BIG.items()}
    r = communication_report(kind, {"freeze_step": 10}, shapes, _mesh(N))
    numel = sum(x.size for x in BIG.values())
    assert r["data_parallel"] == N and r["fp32_allreduce"] == round(2 * 7 / 8 * 4 * numel)
    assert r["warmup"] == r["fp32_allreduce"]
    assert 0 < r["compression"] <= r["fp32_allreduce"] / 16
    assert r["compression_vs_fp32"] == r["compression"] / r["fp32_allreduce"]
