"""Pipeline parallelism: pipelined training equals the un-pipelined model, each pipeline device stores only its
stages' layers, the stages talk by collective-permute, and bad settings fail with the numbers in the message.

The engine runs (module fixtures, one compile each) train the same 8-layer GPT for 10 steps on the same batches:
the reference on a plain data-parallel mesh, the others with pipeline=2 / 4, gpipe / circular, ZeRO 0-3, remat,
and data=2 x tensor=2 x pipeline=2. The optimizer is SGD whose state keeps the step's gradient
(``optax.trace(decay=0)``), so every step's full gradient is compared without another compile, and fp32 rounding
differences are not blown up the way Adam's normalised update does to near-zero gradients.
"""
import re
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jzero
from jzero import pipeline as pp
from jzero import sharding as shd
from jzero.config import load_config
from jzero.errors import ConfigError
from jzero.mesh import make_mesh
from helpers import batches
from train.bubble import bubble_report

STEPS, LAYERS, ACCUM, LR = 10, 8, 4, 0.5
BASE = ["model.preset=gpt2-tiny", f"model.n_layer={LAYERS}", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
        "data.seq_len=24", "zero_optimization.stage3_param_persistence_threshold=0", "train_batch_size=16",
        f"gradient_accumulation_steps={ACCUM}"]
CONFIGS = {   # pipeline=2 and 4, gpipe and circular, ZeRO 0-3, remat, and data=2 x tensor=2 x pipeline=2
    "d4p2-gpipe-zero1-remat": ["mesh.data=4", "mesh.pipeline=2", "zero_optimization.stage=1",
                               "activation_checkpointing.policy=full"],
    "d2p4-gpipe-zero0": ["mesh.data=2", "mesh.pipeline=4", "zero_optimization.stage=0"],
    "d2p4-circular-zero2-remat": ["mesh.data=2", "mesh.pipeline=4", "pipeline.schedule=circular",
                                  "pipeline.repeats=2", "zero_optimization.stage=2",
                                  "activation_checkpointing.policy=save_dots"],
    "d2t2p2-circular-zero3": ["mesh.data=2", "mesh.tensor=2", "mesh.pipeline=2", "pipeline.schedule=circular",
                              "pipeline.repeats=2", "zero_optimization.stage=3"],
}
DATA = batches((ACCUM, 4, 25), STEPS)
EVAL = batches((1, 4, 25), 1, seed=7)[0][0]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sgd_keeping_grads():
    """SGD at LR whose state is the last gradient (trace with decay 0)."""
    return optax.chain(optax.trace(decay=0.0), optax.scale(-LR)), (lambda step: LR)


def train(overrides, mesh=None):
    tx, schedule = sgd_keeping_grads()
    eng = jzero.initialize(load_config(base={}, overrides=BASE + overrides), mesh=mesh, tx=tx, schedule=schedule)
    out = {"engine": eng, "loss": [], "grad_norm": [], "grads": []}
    for b in DATA:
        m = eng.train_step(b)
        out["loss"].append(float(m["loss"]))
        out["grad_norm"].append(float(m["grad_norm"]))
        out["grads"].append([np.asarray(g) for g in jax.tree.leaves(eng.state.opt_state[0].trace)])
    out["params"] = [np.asarray(x) for x in jax.tree.leaves(eng.state.params)]
    return out


@pytest.fixture(scope="module")
def ref():
    return train([], mesh=make_mesh({"data": 4}, devices=jax.devices()[:4]))


@pytest.fixture(scope="module", params=list(CONFIGS))
def piped(request):
    return request.param, train(CONFIGS[request.param])


def test_loss_and_grad_norm_equal_unpipelined_over_10_steps(ref, piped):
    name, run = piped
    assert ref["loss"][-1] < ref["loss"][0] - 0.3, ref["loss"]
    loss_rel = np.max(np.abs(np.array(run["loss"]) - ref["loss"]) / np.array(ref["loss"]))
    gn_rel = np.max(np.abs(np.array(run["grad_norm"]) - ref["grad_norm"]) / np.array(ref["grad_norm"]))
    print(f"{name}: loss rel {loss_rel:.2e}, grad_norm rel {gn_rel:.2e}")
    assert loss_rel <= 1e-5 and gn_rel <= 1e-5, (name, loss_rel, gn_rel)


