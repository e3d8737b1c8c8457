"""Helpers several test files share (import them from here, not from another test file).

``BASE``: overrides of a tiny GPT-2 engine (2 layers, d 64, seq 32) that compiles in seconds on 8 fake devices;
``batches``: learnable token streams for it; ``compile_and_train``: a ZeRO-3 engine's compiled HLO and losses.
"""

import numpy as np

import jzero
from jzero.config import load_config

BASE = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
        "data.seq_len=32", "zero_optimization.stage3_param_persistence_threshold=0",
        "optimizer.params.lr=3e-3", "gradient_clipping=1.0"]
ZERO3 = BASE + ["zero_optimization.stage=3", "train_batch_size=16"]


def batches(shape, steps, seed=0):
    """Learnable token streams (arithmetic sequences mod 64) so the loss moves."""
    rng = np.random.default_rng(seed)
    A, B, T = shape
    out = []
    for _ in range(steps):
        start = rng.integers(0, 64, size=(A, B, 1))
        stride = rng.integers(1, 4, size=(A, B, 1))
        out.append(((start + stride * np.arange(T)) % 64).astype(np.int32))
    return out


def compile_and_train(extra, steps=2):
    """ZeRO-3 + ``extra`` overrides: (engine, compiled step's HLO text, losses of ``steps`` steps)."""
    eng = jzero.initialize(load_config(base={}, overrides=ZERO3 + extra))
    hlo = eng.compile().as_text()
    losses = [float(eng.train_step(b)["loss"]) for b in batches(eng.batch_shape(), steps)]
    return eng, hlo, np.array(losses)
