"""Engine: ZeRO stages 0-3 give the same losses as each other, accumulation equals one big batch,
and each stage really changes the compiled program / the bytes each device holds."""
import re

import jax
import numpy as np
import pytest

import jzero
from jzero.config import load_config
from jzero.errors import ConfigError
from helpers import BASE, batches

STEPS = 20


def train(overrides, data=None, steps=STEPS):
    eng = jzero.initialize(load_config(base={}, overrides=BASE + overrides))
    data = data if data is not None else batches(eng.batch_shape(), steps)
    losses = [float(eng.train_step(b)["loss"]) for b in data]
    return eng, np.array(losses)


@pytest.fixture(scope="module")
def stages():
    data = batches((2, 8, 33), STEPS)
    return {s: train([f"zero_optimization.stage={s}", "train_batch_size=16", "gradient_accumulation_steps=2"], data)
            for s in range(4)}


def test_zero_stages_same_losses(stages):
    ref = stages[0][1]
    assert ref[-1] < ref[0] - 0.5, f"loss should fall: {ref}"
    for s in (1, 2, 3):
        rel = np.max(np.abs(stages[s][1] - ref) / np.abs(ref))
        assert rel <= 1e-5, f"stage {s} differs from stage 0 by {rel:.2e} relative"


def test_zero_memory_per_device(stages):
    mem = {s: eng.memory_per_device() for s, (eng, _) in stages.items()}
    for s in (1, 2, 3):
        assert mem[s]["opt_state"] <= 0.2 * mem[0]["opt_state"], mem
    assert mem[3]["params"] <= 0.2 * mem[0]["params"], mem
    assert mem[1]["params"] == mem[2]["params"] == mem[0]["params"]


def test_each_stage_changes_the_compiled_program(stages):
    compiled = {s: eng.compile() for s, (eng, _) in stages.items()}
    mem = {s: c.memory_analysis() for s, c in compiled.items()}
    hlo = {s: c.as_text() for s, c in compiled.items()}
    # stage 1: optimizer state arrives partitioned (argument bytes fall), updated params are all-gathered
    assert mem[1].argument_size_in_bytes < 0.6 * mem[0].argument_size_in_bytes
    assert "all-gather" in hlo[1] and "all-gather" not in hlo[0]
    # stage 2: the micro-batch gradient accumulator is partitioned (temp bytes fall)
    assert mem[2].temp_size_in_bytes < 0.85 * mem[1].temp_size_in_bytes
    # stage 3: params arrive partitioned, and are gathered inside the layer loop (a while body)
    assert mem[3].argument_size_in_bytes < 0.5 * mem[1].argument_size_in_bytes
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo[3]))
    comps = {c.split(" ", 1)[0].lstrip("%"): c for c in hlo[3].split("\n\n") if c.startswith("%")}
    loop_bodies = [comps[b] for b in bodies if b in comps]
    assert any("all-gather" in b for b in loop_bodies), "stage 3 should all-gather params inside the scanned body"


