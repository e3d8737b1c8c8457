"""Pipeline parallelism over the ``pipeline`` mesh axis, inside one SPMD program.

The scanned layer stack's params ``[layers, ...]`` are viewed as ``[repeats, stages, layers_per_chunk, ...]``
(gpipe: repeats = 1); the ``stages`` dim is sharded over ``pipeline``, the stage function (a scan over the chunk's
layers) is ``vmap``-ed over stages with ``spmd_axis_name='pipeline'``, and every loop iteration hands each stage's
output to the next stage with ``jnp.roll`` on the stage-sharded dim, which XLA lowers to a collective-permute.
The micro-batches of one step (``gradient_accumulation_steps``) all go through this loop together; the backward
pass is autodiff of the loop (all forwards, then all backwards: GPipe).

Schedule. Stage ``s`` at iteration ``t`` works on item ``k = t - s`` (micro-batch ``k % M``, repeat ``k // M``), so
the loop takes ``R*M + S - 1`` iterations of which ``S - 1`` are fill/drain: the bubble is (S-1)/(R*M+S-1).
Layer order is the model's: model chunk ``c = r*S + s`` (layers ``c*Lc .. c*Lc+Lc-1``) runs on stage ``s`` in
repeat ``r``. One buffer ``buf[S, M, ...]`` (only stage 0's slice is meaningful; it is the stage-0 device's copy)
holds the micro-batches: stage 0 reads slot ``t % M``; the last stage's output, after the roll lands on stage 0,
is written to slot ``(t-S+1) % M``. A slot is read for repeat r+1 after it was written by repeat r exactly when
``M >= S``, which is why fewer micro-batches than stages is an error. When the loop ends ``buf[0]`` holds the
outputs in micro-batch order.

Storage. The param tree keeps the un-pipelined layout ``[layers, ...]`` (checkpoints move between pipeline
settings), with the logical 'layers' dim mapped to ``pipeline`` (:func:`pipeline_rules`): device ``p`` stores layers
``p*L/S .. (p+1)*L/S-1`` and per-device parameter bytes of the stack fall by S. For gpipe that block is exactly
stage ``p``'s work, so the ``[1, S, L/S]`` view is free. For circular, stage ``p`` runs chunks ``p, p+S, ...``
(layer order must be the model's), which the contiguous storage puts on other devices: :func:`stage_weights`
moves them once per step, not per iteration, in R collective-permute rounds of one chunk per device
(:func:`relayout_rounds`), and autodiff sends the gradient back by the inverse rounds - about the stack's bytes
per device each way per step. The alternative, storing layers in stage order, would make the param tree (and
checkpoints, and gradients) depend on the pipeline setting; the plain reshape + sharding constraint would make
XLA all-gather the whole stack's gradient on every device.

Memory. gpipe's weights are loop-invariant, so autodiff keeps one copy (JAX hoists them out of the loop).
Circular picks each stage's repeat per iteration; to keep those picked weights from being stored once per
iteration, each iteration's stage work is rematerialised in the backward pass from its saved layer inputs
(plus whatever the block's own remat policy saves) - one extra forward per layer, as MaxText's default does.
The block's remat policy applies per layer inside the stages as it does in the un-pipelined scan.

Embedding and head stay outside (replicated over ``pipeline``); ``models.layers.stack_blocks`` dispatches here
while the engine has a pipeline active (:func:`activate`).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero import sharding as shd
from jzero.errors import ConfigError

LAYER_INPUT = "pipeline_layer_input"   # checkpoint name of each layer's input inside the pipeline


# --------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class PipelineSpec:
    """One pipelined stack: ``stages`` S over the ``pipeline`` axis, ``micro_batches`` M, ``repeats`` R."""

    stages: int
    micro_batches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.repeats * self.micro_batches + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.micro_batches, self.repeats)


def bubble_fraction(stages: int, micro_batches: int, repeats: int = 1) -> float:
    """Idle share of the pipelined loop: (S-1)/(R*M+S-1) (GPipe when R = 1, circular otherwise)."""
    return (stages - 1) / (repeats * micro_batches + stages - 1)


@dataclass(frozen=True)
class PipelineRun:
    """The spec a traced step pipelines with (nothing in it changes while tracing)."""

    spec: PipelineSpec


@dataclass
class Traced:
    """What one trace under :func:`activate` pipelined: the block (class, config) and its input's shapes. A fresh
    record per :func:`activate`, so no long-lived object is written while tracing."""

    block_cls: Any = None
    block_cfg: Any = None
    x_aval: Any = None          # ShapeDtypeStructs of the stack's input (carry pytree), leaves [M, B, ...]


_ACTIVE: contextvars.ContextVar[tuple[PipelineRun, Traced] | None] = contextvars.ContextVar("jzero_pipeline",
                                                                                           default=None)


@contextlib.contextmanager
def activate(run: PipelineRun):
    """Make ``stack_blocks`` pipeline while tracing (the engine wraps its pipelined loss in this); yields the
    :class:`Traced` record the trace fills in."""
    seen = Traced()
    token = _ACTIVE.set((run, seen))
    try:
        yield seen
    finally:
        _ACTIVE.reset(token)


def active() -> PipelineRun | None:
    got = _ACTIVE.get()
    return got[0] if got is not None else None


# --------------------------------------------------------------------------- config checks and rules


def spec_from_config(cfg) -> PipelineSpec | None:
    """The train step's spec from a resolved config (None when ``mesh.pipeline`` is 1)."""
    if cfg.mesh.pipeline == 1:
        return None
    return PipelineSpec(cfg.mesh.pipeline, cfg.gradient_accumulation_steps, cfg.pipeline.repeats)


