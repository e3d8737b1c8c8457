"""Helpers several test files share (import them from here, not from another test file).

``BASE``: overrides of a tiny GPT-2 engine (2 layers, d 64, seq 32) that compiles in seconds on 8 fake devices;
``batches``: learnable token streams for it; ``compile_and_train``: a ZeRO-3 engine's compiled HLO and losses;
``masked_lm``: a loss averaged over a varying number of labelled tokens per row.
The 1-bit family's shared pieces: ``numpy_compressed_allreduce`` (NumPy model of DeepSpeed's
compressed_allreduce), ``_Car`` (it with error buffers over dicts), the shard_map stepper ``_run``, gradients, and
the compiled-HLO probes of the update and of an fp32 all-reduce.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jzero
from jzero.optim.comm import padded_size
from jzero.optim.onebit import local_params, onebit_state_specs
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


def masked_lm(eng, seed=0):
    """A loss averaged over a different number of labelled tokens per row (masked LM, padded token tags): the
    loss, the Task ``weight`` (its denominator), and a batch whose rows keep 5% .. 90% of their labels."""
    from jzero.tasks import IGNORE, masked_cross_entropy

    toks = batches((1, 16, 33), 1, seed=seed)[0][0]
    keep = np.random.default_rng(seed).random((16, 32)) < np.linspace(0.05, 0.9, 16)[:, None]
    batch = {"tokens": toks[:, :-1], "labels": np.where(keep, toks[:, 1:], IGNORE).astype(np.int32)}
    loss = lambda p, b: masked_cross_entropy(eng.model.apply({"params": p}, b["tokens"]), b["labels"])  # noqa: E731
    return loss, (lambda b: (b["labels"] != IGNORE).sum()), batch


# --------------------------------------------------------------------------- the 1-bit family (test_onebit, test_signsgd)

def numpy_compressed_allreduce(xs, worker_errors, server_errors, segments=None):
    """Reference: per rank lists in, (avg, new worker errors, new server errors) out; float32 throughout.

    Worker r compresses x_r + e_r per segment (scale = ||.||/sqrt(numel), sign(0) = +1); server r averages
    chunk r of every worker's compressed values, adds its error, compresses again; everyone gets all chunks.
    """
    n, size = len(xs), xs[0].size
    # (count, size): count segments of that size (a stacked leaf's layers), as jzero.optim.comm takes them
    segments = [x for s in (segments or [size]) for x in ([s] if np.ndim(s) == 0 else [s[1]] * s[0])]
    offsets = np.cumsum([0] + segments)

    def compress(v, sizes):
        out, off = np.empty_like(v), 0
        for s in sizes:
            seg = v[off:off + s]
            scale = np.float32(np.sqrt(np.sum(seg * seg, dtype=np.float32)) / np.sqrt(s))
            out[off:off + s] = scale * np.where(seg >= 0, np.float32(1), np.float32(-1))
            off += s
        return out

    compressed, new_we = [], []
    for x, e in zip(xs, worker_errors):
        v = (x + e).astype(np.float32)
        c = compress(v, segments)
        compressed.append(c)
        new_we.append(v - c)

    chunk_sizes = [s // n for s in segments]
    server_out, new_se = [], []
    for r in range(n):
        idx = np.concatenate([np.arange(o + r * c, o + (r + 1) * c) for o, c in zip(offsets, chunk_sizes)])
        y = (np.mean([c[idx] for c in compressed], axis=0, dtype=np.float32) + server_errors[r]).astype(np.float32)
        cy = compress(y, chunk_sizes)
        server_out.append((idx, cy))
        new_se.append(y - cy)
    avg = np.empty(size, np.float32)
    for idx, cy in server_out:
        avg[idx] = cy
    return avg, new_we, new_se


N = 8
PARAMS = _PARAMS = {"b": np.linspace(-0.5, 0.5, 6).astype(np.float32),
          "w": np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)}


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _stepper(tx, params, n):
    """jit(shard_map) of one engine-like step with given per-rank grads [n, ...]; also returns every rank's
    local params (what each rank's model is) as [n, ...]."""
    state = tx.init(params)
    rep = jax.tree.map(lambda _: P(), params)
    per_rank = jax.tree.map(lambda _: P("data"), params)
    specs = onebit_state_specs(state)

    def body(p, s, g):
        updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
        p = optax.apply_updates(p, updates)
        return p, s, jax.tree.map(lambda x: x[None], local_params(p, s))

    step = jax.jit(jax.shard_map(body, mesh=_mesh(n), in_specs=(rep, specs, per_rank),
                                 out_specs=(rep, specs, per_rank), axis_names={"data"}))
    return step, state


def _run(tx, grads_seq, n=N, params=PARAMS, history=False):
    """Steps through grads_seq; returns params, state and each rank's local params (after every step if
    history, else after the last)."""
    step, state = _stepper(tx, params, n)
    p, seen = params, []
    for g in grads_seq:
        p, state, p_local = step(p, state, g)
        seen.append(({k: np.asarray(v) for k, v in p.items()}, {k: np.asarray(v) for k, v in p_local.items()}))
    return (seen, state) if history else (p, state, seen[-1][1])


def _grads(steps, n=N, seed=0, params=None):
    rng = np.random.default_rng(seed)
    # a shared signal plus per-rank noise, as data-parallel gradients look
    return [{k: (rng.standard_normal(v.shape) + 0.5 * rng.standard_normal((n,) + v.shape)).astype(np.float32)
             for k, v in (PARAMS if params is None else params).items()} for _ in range(steps)]


# ----------------------------------------------------------------------------- NumPy references
def _flat(tree, n, fused):
    leaves = [np.ravel(x).astype(np.float32) for x in jax.tree.leaves(tree)]
    if fused:
        flat = np.concatenate(leaves)
        return np.pad(flat, (0, padded_size(flat.size, n) - flat.size)), [padded_size(flat.size, n)]
    parts = [np.pad(x, (0, padded_size(x.size, n) - x.size)) for x in leaves]
    return np.concatenate(parts), [x.size for x in parts]


def unroll_layers(tree, key, axis=0):
    """A dict with leaf ``key`` stacked over layers (on ``axis``) -> the same with one leaf per layer, ``key_0``,
    ``key_1``, ... in its place (sorted keys keep the flat order: fewer than 10 layers)."""
    out = {k: v for k, v in tree.items() if k != key}
    out.update({f"{key}_{i}": np.take(np.asarray(tree[key]), i, axis=axis) for i in range(tree[key].shape[axis])})
    return out


def _unflat(flat, like, n, fused):
    out, off = {}, 0
    for k in sorted(like):
        size = like[k].size
        out[k] = flat[off:off + size].reshape(like[k].shape)
        off += size if fused else padded_size(size, n)
    return out


def _clip(tree, max_norm):
    """DeepSpeed's gradient_clipping on a dict of arrays (0 = off)."""
    if not max_norm:
        return tree
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in tree.values()))
    return {k: x * np.float32(min(1.0, max_norm / (norm + 1e-6))) for k, x in tree.items()}