def test_a_wrong_train_batch_is_one_line_naming_what_was_expected(stages):
    """A notebook user's batch: a missing accumulation axis, floats, an id past the vocabulary or a dict where one
    array is expected fail before the step, naming the expected shape/dtype/range (a float cast would truncate ids,
    an out-of-vocabulary id would be clamped by the embedding and train on another token, silently)."""
    from jzero.errors import DataError

    eng = stages[0][0]
    ok = batches((2, 8, 33), 1)[0]
    vocab = eng.model_config.vocab_size
    cases = [(ok[0], "train batch tokens: shape (8, 33), expected (2, 8, 33) = [gradient_accumulation_steps, rows "
                     "per process (train_batch_size / accumulation / processes), seq_len + 1]"),
             (ok.astype(np.float32), "train batch tokens: dtype float32, expected integer token ids (int32)"),
             (np.where(ok == ok.flat[0], vocab, ok), f"train batch tokens: token id {vocab} is outside the model's "
                                                   f"vocabulary 0..{vocab - 1}"),
             ({"tokens": ok}, "train batch: a dict of tokens, expected one array"),
             (jax.numpy.asarray(ok[0]), "train batch tokens: int32[8, 33], expected int32[2, 8, 33]")]
    step = int(eng.state.step)
    for batch, message in cases:
        with pytest.raises(DataError) as e:
            eng.train_step(batch)
        assert str(e.value).startswith(message), str(e.value)
    assert int(eng.state.step) == step   # nothing ran
    for batch, message in [(ok[0, :3], "eval batch tokens: 3 rows do not split over the 8 devices of the data axes; "
                                       "give a multiple of 8 rows"),
                           (ok, "eval batch tokens: shape (2, 8, 33), expected (rows, 33)"),
                           (ok[0] * 0 - 1, "eval batch tokens: token id -1 is outside the model's vocabulary"),
                           (ok[0].astype(float), "eval batch tokens: dtype float64, expected integer token ids")]:
        with pytest.raises(DataError) as e:
            eng.eval_step(batch)
        assert str(e.value).startswith(message), str(e.value)
    assert np.isfinite(float(eng.eval_step(ok[0])))
    # eval batches already on the devices: shape and dtype checked (metadata only), another sharding moved
    dev = jax.numpy.asarray
    for batch, message in [(dev(ok), "eval batch tokens: int32[2, 8, 33], expected int32[rows, 33]"),
                           (dev(ok[0].astype(np.float32)), "eval batch tokens: float32[8, 33], expected int32"),
                           (dev(ok[0, :3]), "eval batch tokens: 3 rows do not split over the 8 devices")]:
        with pytest.raises(DataError) as e:
            eng.eval_step(batch)
        assert str(e.value).startswith(message), str(e.value)
    want = float(eng.eval_step(ok[0]))
    assert float(eng.eval_step(jax.device_put(ok[0], jax.devices()[1]))) == want   # one device -> data-sharded
    assert float(eng.eval_step(jax.device_put(ok[0], eng.plan.replicated))) == want


def test_a_device_batch_with_another_sharding_is_placed_like_numpy_rows():
    a = jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16"]))
    b = jzero.initialize(load_config(base={}, overrides=BASE + ["train_batch_size=16"]))
    batch = batches(a.batch_shape(), 1)[0]
    want = float(a.train_step(batch)["loss"])
    assert float(b.train_step(jax.device_put(batch, jax.devices()[3]))["loss"]) == want
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a.state.params)),
                                                    jax.tree.leaves(jax.device_get(b.state.params))))


def test_a_client_optimizer_is_clipped_and_needs_its_schedule():
    """initialize(tx=, schedule=): gradient_clipping is chained before tx (DeepSpeed clips before a client
    optimizer); tx without schedule (or the reverse) is one line, not a TypeError at the first step."""
    import optax

    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16", "gradient_clipping=0.001"])
    batch = batches((1, 16, 33), 1)[0]
    eng = jzero.initialize(cfg, tx=optax.sgd(1.0), schedule=optax.constant_schedule(1.0))
    before = jax.device_get(eng.state.params)
    metrics = eng.train_step(batch)
    after = jax.device_get(eng.state.params)
    moved = np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in
                        zip(jax.tree.leaves(after), jax.tree.leaves(before))))
    assert float(metrics["grad_norm"]) > 1.0 and abs(moved - 0.001) < 1e-6, (float(metrics["grad_norm"]), moved)
    for kwargs, message in [({"tx": optax.sgd(0.1)}, "initialize: tx= given without schedule=; pass both"),
                            ({"schedule": lambda c: 0.5}, "initialize: schedule= given without tx=; pass both")]:
        with pytest.raises(ConfigError) as e:
            jzero.initialize(cfg, **kwargs)
        assert str(e.value).startswith(message), str(e.value)


