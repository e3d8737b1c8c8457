"""jzero.optim.lamb against a NumPy replay of DeepSpeed's FusedLamb kernel.

Reference: deepspeedai/DeepSpeed ``csrc/lamb/fused_lamb_cuda_kernel.cu`` (``lamb_cuda_kernel_part1`` ..
``part3`` and ``fused_lamb_cuda``) driven by ``deepspeed/ops/lamb/fused_lamb.py`` (``state['step'] += 1`` per
call, eps mode 1 unless ``eps_inside_sqrt``). Per tensor:
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  bc1 = 1 - b1^t, bc2 = 1 - b2^t (1 without bias correction)
    u = (m/bc1) / (sqrt(v/bc2) + eps) + decay * w          (sqrt(v/bc2 + eps) in eps mode 0)
    coeff = ||w||/||u|| clamped to max_coeff then min_coeff, 1.0 if either norm is 0
    w = w - lr * coeff * u
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jzero
from helpers import batches
from jzero.config import load_config
from jzero.optim import layer_stacked_axes
from jzero.optim.lamb import lamb, scale_by_adam_moments


def ref_fused_lamb(params, grads_seq, lr, b1, b2, eps, decay, max_coeff, min_coeff, bias_correction=True,
                   eps_inside_sqrt=False):
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v_ = {k: np.zeros_like(v) for k, v in w.items()}
    b1, b2 = float(np.float32(b1)), float(np.float32(b2))  # the kernel's beta arguments are C floats
    coeffs = []
    for t, grads in enumerate(grads_seq, start=1):
        bc1 = 1 - b1 ** t if bias_correction else 1.0
        bc2 = 1 - b2 ** t if bias_correction else 1.0
        step_coeffs = {}
        for k in w:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v_[k] = b2 * v_[k] + (1 - b2) * g * g
            vh = v_[k] / bc2
            denom = np.sqrt(vh + eps) if eps_inside_sqrt else np.sqrt(vh) + eps
            u = (m[k] / bc1) / denom + decay * w[k]
            reg_w, reg_u = np.sqrt(np.sum(w[k] ** 2)), np.sqrt(np.sum(u ** 2))
            coeff = 1.0
            if reg_w != 0 and reg_u != 0:
                coeff = reg_w / reg_u
                if coeff > max_coeff:
                    coeff = max_coeff
                if coeff < min_coeff:
                    coeff = min_coeff
            step_coeffs[k] = coeff
            w[k] = w[k] - lr * coeff * u
        coeffs.append(step_coeffs)
    return w, coeffs


def make_problem(steps=4):
    rng = np.random.default_rng(0)
    params = {
        "big": rng.normal(size=(6, 5)).astype(np.float32) * 30.0,  # large ||w|| -> ratio clipped at max_coeff
        "small": rng.normal(size=(7,)).astype(np.float32) * 1e-3,  # tiny ||w|| -> ratio clipped at min_coeff
        "mid": rng.normal(size=(3, 4)).astype(np.float32) * 1.0,  # ratio inside the clamp
        "zero": np.zeros((4,), np.float32),  # ||w|| = 0 -> coefficient 1.0
    }
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(steps)]
    return params, grads


def run(tx, params, grads_seq):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g in grads_seq:
        p, state = step(p, state, jax.tree.map(jnp.asarray, g))
    return p


@pytest.mark.parametrize("bias_correction, eps_inside_sqrt, decay", [
    (True, False, 0.01), (False, False, 0.0), (True, True, 0.1)])
def test_lamb_matches_fused_lamb_kernel(bias_correction, eps_inside_sqrt, decay):
    params, grads = make_problem()
    hp = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, decay=decay, max_coeff=2.0, min_coeff=0.05)
    want, coeffs = ref_fused_lamb(params, grads, **hp, bias_correction=bias_correction,
                                  eps_inside_sqrt=eps_inside_sqrt)
    # the problem exercises every branch of the clamp
    seen = {c for step in coeffs for c in step.values()}
    assert {2.0, 0.05, 1.0} <= seen and any(0.05 < c < 2.0 and c != 1.0 for c in seen)
    tx = lamb(hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["decay"], hp["min_coeff"], hp["max_coeff"],
              bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt)
    got = run(tx, params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_lamb_defaults_are_fused_lamb_defaults():
    params, grads = make_problem(steps=2)
    want, _ = ref_fused_lamb(params, grads, lr=0.001, b1=0.9, b2=0.999, eps=1e-8, decay=0.0, max_coeff=10.0,
                             min_coeff=0.01)
    got = run(lamb(0.001), params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_scheduled_beta1_uses_current_beta_in_moment_and_bias_correction():
    # FusedAdam/FusedLamb read group['betas'] at every step: m uses b1_t and bc1 = 1 - b1_t ** t
    betas = [0.8, 0.95, 0.9]
    tx = scale_by_adam_moments(lambda count: jnp.asarray(betas)[count], 0.99, 1e-8)
    g = [np.array([1.0, -2.0], np.float32), np.array([0.5, 3.0], np.float32), np.array([-1.0, 1.0], np.float32)]
    state = tx.init(jnp.zeros(2))
    m = v = np.zeros(2)
    for t, (b1, gt) in enumerate(zip(betas, g), start=1):
        out, state = tx.update(jnp.asarray(gt), state)
        m, v = b1 * m + (1 - b1) * gt, 0.99 * v + 0.01 * gt * gt
        want = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        np.testing.assert_allclose(np.asarray(out), want, rtol=2e-6)


def test_lamb_needs_params():
    tx = lamb(0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


# ------------------------------------------------------------------ layer-stacked leaves: one tensor per layer
def test_layer_stacked_axes_from_logical_names():
    names = {"blocks": {"k": ("layers", "embed", "mlp"), "s": ("layers",)}, "wte": ("vocab", "embed"),
             "staged": ("stage", "layers", None), "mid": ("embed", "layers"), "scalar": ()}
    assert layer_stacked_axes(names) == {"blocks": {"k": 1, "s": 1}, "wte": 0, "staged": 2, "mid": 0, "scalar": 0}


def test_stacked_leaf_matches_fused_lamb_layer_by_layer():
    """A leaf stacked over layers gets DeepSpeed's per-tensor trust ratio of each layer: the same numbers as the
    NumPy FusedLamb replay on the unrolled params (one tensor per layer), across clamp branches."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(4, 6, 5)).astype(np.float32)
    stack = base * np.array([1e-3, 1.0, 30.0, 0.0], np.float32)[:, None, None]   # min clamp, inside, max, ||w||=0
    grid = rng.normal(size=(2, 3, 7)).astype(np.float32) * np.array([[1.0], [1.5]], np.float32)[:, :, None]
    params = {"stack": stack, "grid": grid, "flat": rng.normal(size=(3, 4)).astype(np.float32)}
    stacked = {"stack": 1, "grid": 2, "flat": 0}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]

    def unroll(tree):
        out = {f"stack_{i}": tree["stack"][i] for i in range(4)}
        out.update({f"grid_{i}_{j}": tree["grid"][i, j] for i in range(2) for j in range(3)})
        out["flat"] = tree["flat"]
        return out

    hp = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, decay=0.01, max_coeff=2.0, min_coeff=0.05)
    want, coeffs = ref_fused_lamb(unroll(params), [unroll(g) for g in grads], **hp)
    assert {coeffs[0][f"stack_{i}"] for i in range(4)} == {0.05, 2.0, 1.0} | {coeffs[0]["stack_1"]}
    assert len({coeffs[0][f"grid_{i}_{j}"] for i in range(2) for j in range(3)}) == 6
    tx = lamb(hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["decay"], hp["min_coeff"], hp["max_coeff"],
              stacked_axes=stacked)
    got = unroll(jax.tree.map(np.asarray, run(tx, params, grads)))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)
    # without the stacking the whole leaf shares one ratio: not the per-layer numbers
    whole = run(lamb(hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["decay"], hp["min_coeff"], hp["max_coeff"]),
                params, grads)
    assert not np.allclose(np.asarray(whole["stack"][0]), want["stack_0"], rtol=1e-3)