def test_gradients_equal_unpipelined_over_10_steps(ref, piped):
    """Every step's gradient, leaf by leaf (norm of the difference over the norm), and the params after 10."""
    name, run = piped
    grads = max(rel(a, b) for step, step_ref in zip(run["grads"], ref["grads"]) for a, b in zip(step, step_ref))
    params = max(rel(a, b) for a, b in zip(run["params"], ref["params"]))
    print(f"{name}: worst gradient leaf rel {grads:.2e} over {STEPS} steps, params after {STEPS} steps {params:.2e}")
    assert grads <= 1e-5 and params <= 1e-5, (name, grads, params)


def test_param_bytes_per_device_fall_by_stage_count(ref, piped):
    name, run = piped
    eng = run["engine"]
    S, D = eng.config.mesh.pipeline, eng.config.mesh.data
    z = eng.config.zero_optimization.stage
    stack, stack_ref = (shd.per_device_bytes(e.state.params["blocks"]) for e in (eng, ref["engine"]))
    total, total_ref = shd.per_device_bytes(eng.state.params), shd.per_device_bytes(ref["engine"].state.params)
    print(f"{name}: stack bytes/device {stack} vs {stack_ref} un-pipelined; all params {total} vs {total_ref}")
    # the tensor axis splits heads / mlp leaves too; ZeRO-3 splits every stacked leaf over data
    split = S * (D if z == 3 else 1)
    if eng.config.mesh.tensor == 1:
        assert stack * split == stack_ref, (stack, stack_ref, split)
    else:
        assert stack * split < stack_ref, (stack, stack_ref, split)
    assert total <= (total_ref - stack_ref) + stack_ref / split