def test_a_model_passed_in_keeps_the_vocabulary_check():
    """A model built outside (initialize(model=m)) has no model_config: its own cfg gives the vocabulary, so an
    out-of-vocabulary id is still one DataError line, not a NaN loss; vocab_size= with a model is refused."""
    import models
    from jzero.errors import DataError

    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16"])
    model, _ = models.build_model(cfg.model, vocab_size=256, seq_len=32)
    eng = jzero.initialize(cfg, model=model)
    assert eng.model_config is None and eng.vocab_size == 256
    bad = np.full(eng.batch_shape(), 999, np.int32)
    with pytest.raises(DataError, match="train batch tokens: token id 999 is outside the model's vocabulary 0..255"):
        eng.train_step(bad)
    with pytest.raises(DataError, match="eval batch tokens: token id 999 is outside the model's vocabulary 0..255"):
        eng.eval_step(bad[0])
    with pytest.raises(ConfigError, match=r"initialize: vocab_size=1000 is for the model built from the config; "
                                          r"with a model passed in, its own config sets the vocabulary"):
        jzero.initialize(cfg, model=model, vocab_size=1000)


def test_accumulation_equals_one_big_batch():
    big = batches((1, 32, 33), STEPS, seed=1)
    micro = [b.reshape(4, 8, 33) for b in big]
    _, l_big = train(["train_batch_size=32", "gradient_accumulation_steps=1", "zero_optimization.stage=2"], big)
    _, l_acc = train(["train_batch_size=32", "gradient_accumulation_steps=4", "zero_optimization.stage=2"], micro)
    rel = np.max(np.abs(l_acc - l_big) / l_big)
    assert rel <= 1e-5, rel


def test_eval_step_matches_train_loss_before_update():
    eng, _ = train(["train_batch_size=16"], data=[], steps=0)
    b = batches((1, 16, 33), 1)[0]
    ev = float(eng.eval_step(b[0]))
    tr = float(eng.train_step(b)["loss"])
    assert abs(ev - tr) / tr < 1e-6


def test_cross_entropy_matches_optax_value_and_gradient():
    import jax.numpy as jnp
    import optax

    from jzero.engine import cross_entropy

    k1, k2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(k1, (2, 5, 11)) * 3
    labels = jax.random.randint(k2, (2, 5), 0, 11)
    ours = lambda x: cross_entropy(x, labels).mean()  # noqa: E731
    ref = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()  # noqa: E731
    np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-7)
    # bf16 logits: the gradient comes back in bf16, close to the fp32 reference
    g16 = jax.grad(lambda x: cross_entropy(x, labels).mean())(logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), jax.grad(ref)(logits), atol=2e-3)


@pytest.mark.parametrize("overrides", [["zero_optimization.stage=3"], ["zero_optimization.stage=1", "mesh.tensor=2"],
                                       ["optimizer.type=OneBitAdam", "zero_optimization.stage=0"]])
def test_abstract_engine_lowers_the_same_program(overrides):
    """initialize(abstract=True) allocates nothing, and its step lowers to the very program of the real engine."""
    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16"] + overrides)
    real, abstract = jzero.initialize(cfg), jzero.initialize(cfg, abstract=True)
    leaves = jax.tree.leaves(abstract.state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(real.state)] == \
        [(x.shape, x.dtype, x.sharding) for x in leaves]
    assert abstract.lower_train_step().as_text() == real.lower_train_step().as_text()


def test_abstract_engine_refuses_offload():
    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16", "zero_optimization.stage=2",
                                                 "zero_optimization.offload_optimizer.device=cpu"])
    with pytest.raises(ConfigError, match=r"abstract=True\): optimizer offload"):
        jzero.initialize(cfg, abstract=True)