class _Car:
    """The NumPy compressed all-reduce with its per-rank error buffers, over dicts of per-rank trees."""

    def __init__(self, like, n, fused=False):
        self.like, self.n, self.fused = like, n, fused
        size = _flat(like, n, fused)[0].size
        self.we, self.se = [np.zeros(size, np.float32)] * n, [np.zeros(size // n, np.float32)] * n

    def __call__(self, trees):
        flats = [_flat(t, self.n, self.fused) for t in trees]
        avg, self.we, self.se = numpy_compressed_allreduce([f for f, _ in flats], self.we, self.se, flats[0][1])
        return _unflat(avg, self.like, self.n, self.fused)


def _close(actual, desired, tol=2e-5):
    for k in desired:
        np.testing.assert_allclose(np.asarray(actual[k]), desired[k], rtol=tol, atol=tol, err_msg=k)


def _compiled_update_hlo(tx, params):
    step, state = _stepper(tx, params, N)
    grads = jax.tree.map(lambda x: np.zeros((N,) + x.shape, np.float32), params)
    return step.lower(params, state, grads).compile().as_text()


def _fp32_allreduce_hlo(params):
    def body(g):
        return jax.lax.pmean(jax.tree.map(lambda x: x[0], g), "data")
    f = jax.jit(jax.shard_map(body, mesh=_mesh(N), in_specs=(jax.tree.map(lambda _: P("data"), params),),
                              out_specs=jax.tree.map(lambda _: P(), params), axis_names={"data"}))
    return f.lower(jax.tree.map(lambda x: np.zeros((N,) + x.shape, np.float32), params)).compile().as_text()


BIG = {"w1": np.zeros((64, 256), np.float32), "b1": np.zeros((256,), np.float32),
       "w2": np.zeros((256, 64), np.float32)}


# --------------------------------------------------------------------------- NumPy / model references


def numpy_block_quantize(x, block):
    xb = x.astype(np.float32).reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    scale = np.abs(xb).max(-1) / np.float32(127.0)
    q = np.clip(np.round(xb / np.where(scale > 0, scale, 1)[..., None]), -127, 127).astype(np.int8)
    return q, scale


def random_params(model, *inputs, seed=0, std=0.3):
    """Init's tree with larger random values (norm scales near 1), so every part of the math moves the output."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"])
    rng = np.random.default_rng(seed)

    def one(path, s):
        mean = 1.0 if str(getattr(path[-1], "key", "")) == "scale" else 0.0
        return rng.normal(mean, std, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, shapes)


def assert_config_round_trip(path, written=None):
    """A run's own config.json loads back with --config and resolves to itself (``written``: the main's own
    config -> dict, default :func:`jzero.config.to_dict`)."""
    from jzero.config import load_config, resolve, to_dict
    from jzero.engine import check_supported

    again = resolve(load_config(path), 8)
    check_supported(again)
    assert (written or to_dict)(again) == json.loads(path.read_text()) and again.start_notes() == []
