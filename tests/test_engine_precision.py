"""Engine-level fp16 / bf16 / remat behaviour: skipped overflow steps, loss-scale metrics, remat equivalence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jzero
from jzero.config import load_config
from jzero.engine import Task, lm_loss
from helpers import BASE, batches


def poisoned_task(seq_len):
    """LM loss times a per-batch factor: factor inf makes every gradient non-finite (an injected overflow)."""
    return Task(micro_batch=lambda rows: {"tokens": jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32),
                                          "factor": jax.ShapeDtypeStruct((rows,), jnp.float32)},
                loss=lambda apply, p, b: lm_loss(apply, p, b["tokens"]) * b["factor"].mean(),
                init_inputs=lambda: (jnp.zeros((1, seq_len), jnp.int32),))


@pytest.fixture(autouse=True)
def _default_precision():
    # XLA:CPU has no fp16 x fp16 -> fp32 'highest' dot; conftest's 'highest' is for the fp32 comparisons
    with jax.default_matmul_precision("default"):
        yield


def test_injected_inf_skips_the_step_and_training_continues():
    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16", "fp16.enabled=true",
                                                 "fp16.initial_scale_power=8", "fp16.hysteresis=1"])
    eng = jzero.initialize(cfg, task=poisoned_task(32))
    data = batches((1, 16, 33), 6)
    k = 3
    snapshots, metrics = [], []
    for i, toks in enumerate(data):
        factor = np.full(toks.shape[:2], np.inf if i == k else 1.0, np.float32)
        snapshots.append(jax.tree.map(np.asarray, eng.state.params))
        metrics.append(jax.device_get(eng.train_step({"tokens": toks, "factor": factor})))
    after_k = jax.tree.map(np.asarray, eng.state.params)
    # the overflowed step k left params bit-identical to what step k started from
    params_after_k = snapshots[k + 1]
    for a, b in zip(jax.tree.leaves(params_after_k), jax.tree.leaves(snapshots[k])):
        np.testing.assert_array_equal(a, b)
    # the scale halved once (hysteresis 1), skipped_steps counts it, and later steps moved the params again
    scales = [float(m["loss_scale"]) for m in metrics]
    assert scales[: k + 1] == [256.0] * (k + 1) and scales[k + 1] == 128.0
    assert [int(m["skipped_steps"]) for m in metrics] == [0, 0, 0, 1, 1, 1]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_k), jax.tree.leaves(params_after_k)))
    assert np.isfinite([float(m["loss"]) for i, m in enumerate(metrics) if i != k]).all()


def test_fp16_and_bf16_track_fp32():
    data = batches((1, 16, 33), 8)
    losses = {}
    for name, extra in {"fp32": [], "bf16": ["bf16.enabled=true"], "fp16": ["fp16.enabled=true"]}.items():
        eng = jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16"] + extra))
        losses[name] = np.array([float(eng.train_step(b)["loss"]) for b in data])
    assert np.max(np.abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]) < 2e-2
    assert np.max(np.abs(losses["fp16"] - losses["fp32"]) / losses["fp32"]) < 5e-3


@pytest.fixture(scope="module")
def remat_runs():
    data = batches((1, 16, 33), 3)
    out = {}
    for policy in ("none", "full", "save_dots", "save_named"):
        extra = [f"activation_checkpointing.policy={policy}"]
        if policy == "save_named":
            extra.append("activation_checkpointing.save_names=[attn_out]")
        eng = jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16"] + extra))
        temp = eng.compile().memory_analysis().temp_size_in_bytes
        out[policy] = (np.array([float(eng.train_step(b)["loss"]) for b in data]), temp)
    return out


def test_remat_policies_same_loss(remat_runs):
    ref = remat_runs["none"][0]
    for policy, (losses, _) in remat_runs.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-6, err_msg=policy)


def test_remat_temp_memory_falls_as_less_is_saved(remat_runs):
    temp = {k: v[1] for k, v in remat_runs.items()}
    print("compiled temp bytes per policy:", temp)
    assert temp["full"] < temp["save_dots"] <= temp["none"]
    assert temp["full"] < temp["none"]