def test_stacked_axes_none_is_per_leaf_and_checked():
    params, grads = make_problem(steps=2)
    zeros = jax.tree.map(lambda _: 0, params)
    a = run(lamb(0.01, weight_decay=0.01), params, grads)
    b = run(lamb(0.01, weight_decay=0.01, stacked_axes=zeros), params, grads)
    for k in params:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    with pytest.raises(ValueError, match="leading stacked axes"):
        run(lamb(0.01, stacked_axes={**zeros, "small": 2}), params, grads)


def _tiny_gpt2(scan_layers: bool):
    """The audit's tiny GPT-2 (2 layers, d 64) under LAMB, its layers scanned (stacked) or unrolled."""
    return jzero.initialize(load_config(base={}, overrides=[
        "model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.d_ff=128", "data.seq_len=16",
        "train_batch_size=8", "optimizer.type=Lamb", "optimizer.params.lr=0.01",
        f"model.scan_layers={str(scan_layers).lower()}"]))


def _one_step(eng, params):
    """(params, params after one LAMB step from them) as numpy trees."""
    eng.set_params(params)
    before = jax.tree.map(np.asarray, eng.master_params())
    eng.train_step(batches(eng.batch_shape(), 1, seed=7)[0])
    return before, jax.tree.map(np.asarray, eng.master_params())