def check_config(cfg) -> None:
    """Reject pipeline settings that cannot run or would be ignored (resolved config: mesh sizes known)."""
    S, pc, M = cfg.mesh.pipeline, cfg.pipeline, cfg.gradient_accumulation_steps
    if S == 1:
        if pc.repeats != 1 or pc.schedule != "gpipe":
            raise ConfigError(f"pipeline.schedule={pc.schedule}, pipeline.repeats={pc.repeats} have no effect with "
                              f"mesh.pipeline=1; set mesh.pipeline > 1 or drop them")
        return
    if pc.schedule == "gpipe" and pc.repeats != 1:
        raise ConfigError(f"pipeline.repeats={pc.repeats} needs pipeline.schedule=circular (gpipe runs each "
                          f"stage's layers once); set the schedule to circular or repeats to 1")
    if M < S:
        raise ConfigError(f"gradient_accumulation_steps={M} micro-batches are fewer than the mesh.pipeline={S} "
                          f"stages; set gradient_accumulation_steps >= {S} (bubble (S-1)/(R*M+S-1) falls with more)")
    if not cfg.model.scan_layers:
        raise ConfigError("mesh.pipeline > 1 needs model.scan_layers=true (the stacked [layers, ...] params are "
                          "what the stages split)")
    if cfg.data_types.grad_accum_dtype not in (None, "fp32"):
        raise ConfigError(f"data_types.grad_accum_dtype={cfg.data_types.grad_accum_dtype}: with mesh.pipeline > 1 "
                          f"the micro-batches share one backward pass (no accumulator); drop the key")


def check_layers(n_layers: int, stages: int, repeats: int) -> None:
    if n_layers % (stages * repeats):
        raise ConfigError(f"model.n_layer={n_layers} is not divisible by mesh.pipeline ({stages}) * "
                          f"pipeline.repeats ({repeats}) = {stages * repeats}; make n_layer a multiple of "
                          f"{stages * repeats} or change the stages/repeats")


