"""Optimizer offload (jzero.offload): same numbers as the on-device optimizer, state in pinned host memory,
exact resume and export of an offloaded checkpoint, fp16 overflow skips, and the refused combinations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jzero
from jzero import checkpoint, export
from jzero.config import load_config
from jzero.errors import CheckpointError, ConfigError
from jzero.offload import plan_chunks, restack_masters
from helpers import BASE, batches

OFFLOAD = ["zero_optimization.offload_optimizer.device=cpu"]
FP32_SCAN = ["model.scan_layers=true", "zero_optimization.stage=2", "train_batch_size=16", "gradient_clipping=0.05"]


def _run(overrides, data):
    eng = jzero.initialize(load_config(base={}, overrides=BASE + overrides))
    return eng, np.array([float(eng.train_step(b)["loss"]) for b in data])


@pytest.fixture(scope="module")
def fp32_pair():
    data = batches((1, 16, 33), 4)
    plain, l_plain = _run(FP32_SCAN, data)
    off, l_off = _run(FP32_SCAN + OFFLOAD, data)
    return plain, l_plain, off, l_off


def test_offloaded_adam_equals_the_on_device_update(fp32_pair):
    plain, l_plain, off, l_off = fp32_pair
    # clipping at 0.05 is active every step, so the global-norm multiplier is exercised too
    np.testing.assert_allclose(l_off, l_plain, rtol=1e-6)
    masters = off.offload.master_params(off.state.opt_state)
    for a, b in zip(jax.tree.leaves(plain.state.params), jax.tree.leaves(masters)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6)


def test_state_lives_in_pinned_host_memory(fp32_pair):
    plain, _, off, _ = fp32_pair
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(off.state.opt_state)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(off.state.params)} == {"device"}
    mem_plain, mem_off = plain.memory_per_device(), off.memory_per_device()
    assert mem_off["opt_state"] == 0 and mem_plain["host"] == 0
    # host holds master (4 B) + m, v (8 B) per parameter of the ZeRO shard: 1.5x the on-device Adam state
    assert mem_off["host"] == pytest.approx(1.5 * mem_plain["opt_state"], rel=0.02)
    # the scanned stack is updated one layer at a time: every stacked leaf is split into n_layer chunks
    assert len(off.offload.chunks) > len(jax.tree.leaves(off.state.params))


def test_partial_offload_ratio_keeps_the_rest_on_device(fp32_pair):
    plain, l_plain, off, _ = fp32_pair
    part, l_part = _run(FP32_SCAN + OFFLOAD + ["zero_optimization.offload_optimizer.ratio=0.5"],
                        batches((1, 16, 33), 4))
    homes = part.offload.where
    assert set(homes) == {"pinned_host", "device"}
    kinds = [m.sharding.memory_kind for m in part.state.opt_state.master]
    assert kinds == homes
    np.testing.assert_allclose(l_part, l_plain, rtol=1e-6)
    host, full = part.memory_per_device()["host"], off.memory_per_device()["host"]
    assert 0.3 * full < host < 0.7 * full


def test_bf16_device_keeps_half_precision_weights_only():
    data = batches((1, 16, 33), 2)
    over = ["bf16.enabled=true", "zero_optimization.stage=3", "train_batch_size=16", "model.scan_layers=true"]
    plain, l_plain = _run(over, data)
    off, l_off = _run(over + OFFLOAD, data)
    assert {x.dtype for x in jax.tree.leaves(off.state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert off.memory_per_device()["params"] * 2 == plain.memory_per_device()["params"]
    # the forward sees the same bf16 weights; the gradients are bf16-rounded (as DeepSpeed's fp16/bf16 gradients
    # copied to the CPU optimizer) instead of fp32, which Adam's normalisation carries into later steps
    np.testing.assert_allclose(l_off[0], l_plain[0], rtol=1e-6)
    np.testing.assert_allclose(l_off, l_plain, rtol=1e-3)


def test_resume_is_exact_and_export_reads_the_masters(fp32_pair, tmp_path):
    _, _, off, _ = fp32_pair
    step = off.save_checkpoint(tmp_path)
    checkpoint.wait_until_finished()
    data = batches((1, 16, 33), 2, seed=5)
    after = [float(off.train_step(b)["loss"]) for b in data]
    again = jzero.initialize(load_config(base={}, overrides=BASE + FP32_SCAN + OFFLOAD))
    again.load_checkpoint(tmp_path, tag=step)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(again.state.opt_state)} == {"pinned_host"}
    want = again.offload.master_params(again.state.opt_state)
    assert [float(again.train_step(b)["loss"]) for b in data] == after
    # export (zero_to_fp32) of the offloaded checkpoint gives the fp32 masters of that step, re-stacked
    _, params, _ = export.load_params(tmp_path, step)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_fp16_overflow_leaves_masters_and_moments_untouched():
    over = ["fp16.enabled=true", "fp16.initial_scale_power=30", "fp16.hysteresis=1", "zero_optimization.stage=1",
            "train_batch_size=16"]
    with jax.default_matmul_precision("default"):
        eng = jzero.initialize(load_config(base={}, overrides=BASE + over + OFFLOAD))
        before = jax.tree.map(np.asarray, jax.device_get(eng.state.opt_state))
        m = eng.train_step(batches((1, 16, 33), 1)[0])
    after = jax.tree.map(np.asarray, jax.device_get(eng.state.opt_state))
    assert int(m["skipped_steps"]) == 1 and float(eng.state.loss_scale.scale) == 2.0 ** 29
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extra, key", [
    (["zero_optimization.stage=0"], "zero_optimization.stage to 1, 2 or 3"),
    (["zero_optimization.stage=1", "optimizer.type=Lamb"], "offloading Lamb is not implemented"),
    (["zero_optimization.stage=1", "mesh.pipeline=2", "model.scan_layers=true"], "mesh.pipeline"),
])
def test_unsupported_combinations_are_named(extra, key):
    with pytest.raises(ConfigError, match="offload_optimizer.device") as exc:
        jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16"] + extra + OFFLOAD))
    assert key in str(exc.value)


def test_param_offload_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match="offload_param.device.*use offload_optimizer"):
        jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16", "zero_optimization.stage=3",
                                                                "zero_optimization.offload_param.device=cpu"]))


def test_chunks_split_stacked_layers_and_restack():
    params = {"blocks": {"w": jax.ShapeDtypeStruct((3, 4, 5), jnp.float32)}, "wte": jax.ShapeDtypeStruct((7, 4),
                                                                                                       jnp.float32)}
    names = {"blocks": {"w": ("layers", "embed", "mlp")}, "wte": ("vocab", "embed")}
    chunks = plan_chunks(params, names)
    assert [(c.path, c.layer) for c in chunks] == [("blocks.w", 0), ("blocks.w", 1), ("blocks.w", 2), ("wte", None)]
    w = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    wte = np.ones((7, 4), np.float32)
    out = restack_masters([[c.path, c.layer] for c in chunks], [w[0], w[1], w[2], wte])
    np.testing.assert_array_equal(out["blocks.w"], w)
    np.testing.assert_array_equal(out["wte"], wte)


def test_weights_only_load_rebuilds_the_host_masters(fp32_pair, tmp_path):
    """load_module_only (and finetune.init_from, through Engine.set_params) under offload: the fp32 weights of
    a plain checkpoint become the host masters and the device copies; the moments start fresh. (Runs last: it
    replaces the module fixture's offloaded state.)"""
    plain, _, off, _ = fp32_pair
    step = plain.save_checkpoint(tmp_path)
    checkpoint.wait_until_finished()
    # the whole state cannot land: its moments are device arrays, this run keeps them in host chunks; the error
    # names the key that differs (not the optimizer type, which is the same)
    with pytest.raises(CheckpointError) as e:
        off.load_checkpoint(tmp_path, tag=step)
    assert str(e.value) == (f"checkpoint {tmp_path}/{step} was written with zero_optimization.offload_optimizer."
                            "device=none but this run has device=cpu; resume with device=none, or load only the "
                            "weights (load_module_only=True)")
    off.load_checkpoint(tmp_path, tag=step, load_module_only=True)
    masters = off.offload.master_params(off.state.opt_state)
    for a, b, d in zip(jax.tree.leaves(plain.state.params), jax.tree.leaves(masters), jax.tree.leaves(off.state.params)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(d), np.asarray(a))   # fp32 run: the device copy is exact
    mu = [s[0].mu for s in off.state.opt_state.inner]
    assert all(not np.asarray(m).any() for tree in mu for m in jax.tree.leaves(tree))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(off.state.opt_state)} == {"pinned_host"}
