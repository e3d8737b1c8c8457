"""A task's loss under the pipeline: the mean of the micro-batch means, as gradient accumulation weighs them.

The pipeline (:mod:`jzero.pipeline`) applies the model once to all of a step's micro-batches (flattened rows), so
a task's loss over those rows would weigh every labelled entry the same; :func:`micro_batch_mean` keeps
DeepSpeed's weighting (each micro-batch the same) by slicing the one model output per micro-batch.
"""

from __future__ import annotations

import types
from typing import Callable

import jax

from jzero.errors import ConfigError
from jzero.pipeline import _ACTIVE


class _Applied(Exception):
    """Raised by :func:`micro_batch_mean`'s stand-in model to stop a task's loss at its model call."""

    def __init__(self, variables, args, kwargs):
        super().__init__("model applied")
        self.variables, self.args, self.kwargs = variables, args, kwargs


def _bound_like(fn: Callable, apply_fn: Callable) -> Callable:
    """``fn``, bound to ``apply_fn``'s module when it is a bound method (a task may read ``apply_fn.__self__``:
    :func:`jzero.tasks.lm_loss` picks its fused head by the module)."""
    module = getattr(apply_fn, "__self__", None)
    return fn if module is None else types.MethodType(lambda _, *a, **k: fn(*a, **k), module)


def micro_batch_mean(task_loss: Callable, apply_fn: Callable, micro_batches: int) -> Callable:
    """``loss(params, rows)`` over the step's flattened micro-batches (row ``b*M + m`` of micro-batch m,
    :func:`flatten_micro_batches`): the mean over m of ``task_loss(apply_fn, params, micro-batch m)``, with the
    model applied once to all rows (one pass through the pipeline), its output sliced per micro-batch.

    Why: a task's loss over all the step's rows at once is the mean of the micro-batch means only when they weigh
    the same (the causal LM). A mean over labelled entries (BERT's masked LM, token classification: a count of its
    own per micro-batch) would weigh every entry the same, where gradient accumulation (DeepSpeed's, and
    :func:`jzero.step.accumulate_grads` without a pipeline) weighs every micro-batch the same. The task must apply
    the model once, to row-major inputs (every jzero task does)."""
    M = micro_batches

    def loss(params, rows):
        def stop(variables, *args, **kwargs):
            raise _Applied(variables, args, kwargs)
        try:   # the arguments the task applies the model with (its loss over all rows is never traced)
            task_loss(_bound_like(stop, apply_fn), params, rows)
            raise ConfigError("mesh.pipeline > 1: the task's loss never applied the model, so there is no output "
                              "to pipeline; use mesh.pipeline=1")
        except _Applied as call:
            full = apply_fn(call.variables, *call.args, **call.kwargs)
        micro_shapes = []

        def replay(m):
            def apply_micro(variables, *args, **kwargs):
                if micro_shapes and m == 0:
                    raise ConfigError("mesh.pipeline > 1: the task's loss applies the model more than once; apply it "
                                      "once per batch or use mesh.pipeline=1")
                if not micro_shapes:   # which output leaves have a rows dim: the model's shapes on one micro-batch
                    token = _ACTIVE.set(None)
                    try:
                        micro_shapes.append(jax.eval_shape(lambda v, *a: apply_fn(v, *a, **kwargs), variables, *args))
                    finally:
                        _ACTIVE.reset(token)
                return jax.tree.map(lambda y, s: y if y.shape == s.shape else y[m::M], full, micro_shapes[0])
            return _bound_like(apply_micro, apply_fn)

        micro = lambda m: jax.tree.map(lambda x: x[m::M], rows)  # noqa: E731
        return sum(task_loss(replay(m), params, micro(m)) for m in range(M)) / M

    return loss