def check_stack(param_names, abstract_params, spec: PipelineSpec) -> None:
    """The model must have a scanned stack (params with a leading 'layers' dim) that the stages can split."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    counts = set()
    for names, leaf in zip(jax.tree.leaves(param_names, is_leaf=is_names), jax.tree.leaves(abstract_params)):
        if "layers" in names:
            if names.index("layers") != 0:
                raise ConfigError(f"a stacked param has 'layers' at dim {names.index('layers')}; the pipeline "
                                  f"splits a leading 'layers' dim (models.layers.stack_blocks)")
            counts.add(leaf.shape[0])
    if not counts:
        raise ConfigError(f"mesh.pipeline={spec.stages} needs a scanned layer stack (models.layers.stack_blocks "
                          f"with model.scan_layers=true); this model has no 'layers' params")
    for n in counts:
        check_layers(n, spec.stages, spec.repeats)


def pipeline_rules(rules: shd.LogicalRules) -> shd.LogicalRules:
    """The rules with the stacked 'layers' dim stored over ``pipeline`` (each device keeps its stages' layers)."""
    return tuple((name, "pipeline" if name == "layers" else ax) for name, ax in rules)


# --------------------------------------------------------------------------- layouts


def _put(tree, lead_names):
    """Constrain the leading dims of every leaf by logical names; leave the rest to XLA. No-op without a plan."""
    plan = shd.active_plan()
    if plan is None:
        return tree
    mesh, rules = plan
    lead = list(shd.logical_to_spec(lead_names, rules))

    def one(x):
        spec = P(*lead, *([P.UNCONSTRAINED] * (x.ndim - len(lead))))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


def _index(tree, i, axis):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False), tree)


def _update(tree, new, i, axis):
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, axis), tree, new)


def _stack_over_stages(tree, S):
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (S,) + x.shape), tree)


def stage_weights(stack, spec: PipelineSpec):
    """``[L, ...]`` leaves (model order) -> ``[R, S, L/(R*S), ...]`` with [r, s] = model chunk r*S + s.

    The S dim is put on ``pipeline``. For R = 1 this is the storage layout already; for R > 1 it moves the layers
    between pipeline devices once per step (see the module docstring); its gradient moves back by the inverse moves.
    """
    R, S = spec.repeats, spec.stages

    def one(w):
        check_layers(w.shape[0], S, R)
        return _to_stages(w, R, S) if R > 1 else _put(w.reshape((1, S, -1) + w.shape[1:]), (None, "stage", None))

    return jax.tree.map(one, stack)