def whole_stack_collectives(hlo: str, leaves, shardings, n_layer: int, R: int, S: int) -> list[str]:
    """Collective results holding a whole layer stack: ``[n_layer, ...]`` or circular's ``[R, S, n_layer/(R*S),
    ...]`` over a leaf's other dims, whole or as split by its compute / storage sharding (tensor, ZeRO)."""
    targets = set()
    for leaf, shardings_of_leaf in zip(leaves, list(zip(*shardings)) or [()] * len(leaves)):
        rests = {leaf.shape[1:]} | {sh.shard_shape(leaf.shape)[1:] for sh in shardings_of_leaf}
        targets |= {lead + rest for rest in rests for lead in ((n_layer,), (R, S, n_layer // (R * S)))}
    found = []
    for m in re.finditer(r"= f32\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all|collective-permute)", hlo):
        if tuple(int(d) for d in m.group(1).split(",") if d) in targets:
            found.append(m.group(0))
    return found


def test_stages_talk_by_collective_permute_and_never_gather_the_stack(piped):
    """The hand-off is a collective-permute; no collective ever produces a whole layer stack."""
    name, run = piped
    eng = run["engine"]
    hlo = eng.compile().as_text()
    assert "collective-permute" in hlo, name
    found = whole_stack_collectives(
        hlo, jax.tree.leaves(eng.state.params["blocks"]),
        [jax.tree.leaves(t["blocks"]) for t in (eng.plan.param_compute, eng.plan.param_storage)],
        LAYERS, eng.config.pipeline.repeats, eng.config.mesh.pipeline)
    assert not found, (name, found[:3])


def test_eval_equals_unpipelined(ref, piped):
    """4 eval rows: pipelined as 2 micro-batches on d2t2p2 (4 % (2*2) == 0); on d2p4 (4 % (4*2) != 0) the plain
    scanned stack runs over the pipeline-sharded params. Both engines hold (nearly) the same trained params."""
    name, run = piped
    if name not in ("d2t2p2-circular-zero3", "d2p4-gpipe-zero0"):
        pytest.skip("one engine per eval path")
    eng = run["engine"]
    micro = pp.eval_micro_batches(EVAL.shape[0], eng.pipeline.spec, eng.config.mesh.data)
    assert micro == (2 if name.startswith("d2t2p2") else None)
    a, b = float(eng.eval_step(EVAL)), float(ref["engine"].eval_step(EVAL))
    print(f"{name}: eval loss {a:.7f} vs {b:.7f} un-pipelined")
    assert abs(a - b) / b <= 1e-5, (a, b)


# --------------------------------------------------------------------------- the loop itself, no engine


def _toy_layer(p, carry):
    h, mask = carry          # a pytree carry, like BERT's (activations, mask)
    return jnp.tanh(h @ p["w"] + p["b"]) * mask[..., None], mask


def _toy(L=8, M=5, B=4, D=16):
    k = jax.random.split(jax.random.key(0), 3)
    stack = {"w": jax.random.normal(k[0], (L, D, D)) / 4, "b": jax.random.normal(k[1], (L, D))}
    return stack, (jax.random.normal(k[2], (M, B, D)), jnp.ones((M, B), jnp.int32).at[:, 0].set(0))


def _on_mesh(S, fn):
    mesh = make_mesh({"pipeline": S, "data": -1})
    rules = pp.pipeline_rules(shd.DEFAULT_RULES)

    def wrapped(*args):
        with shd.activate(mesh, rules):
            return fn(*args)

    return mesh, wrapped


@pytest.mark.parametrize("S,R,M", [(2, 2, 5), (4, 1, 3)])
def test_pipeline_apply_equals_sequential_layers(S, R, M):
    """Circular with M > S and M not a multiple of S (5 on 2 stages); gpipe with M < S. Values and grads."""
    stack, x = _toy(M=M)
    mesh, piped = _on_mesh(S, lambda st, x: pp.pipeline_apply(_toy_layer, st, x, pp.PipelineSpec(S, M, R)))

    def sequential(stack, x):
        return jax.vmap(lambda xm: jax.lax.scan(lambda h, p: (_toy_layer(p, h), None), xm, stack)[0])(x)

    def value_and_grad(fn, stack):
        return jax.jit(jax.value_and_grad(lambda st, x: (jnp.sum(fn(st, x)[0] ** 3), fn(st, x)), has_aux=True))(stack, x)

    (_, y), g = value_and_grad(piped, jax.device_put(stack, NamedSharding(mesh, PartitionSpec("pipeline"))))
    (_, y_ref), g_ref = value_and_grad(sequential, stack)
    assert rel(y[0], y_ref[0]) <= 1e-6 and (np.asarray(y[1]) == np.asarray(y_ref[1])).all()
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))) <= 1e-5


@pytest.mark.parametrize("R,S", [(2, 2), (2, 4), (4, 2), (3, 4), (4, 6), (6, 4)])
def test_relayout_rounds_are_permutations_that_place_every_chunk(R, S):
    got = {}
    for send_j, dest, recv_slot in pp.relayout_rounds(R, S):
        assert sorted(dest) == list(range(S))                      # one ppermute: each device sends and gets one
        for d in range(S):
            got[(recv_slot[dest[d]], dest[d])] = d * R + send_j[d]  # (repeat, stage) <- stored chunk
    assert got == {(r, s): r * S + s for r in range(R) for s in range(S)}


def test_circular_relayout_never_gathers_the_stack_unlike_a_plain_reshape():
    """The ppermute re-layout, forward and backward, has no whole-stack collective; the obvious reshape +
    sharding constraint (the control) does: XLA all-gathers the stack's gradient on every device."""
    S, R, M = 2, 4, 2
    stack, x = _toy(M=M)

    def naive_stage_weights(st, spec):
        return jax.tree.map(lambda w: pp._put(w.reshape((R, S, -1) + w.shape[1:]), (None, "stage", None)), st)

    def hlo():
        mesh, fn = _on_mesh(S, lambda st, x: jnp.sum(pp.pipeline_apply(_toy_layer, st, x,
                                                                       pp.PipelineSpec(S, M, R))[0] ** 2))
        st = jax.device_put(stack, NamedSharding(mesh, PartitionSpec("pipeline")))
        return jax.jit(jax.grad(fn)).lower(st, x).compile().as_text()

    def found():
        return whole_stack_collectives(hlo(), jax.tree.leaves(stack), [], 8, R, S)

    assert not found()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pp, "stage_weights", naive_stage_weights)
        assert found()


