"""1-bit optimizers inside the engine: a shard_map-over-data step with local gradients and packed-bit exchange."""
import jax
import numpy as np
import pytest

import jzero
from jzero.config import load_config
from jzero.errors import ConfigError
from helpers import BASE, batches

COMMON = ["train_batch_size=16", "gradient_clipping=0", "optimizer.params.weight_decay=0",
          "optimizer.params.lr=3e-3", "optimizer.params.betas=[0.9,0.999]"]


def run(opt, extra=(), steps=8):
    cfg = load_config(base={}, overrides=BASE + COMMON + [f"optimizer.type={opt}"] + list(extra))
    eng = jzero.initialize(cfg)
    return eng, np.array([float(eng.train_step(b)["loss"]) for b in batches((1, 16, 33), steps)])


@pytest.fixture(scope="module")
def runs():
    return {"adam": run("Adam", ["optimizer.params.adam_w_mode=false"]),
            "onebit": run("OneBitAdam", ["optimizer.params.freeze_step=4"])}


def test_warmup_equals_adam_then_compression_keeps_training(runs):
    adam, onebit = runs["adam"][1], runs["onebit"][1]
    np.testing.assert_allclose(onebit[:5], adam[:5], rtol=1e-5)   # steps 0-3 exact Adam; step 4 sees their result
    assert np.isfinite(onebit).all() and onebit[-1] < onebit[0]
    assert np.max(np.abs(onebit - adam) / adam) < 0.05


def test_compiled_step_moves_packed_bits(runs):
    hlo = runs["onebit"][0].compile().as_text()
    lines = [line for line in hlo.splitlines() if "all-to-all" in line and "u8[" in line]
    assert lines, "the compression stage should exchange uint8 sign bits with all-to-all"


def test_onebit_with_zero_is_a_clear_error():
    cfg = load_config(base={}, overrides=BASE + COMMON + ["optimizer.type=OneBitAdam", "zero_optimization.stage=1"])
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        jzero.initialize(cfg)


def as_accumulation(batch_1x16):
    """The same 16 rows as 2 micro-batches of 8 with every data rank keeping its own 2 rows (rank r had rows
    2r, 2r+1; now row 2r in micro-batch 0 and 2r+1 in micro-batch 1): each rank's local gradient is unchanged."""
    return batch_1x16.reshape(8, 2, -1).transpose(1, 0, 2)


def test_gradient_accumulation_inside_the_onebit_step_equals_one_micro_batch(runs):
    """gradient_accumulation_steps=2 scans the micro-batches inside the shard_map (a varying carry): the same
    rows per rank give the accum=1 run's losses, through warm-up and the compressed stage."""
    cfg = load_config(base={}, overrides=BASE + COMMON + ["optimizer.type=OneBitAdam", "optimizer.params.freeze_step=4",
                                                          "gradient_accumulation_steps=2"])
    eng = jzero.initialize(cfg)
    assert eng.batch_shape() == (2, 8, 33)
    losses = np.array([float(eng.train_step(as_accumulation(b))["loss"]) for b in batches((1, 16, 33), 8)])
    np.testing.assert_allclose(losses[:5], runs["onebit"][1][:5], rtol=1e-5)
    np.testing.assert_allclose(losses, runs["onebit"][1], rtol=2e-3)


def _tiny_gpt2(opt, scan_layers, extra):
    return jzero.initialize(load_config(base={}, overrides=[
        "model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.d_ff=128", "data.seq_len=16",
        "train_batch_size=8", "gradient_clipping=0", f"optimizer.type={opt}", "optimizer.params.lr=0.01",
        f"model.scan_layers={str(scan_layers).lower()}"] + list(extra)))


@pytest.mark.parametrize("opt,extra,steps", [
    ("OneBitAdam", ["optimizer.params.freeze_step=1"], 2),                       # step 2: compressed momentum
    ("ZeroOneAdam", ["optimizer.params.var_freeze_step=10", "optimizer.params.var_update_scaler=1"], 3),  # 3: 1-bit
])
def test_scanned_model_compresses_each_layer_as_the_unrolled_model(opt, extra, steps):
    """The same weights (layer 1 = 10x layer 0) stacked ('layers' leaves, scan_layers) or unrolled (a leaf per
    layer) give each layer the same update on the first 1-bit compressed step: the engine passes the stacking, and
    each layer has its own compression scales, as DeepSpeed's per-parameter compressed_allreduce. (One scale per
    stacked leaf gave the layers updates ~200-1000x off.) Not bit-equal: the two programs' gradients differ by float
    rounding, and a 1-bit code flips the sign of the odd near-zero element."""
    eng = _tiny_gpt2(opt, True, extra)
    scanned = jax.tree.map(np.asarray, eng.master_params())
    ten = lambda x: x * np.array([1.0, 10.0], np.float32).reshape((2,) + (1,) * (x.ndim - 1))  # noqa: E731
    scanned["blocks"] = jax.tree.map(ten, scanned["blocks"])
    unrolled = {k: v for k, v in scanned.items() if k != "blocks"}
    unrolled.update({f"block_{i}": jax.tree.map(lambda x: x[i], scanned["blocks"]) for i in range(2)})
    uneng = _tiny_gpt2(opt, False, extra)
    eng.set_params(scanned)
    uneng.set_params(unrolled)
    for b in batches(eng.batch_shape(), steps, seed=7):
        before_s, before_u = (jax.tree.map(np.asarray, e.master_params()) for e in (eng, uneng))
        eng.train_step(b)
        uneng.train_step(b)
    after_s, after_u = (jax.tree.map(np.asarray, e.master_params()) for e in (eng, uneng))
    upd_s = jax.tree.map(lambda a, b: a - b, after_s["blocks"], before_s["blocks"])
    for i in range(2):
        upd_u = jax.tree.map(lambda a, b: a - b, after_u[f"block_{i}"], before_u[f"block_{i}"])
        for (path, s), u in zip(jax.tree_util.tree_flatten_with_path(upd_s)[0], jax.tree.leaves(upd_u)):
            name = f"{jax.tree_util.keystr(path)}[layer {i}]"
            assert abs(np.linalg.norm(s[i]) / np.linalg.norm(u) - 1) < 0.03, name   # the layer's scale sets it
            assert np.linalg.norm(s[i] - u) <= 0.05 * np.linalg.norm(u), name