def relayout_rounds(R: int, S: int) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Moves that take circular's chunks from contiguous storage to their stages, as R permutation rounds.

    Device d stores chunks ``d*R + j`` (j < R); chunk c runs on stage ``c % S`` in repeat ``c // S``. Every device
    sends R chunks and receives R, so the moves form an R-regular bipartite multigraph, which splits into R
    perfect matchings (Konig); each is one ``ppermute``. Returns per round ``(send_j[d], dest[d], recv_slot[s])``.
    """
    left = {d: [(j, (d * R + j) % S, (d * R + j) // S) for j in range(R)] for d in range(S)}
    rounds = []
    for _ in range(R):
        owner: dict[int, int] = {}                 # dest stage -> source device (Kuhn's augmenting paths)

        def augment(d, seen):
            for _, s, _ in left[d]:
                if s not in seen:
                    seen.add(s)
                    if s not in owner or augment(owner[s], seen):
                        owner[s] = d
                        return True
            return False

        for d in range(S):
            if not augment(d, set()):
                raise AssertionError(f"no perfect matching for R={R}, S={S}")   # impossible for a regular graph
        send_j, dest, recv_slot = [0] * S, [0] * S, [0] * S
        for s, d in owner.items():
            move = next(m for m in left[d] if m[1] == s)
            left[d].remove(move)
            send_j[d], dest[d], recv_slot[s] = move[0], s, move[2]
        rounds.append((tuple(send_j), tuple(dest), tuple(recv_slot)))
    return rounds


def _to_stages(w_L, R: int, S: int):
    """[L, ...] stored contiguously over ``pipeline`` -> [R, S, Lc, ...] with S over ``pipeline``.

    R ``ppermute`` rounds of one chunk per device (:func:`relayout_rounds`) inside a ``shard_map`` manual over
    ``pipeline`` only (ZeRO / tensor dims stay automatic); autodiff sends the gradient back by the inverse
    permutations. (A reshape plus sharding constraint is an all-to-all forward, but XLA all-gathers the whole
    stack's gradient on every device for its transpose.)
    """
    plan = shd.active_plan()
    if plan is None:
        return w_L.reshape((R, S, -1) + w_L.shape[1:])
    rounds = relayout_rounds(R, S)

    def local(w):                                   # this device's [R*Lc, ...]: chunks d*R .. d*R+R-1
        d = jax.lax.axis_index("pipeline")
        w = w.reshape((R, -1) + w.shape[1:])
        out = jnp.zeros_like(w)                     # slot r = the chunk this stage runs in repeat r
        for send_j, dest, recv_slot in rounds:
            piece = jax.lax.dynamic_index_in_dim(w, jnp.asarray(send_j)[d], 0, keepdims=False)
            got = jax.lax.ppermute(piece, "pipeline", perm=list(enumerate(dest)))
            out = jax.lax.dynamic_update_index_in_dim(out, got, jnp.asarray(recv_slot)[d], 0)
        return out[:, None]

    return jax.shard_map(local, mesh=plan[0], in_specs=P("pipeline"), out_specs=P(None, "pipeline"),
                         axis_names={"pipeline"}, check_vma=False)(w_L)


# --------------------------------------------------------------------------- the loop


def _stage_fn(layer_fn: Callable):
    """``(w [S, Lc, ...], x [S, B, ...]) -> [S, B, ...]``: each stage scans its chunk's layers; stages vmapped."""

    def chunk(w_Lc, x):
        def one(h, w):
            return layer_fn(w, checkpoint_name(h, LAYER_INPUT)), None

        return jax.lax.scan(one, x, w_Lc)[0]

    return jax.vmap(chunk, spmd_axis_name="pipeline")


def _select_repeat(W, repeat_S, spec: PipelineSpec):
    """Each stage's chunk for its current repeat: ``W [R, S, Lc, ...]``, ``repeat_S [S]`` -> ``[S, Lc, ...]``."""
    pick = lambda w, r: jax.lax.dynamic_index_in_dim(w, r, 0, keepdims=False)  # noqa: E731
    return jax.tree.map(lambda w: jax.vmap(pick, in_axes=(1, 0), spmd_axis_name="pipeline")(w, repeat_S), W)


def _iteration_work(layer_fn: Callable, spec: PipelineSpec, remat_policy=None):
    """``(W, repeat_S, inputs_S) -> outputs_S``: one iteration's stage work (rematerialised for circular)."""
    stage_fn = _stage_fn(layer_fn)
    if spec.repeats == 1:
        return lambda W, repeat_S, x: stage_fn(jax.tree.map(lambda w: w[0], W), x)

    def work(W, repeat_S, x):
        return stage_fn(_select_repeat(W, repeat_S, spec), x)

    keep_inputs = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT)

    def policy(prim, *args, **params):       # layer inputs stay on device; else the block's choice (may offload)
        if keep_inputs(prim, *args, **params):
            return True
        return remat_policy(prim, *args, **params) if remat_policy is not None else False

    return jax.checkpoint(work, policy=policy, prevent_cse=False)


