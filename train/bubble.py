"""The pipeline section of a run's ``summary.json``: the schedule, its theoretical bubble and the measured one.

The measurement times forward+backward of the engine's pipelined layer stack against the same per-stage work
without fill and drain, on the engine's mesh with its own params: a benchmark the training main runs once after
training (``train.pretrain`` with ``mesh.pipeline > 1``), kept out of the library (:mod:`jzero.pipeline` has the
schedule itself and no timing).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero import sharding as shd
from jzero.errors import ConfigError
from jzero.pipeline import (PipelineSpec, Traced, activate, block_layer_fn, flatten_micro_batches, pipeline_apply,
                            stage_work_only)


def _time_alternating(fns, args, n: int) -> list[float]:
    """Median wall time of each fn, run in turns (so a load change on a shared machine hits all of them)."""
    for fn in fns:
        jax.block_until_ready(fn(*args))                 # compile and warm up
    times = [[] for _ in fns]
    for _ in range(n):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def measure_bubble(layer_fn: Callable, stack, x_MxBx: jax.Array, spec: PipelineSpec, mesh, rules,
                   n: int = 3, remat_policy=None) -> dict:
    """Time forward+backward of the pipelined stack against the same per-stage work without fill/drain
    (:func:`stage_work_only`) on the same mesh; measured bubble = 1 - t_work / t_pipelined."""

    def timed(fwd):
        def loss(stack, x):
            with shd.activate(mesh, rules):
                out = fwd(layer_fn, stack, x, spec, remat_policy)
                return sum(jnp.sum(jnp.square(y.astype(jnp.float32))) for y in jax.tree.leaves(out)
                           if jnp.issubdtype(y.dtype, jnp.floating))
        return jax.jit(jax.value_and_grad(loss))

    t_pipe, t_work = _time_alternating([timed(pipeline_apply), timed(stage_work_only)], (stack, x_MxBx), n)
    return {"stages": spec.stages, "micro_batches": spec.micro_batches, "repeats": spec.repeats,
            "iterations": spec.iterations, "bubble_theoretical": spec.bubble,
            "bubble_measured": 1.0 - t_work / t_pipe, "stack_time_pipelined_s": t_pipe,
            "stack_time_stage_work_s": t_work}


def bubble_report(engine, measure: bool = True, n: int = 3) -> dict:
    """The pipeline section of ``summary.json``: schedule, theoretical bubble and (``measure``) the measured one,
    timed on the engine's mesh with its params and one step's activations ``[M, rows, seq, d_model]``."""
    cfg = engine.config
    run = engine.pipeline
    if run is None:
        return {"stages": 1}
    spec = run.spec
    out = {"schedule": cfg.pipeline.schedule, "partition": cfg.pipeline.partition, "stages": spec.stages,
           "micro_batches": spec.micro_batches, "repeats": spec.repeats, "iterations": spec.iterations,
           "bubble_theoretical": spec.bubble}
    if measure:
        seen = _trace_stack(engine)
        policy = getattr(seen.block_cfg, "remat_policy", None) if getattr(seen.block_cfg, "remat", False) else None
        x = _example_inputs(seen.x_aval, engine.mesh, engine.plan.rules)
        out.update(measure_bubble(block_layer_fn(seen.block_cls, seen.block_cfg), _stack_params(engine.state.params),
                                  x, spec, engine.mesh, engine.plan.rules, n=n, remat_policy=policy))
    return out


def _trace_stack(engine) -> Traced:
    """Trace (shapes only) the engine's loss on one train batch under its pipeline: which block it stacks and
    the stack's input shapes."""
    batch = engine.batch_spec()
    loss = lambda p, b: engine.task.loss(engine.model.apply, p, flatten_micro_batches(b))  # noqa: E731
    with shd.activate(engine.mesh, engine.plan.rules), activate(engine.pipeline) as seen:
        jax.eval_shape(loss, engine.state.params, batch)
    if seen.block_cls is None:
        raise ConfigError("the model never called models.layers.stack_blocks, so there is no layer stack to time")
    return seen


def _example_inputs(x_aval, mesh, rules):
    """Stack inputs shaped like the traced ones: normal floats, ones for integer leaves (masks), rows over data."""
    sharding = NamedSharding(mesh, P(None, *shd.logical_to_spec(("batch",), rules)))
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(x_aval))))

    def one(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jax.jit(lambda k: jax.random.normal(k, a.shape, a.dtype), out_shardings=sharding)(next(keys))
        return jax.device_put(jnp.ones(a.shape, a.dtype), sharding)

    return jax.tree.map(one, x_aval)


def _stack_params(params):
    """The scanned stack's params (the ``blocks`` subtree ``stack_blocks`` creates)."""
    if "blocks" not in params:
        raise ConfigError("the model has no 'blocks' layer stack (models.layers.stack_blocks with scan_layers)")
    return params["blocks"]