def test_circular_memory_does_not_grow_with_micro_batches():
    """Circular picks each stage's repeat every iteration; rematerialising that pick keeps the backward's memory
    flat in M (stored per iteration, 8 micro-batches would cost ~6 more copies of the stage's weights)."""
    S, R, L, D = 2, 2, 8, 256
    mesh, _ = _on_mesh(S, None)
    stack = {"w": jax.ShapeDtypeStruct((L, D, D), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("pipeline")))}
    temp = {}
    for M in (2, 8):
        _, loss = _on_mesh(S, lambda st, x: jnp.sum(pp.pipeline_apply(lambda p, h: jnp.tanh(h @ p["w"]), st, x,
                                                                      pp.PipelineSpec(S, M, R)) ** 2))
        x = jax.ShapeDtypeStruct((M, 4, 8, D), jnp.float32)
        temp[M] = jax.jit(jax.grad(loss)).lower(stack, x).compile().memory_analysis().temp_size_in_bytes
    stage_weight_bytes = L // S * D * D * 4
    assert temp[8] - temp[2] < 0.5 * stage_weight_bytes, (temp, stage_weight_bytes)


class _ToyBlock(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, _=None):
        w = self.param("w", nn.initializers.normal(0.3), (x.shape[-1], self.cfg.d_ff))
        return x + jnp.tanh(jnp.tanh(x @ w) @ w.T), None


@dataclass(frozen=True)
class _ToyCfg:
    d_ff: int = 256
    remat: bool = False
    remat_policy: Any = None
    n_layer: int = 4            # (stack_blocks' fields, for _ToyLM)
    scan_layers: bool = True


def test_block_remat_applies_inside_the_pipeline():
    """``cfg.remat`` / ``cfg.remat_policy`` hold per layer in the pipeline: the backward keeps fewer bytes."""
    S, M = 2, 2
    mesh, _ = _on_mesh(S, None)
    stack = {"w": jax.ShapeDtypeStruct((4, 32, 256), jnp.float32)}
    x = jax.ShapeDtypeStruct((M, 8, 64, 32), jnp.float32)
    temp = {}
    for remat in (False, True):
        cfg = _ToyCfg(remat=remat, remat_policy=jax.checkpoint_policies.nothing_saveable if remat else None)
        _, loss = _on_mesh(S, lambda st, x: jnp.sum(pp.pipeline_apply(pp.block_layer_fn(_ToyBlock, cfg), st, x,
                                                                      pp.PipelineSpec(S, M)) ** 2))
        temp[remat] = jax.jit(jax.grad(loss)).lower(stack, x).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.7 * temp[False], temp


# --------------------------------------------------------------------------- bad input and the report


@pytest.mark.parametrize("overrides,needles", [
    (["model.n_layer=6", "mesh.data=2", "mesh.pipeline=4"], ["model.n_layer=6", "mesh.pipeline (4)", "= 4"]),
    (["mesh.data=2", "mesh.pipeline=4", "pipeline.schedule=circular", "pipeline.repeats=4"],
     [f"model.n_layer={LAYERS}", "mesh.pipeline (4)", "pipeline.repeats (4)", "= 16"]),
    (["mesh.data=2", "mesh.pipeline=4", "gradient_accumulation_steps=2", "train_batch_size=8"],
     ["gradient_accumulation_steps=2", "mesh.pipeline=4", ">= 4"]),
    (["mesh.data=4", "mesh.pipeline=2", "pipeline.repeats=2"], ["pipeline.repeats=2", "circular"]),
    (["mesh.data=4", "mesh.tensor=2", "pipeline.schedule=circular"], ["mesh.pipeline=1"]),
    (["mesh.data=4", "mesh.pipeline=2", "model.scan_layers=false"], ["model.scan_layers=true"]),
])
def test_bad_input_names_the_numbers(overrides, needles):
    with pytest.raises(ConfigError) as err:
        jzero.initialize(load_config(base={}, overrides=BASE + overrides))
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bubble_report(piped):
    """Theoretical bubble (S-1)/(R*M+S-1) in the summary section; the measured one runs on the engine's own block
    and params (its value is a timing, reported not asserted)."""
    name, run = piped
    eng = run["engine"]
    S, R = eng.config.mesh.pipeline, eng.config.pipeline.repeats
    if name == "d2p4-circular-zero2-remat":
        assert bubble_report(eng, measure=False) == {
            "schedule": "circular", "partition": "uniform", "stages": 4, "micro_batches": ACCUM, "repeats": 2,
            "iterations": 2 * ACCUM + 3, "bubble_theoretical": 3 / (2 * ACCUM + 3)}
    elif name == "d4p2-gpipe-zero1-remat":
        report = bubble_report(eng, measure=True, n=1)
        print(f"{name}: bubble theoretical {report['bubble_theoretical']:.3f}, measured {report['bubble_measured']:.3f}")
        assert report["bubble_theoretical"] == (S - 1) / (R * ACCUM + S - 1) == 1 / 5
        assert report["stack_time_pipelined_s"] > 0 and report["stack_time_stage_work_s"] > 0
    else:
        pytest.skip("two engines are enough")