def test_bf16_engine_keeps_weight_copies_and_trains_as_the_casting_step(monkeypatch):
    """Under bf16 the state holds a bf16 copy of each weight matrix (TrainState.compute), equal to the masters
    cast after every step, and the losses are those of the step that casts the masters itself
    (JZERO_WEIGHT_COPIES=0): the same first step bit for bit, then equal to fp32 rounding of the update."""
    over = ["bf16.enabled=true", "train_batch_size=16"]
    data = batches((1, 16, 33), 4)
    eng, losses = train(over, data, steps=4)
    assert eng.strategy.copy_dtype == jax.numpy.bfloat16
    flat_p = jax.tree.leaves(eng.state.params)
    flat_m = jax.tree.leaves(eng.strategy.copy_matrices)
    copies = jax.tree.leaves(eng.state.compute)
    assert len(copies) == sum(flat_m) > 0 and all(c.dtype == jax.numpy.bfloat16 for c in copies)
    for c, p in zip(copies, [p for p, m in zip(flat_p, flat_m) if m]):
        assert c.sharding == p.sharding
        assert np.array_equal(np.asarray(c, np.float32), np.asarray(p.astype(jax.numpy.bfloat16), np.float32))
    monkeypatch.setenv("JZERO_WEIGHT_COPIES", "0")
    plain, ref = train(over, data, steps=4)
    assert plain.strategy.copy_dtype is None and plain.state.compute is None
    assert losses[0] == ref[0]
    assert np.max(np.abs(losses - ref) / np.abs(ref)) <= 1e-5, (losses, ref)


def test_weight_copies_only_where_the_plain_gradient_path_runs(monkeypatch):
    """Copies under bf16/fp16 for jzero's own models; none in fp32, for a model passed in, under the pipeline
    or ZeRO++ hpZ (their manual regions take the fp32 masters), or with JZERO_WEIGHT_COPIES=0."""
    from jzero import engine as E
    from jzero.config import resolve

    def dtype(over, own=True):
        cfg = resolve(load_config(base={}, overrides=BASE + ["train_batch_size=16"] + over), 8)
        return E._copy_dtype(cfg, E.build_layout(cfg), own)

    assert dtype(["bf16.enabled=true"]) == jax.numpy.bfloat16
    assert dtype(["fp16.enabled=true"]) == jax.numpy.float16
    assert dtype([]) is None
    assert dtype(["bf16.enabled=true"], own=False) is None
    assert dtype(["bf16.enabled=true", "mesh.data=4", "mesh.pipeline=2"]) is None
    hpz = ["zero_optimization.stage=3", "zero_optimization.zero_hpz_partition_size=2"]
    assert dtype(["bf16.enabled=true"] + hpz) is None
    monkeypatch.setenv("JZERO_WEIGHT_COPIES", "0")
    assert dtype(["bf16.enabled=true"]) is None
    monkeypatch.setenv("JZERO_WEIGHT_COPIES", "off")
    with pytest.raises(ConfigError, match="JZERO_WEIGHT_COPIES='off': use 0"):
        dtype(["bf16.enabled=true"])


def test_rules_passed_in_must_agree_with_sequence_parallel():
    """rules= replaces the table mesh.sequence_parallel picks: one that contradicts it is refused, not a run that
    reports sequence parallelism on and plans without it."""
    from jzero import sharding as shd

    cfg = load_config(base={}, overrides=BASE + ["train_batch_size=16", "mesh.data=4", "mesh.tensor=2",
                                                 "mesh.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"initialize: rules= map 'residual_length' to None but "
                                          r"mesh.sequence_parallel=true; pass rules that shard it over 'tensor'"):
        jzero.initialize(cfg, rules=shd.DEFAULT_RULES, abstract=True)
    off = load_config(base={}, overrides=BASE + ["train_batch_size=16", "mesh.data=4", "mesh.tensor=2"])
    with pytest.raises(ConfigError, match=r"mesh.sequence_parallel=false; pass rules that do not shard it"):
        jzero.initialize(off, rules=shd.SEQUENCE_PARALLEL_RULES, abstract=True)
    assert jzero.initialize(cfg, rules=shd.SEQUENCE_PARALLEL_RULES, abstract=True).plan is not None