def test_scanned_model_steps_each_layer_as_the_unrolled_model():
    """The audit's repro: the same weights (layer 1 = 10x layer 0) stacked ('layers' leaves, scan_layers) or
    unrolled give every layer the same LAMB update after one step (the stacked leaf used to share one ratio,
    moving layer 0 ~7x too far)."""
    eng = _tiny_gpt2(True)
    scanned = jax.tree.map(np.asarray, eng.master_params())
    ten = lambda x: x * np.array([1.0, 10.0], np.float32).reshape((2,) + (1,) * (x.ndim - 1))  # noqa: E731
    scanned["blocks"] = jax.tree.map(ten, scanned["blocks"])
    unrolled = {k: v for k, v in scanned.items() if k != "blocks"}
    unrolled.update({f"block_{i}": jax.tree.map(lambda x: x[i], scanned["blocks"]) for i in range(2)})
    before_s, after_s = _one_step(eng, scanned)
    before_u, after_u = _one_step(_tiny_gpt2(False), unrolled)
    flat_s = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: a - b, after_s["blocks"],
                                                               before_s["blocks"]))[0]
    for path, upd_s in flat_s:
        for i in range(2):
            upd_u = after_u[f"block_{i}"]
            old_u = before_u[f"block_{i}"]
            for k in path:
                upd_u, old_u = upd_u[k.key], old_u[k.key]
            upd_u = upd_u - old_u
            name = f"{jax.tree_util.keystr(path)}[layer {i}]"
            # the trust ratio sets the layer's update norm: equal to float32 rounding
            np.testing.assert_allclose(np.linalg.norm(upd_s[i]), np.linalg.norm(upd_u), rtol=2e-6, err_msg=name)
            # element-wise too, but for Adam's first step g/(|g|+eps) on the odd near-zero gradient element,
            # whose value differs between the scanned and the unrolled program's float rounding
            assert np.linalg.norm(upd_s[i] - upd_u) <= 1e-3 * np.linalg.norm(upd_u), name
            assert np.mean(np.abs(upd_s[i] - upd_u) <= 1e-6) > 0.999, name
    # and the unstacked leaves (embeddings, final norm) step alike
    for k in unrolled:
        if not k.startswith("block_"):
            jax.tree.map(lambda a, b, c, d: np.testing.assert_allclose(a - b, c - d, atol=2e-6, err_msg=k),
                         after_s[k], before_s[k], after_u[k], before_u[k])
