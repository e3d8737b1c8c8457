"""1-bit optimizers inside the engine: a shard_map-over-data step with local gradients and packed-bit exchange."""
import numpy as np
import pytest

import jzero
from jzero.config import load_config
from jzero.errors import ConfigError
from test_engine import BASE, batches

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