def pipeline_apply(layer_fn: Callable, stack, x_MxBx, spec: PipelineSpec, remat_policy=None):
    """Run the stack ``layer_fn(params_of_one_layer, x) -> x`` over ``stack`` (leaves ``[L, ...]``) on M
    micro-batches ``x_MxBx`` through ``spec.stages`` pipeline stages; returns ``[M, B, ...]``.

    ``x_MxBx`` may be a pytree (e.g. BERT's ``(activations, mask)`` carry); every leaf is ``[M, B, ...]``.
    Equal to scanning every micro-batch through all L layers in order. ``remat_policy`` is the block's own
    policy (or None), used to decide what circular's per-iteration remat keeps.
    """
    S, M, R = spec.stages, spec.micro_batches, spec.repeats
    if {x.shape[0] for x in jax.tree.leaves(x_MxBx)} != {M}:
        raise ValueError(f"pipeline input leaves must have {M} micro-batches leading: {jax.tree.map(jnp.shape, x_MxBx)}")
    if R > 1 and M < S:
        raise ConfigError(f"{M} micro-batches are fewer than the {S} stages of a circular pipeline; "
                          f"use at least {S} micro-batches")
    W = stage_weights(stack, spec)
    work = _iteration_work(layer_fn, spec, remat_policy)
    stage_major = ("stage", "batch")
    buf = _put(_stack_over_stages(x_MxBx, S), ("stage", None, "batch"))          # [S, M, B, ...]
    state = _put(jax.tree.map(lambda x: jnp.zeros((S,) + x.shape[1:], x.dtype), x_MxBx), stage_major)
    first = lambda x: (jnp.arange(S) == 0).reshape((S,) + (1,) * (x.ndim - 1))  # noqa: E731

    def iteration(carry, t):
        buf, state = carry
        fresh = _index(buf, t % M, 1)                                            # stage 0's next item
        inputs = _put(jax.tree.map(lambda f, s: jnp.where(first(f), f, s), fresh, state), stage_major)
        repeat_S = jnp.clip((t - jnp.arange(S)) // M, 0, R - 1)
        out = _put(work(W, repeat_S, inputs), stage_major)
        shifted = _put(jax.tree.map(lambda y: jnp.roll(y, 1, axis=0), out), stage_major)  # s -> s+1, last -> 0
        k = t - (S - 1)                                                          # the item leaving the last stage
        slot = k % M
        kept = jax.tree.map(lambda new, old: jnp.where(k >= 0, new, old), shifted, _index(buf, slot, 1))
        return (_put(_update(buf, kept, slot, 1), ("stage", None, "batch")), shifted), None

    (buf, _), _ = jax.lax.scan(iteration, (buf, state), jnp.arange(spec.iterations))
    return _put(jax.tree.map(lambda x: x[0], buf), (None, "batch"))


def stage_work_only(layer_fn: Callable, stack, x_MxBx, spec: PipelineSpec, remat_policy=None):
    """The same per-stage work as :func:`pipeline_apply` without fill/drain or hand-offs: R*M iterations where
    every stage runs its chunk on micro-batch ``t % M``. Its time is the bubble-free reference of
    :func:`train.bubble.measure_bubble` (the result is not the model's output)."""
    S, M, R = spec.stages, spec.micro_batches, spec.repeats
    W = stage_weights(stack, spec)
    work = _iteration_work(layer_fn, spec, remat_policy)
    buf = _put(_stack_over_stages(x_MxBx, S), ("stage", None, "batch"))

    def iteration(buf, t):
        x = _put(_index(buf, t % M, 1), ("stage", "batch"))
        out = _put(work(W, jnp.full((S,), t // M), x), ("stage", "batch"))
        return _update(buf, out, t % M, 1), None

    buf, _ = jax.lax.scan(iteration, buf, jnp.arange(R * M))
    return buf


# --------------------------------------------------------------------------- the Flax side


def block_layer_fn(block_cls, cfg) -> Callable:
    """``(params_of_one_layer, x) -> x`` for a block module ``block_cls(cfg)(x, None) -> (x, None)``, with the
    block's remat (``cfg.remat`` / ``cfg.remat_policy``) applied per layer as in the un-pipelined scan."""

    def layer(p, x):
        return block_cls(cfg, parent=None).apply({"params": p}, x, None)[0]

    if getattr(cfg, "remat", False):
        layer = jax.checkpoint(layer, policy=getattr(cfg, "remat_policy", None), prevent_cse=False)
    return layer


def run_stack(block_cls, cfg, stack, x_Nx, run: PipelineRun):
    """Pipelined replacement of the scanned stack (called by ``stack_blocks`` while a pipeline is active).

    ``x_Nx`` (the block carry: an array or a pytree of them) holds the step's micro-batches row-major: row
    ``b*M + m`` is row b of micro-batch m (the engine flattens ``[M, B, ...]`` batches that way, so the ``data``
    sharding of B survives the reshapes without communication).
    """
    M = run.spec.micro_batches
    N = jax.tree.leaves(x_Nx)[0].shape[0]
    if N % M:
        raise ConfigError(f"{N} rows do not split into {M} pipeline micro-batches")
    x_MxBx = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((N // M, M) + x.shape[1:]), 0, 1), x_Nx)
    got = _ACTIVE.get()
    if got is not None and got[0] is run:   # record what this trace pipelined (train.bubble times that block)
        seen = got[1]
        seen.block_cls, seen.block_cfg = block_cls, cfg
        seen.x_aval = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), x_MxBx)
    policy = getattr(cfg, "remat_policy", None) if getattr(cfg, "remat", False) else None
    y_MxBx = pipeline_apply(block_layer_fn(block_cls, cfg), stack, x_MxBx, run.spec, policy)
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape((N,) + y.shape[2:]), y_MxBx)


def flatten_micro_batches(batch_AxBx):
    """``[M, B, ...]`` leaves -> ``[B*M, ...]`` (row ``b*M + m``), the layout :func:`run_stack` expects."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), batch_AxBx)


def pipelined_grads(loss_fn: Callable, params, batch_AxBx, grad_shardings, run: PipelineRun):
    """Mean loss and gradient over the step's M micro-batches, all sent through the pipeline in one forward
    and one backward (the engine's replacement for ``accumulate_grads``' sequential scan).

    ``loss_fn(params, rows)`` sees the micro-batches as one batch of B*M rows (:func:`flatten_micro_batches`) and
    should return the mean of the micro-batch means (:func:`micro_batch_mean` makes one from a task's loss).
    Gradients are put in ``grad_shardings`` (ZeRO-2/3: partitioned over ``data``).
    """
    M = jax.tree.leaves(batch_AxBx)[0].shape[0]
    if M != run.spec.micro_batches:
        raise ValueError(f"batch has {M} micro-batches, the pipeline was set up for {run.spec.micro_batches}")
    with activate(run) as seen:
        loss, grads = jax.value_and_grad(loss_fn)(params, flatten_micro_batches(batch_AxBx))
    if seen.block_cls is None:
        raise ConfigError(f"mesh.pipeline={run.spec.stages} but the model never called models.layers.stack_blocks, "
                          f"so there is no layer stack to pipeline; build the model's blocks with stack_blocks")
    return loss, jax.tree.map(jax.lax.with_sharding_constraint, grads, grad_shardings)


def eval_micro_batches(rows: int, spec: PipelineSpec, data: int) -> int | None:
    """Micro-batches for an eval batch of ``rows``: the stage count when the rows split into S per data rank
    (rows ``b*S + m`` form micro-batch m, no reshuffle), else None (run the stack un-pipelined)."""
    S = spec.stages
    return S if rows % (S * data) == 0 else None


def pipelined_eval(loss_fn: Callable, params, batch_Bx, run: PipelineRun, data: int):
    """Eval loss through the pipeline (S micro-batches of the eval rows). If the rows do not split, the plain
    scanned stack runs instead: same result, but XLA then gathers the pipeline-sharded stack on every device."""
    M = eval_micro_batches(jax.tree.leaves(batch_Bx)[0].shape[0], run.spec, data)
    if M is None:
        return loss_fn(params, batch_Bx)
    with activate(PipelineRun(PipelineSpec(run.spec.stages, M, run.spec.repeats))):
        return loss_fn(params, batch_Bx)