class _ToyLM(nn.Module):
    """Embedding -> ``stack_blocks`` of :class:`_ToyBlock` -> tied head: the pipeline's path through a model."""
    cfg: Any

    @nn.compact
    def __call__(self, tokens):
        from models.layers import stack_blocks

        embed = nn.Embed(64, 32)
        return stack_blocks(_ToyBlock, self.cfg, embed(tokens)) @ embed.embedding.T


def test_masked_loss_is_the_mean_of_micro_batch_means_as_accumulation():
    """A loss averaged over labelled entries (BERT's masked LM, token classification) has a count of its own per
    micro-batch. Pipelined through :func:`micro_batch_mean` the step's loss and gradient are gradient
    accumulation's mean of the micro-batch means; the task's loss over all rows at once (what the engine ran before:
    BERT MLM on pipeline=2 trained 4e-4 / 7e-3 relative off in loss / grad_norm) weighs every labelled entry the same."""
    from jzero.pipeline_loss import micro_batch_mean
    from jzero.step import accumulate_grads
    from jzero.tasks import masked_cross_entropy

    S = M = 2
    model = _ToyLM(_ToyCfg(d_ff=32, n_layer=4))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (M, 8, 8)).astype(np.int32)
    labels = np.where(rng.random((M, 8, 8)) < np.array([0.1, 0.6])[:, None, None], tokens, -1).astype(np.int32)
    batch = {"tokens": tokens, "labels": labels}
    params = model.init(jax.random.key(0), tokens[0])["params"]
    task_loss = lambda apply_fn, p, b: masked_cross_entropy(apply_fn({"params": p}, b["tokens"]), b["labels"])  # noqa: E731
    whole = lambda p, b: task_loss(model.apply, p, b)  # noqa: E731
    ref = jax.jit(lambda p, b: accumulate_grads(whole, p, b, None))(params, batch)
    run = pp.PipelineRun(pp.PipelineSpec(S, M))
    mesh, _ = _on_mesh(S, None)
    reps = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    got = {}
    for name, fn in (("micro", micro_batch_mean(task_loss, model.apply, M)), ("whole", whole)):
        _, piped = _on_mesh(S, lambda p, b: pp.pipelined_grads(fn, p, b, reps, run))
        got[name] = jax.jit(piped)(params, batch)
    for name, bound in (("micro", 1e-5), ("whole", None)):
        loss_rel = abs(float(got[name][0]) - float(ref[0])) / float(ref[0])
        grad_rel = max(rel(a, b) for a, b in zip(jax.tree.leaves(got[name][1]), jax.tree.leaves(ref[1])))
        if bound is not None:
            assert loss_rel <= bound and grad_rel <= bound, (loss_rel, grad_rel)
        else:   # the control: the same model and batch, weighted per labelled entry
            assert loss_rel > 1e-3 and grad_rel > 1e-3, (loss_rel, grad_rel)
