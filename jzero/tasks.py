"""Tasks: what a batch is and how a model turns it into a loss. :func:`lm_task` (causal LM, the engine's default)
and the encoder tasks: masked-LM pretraining, sequence and token classification.

Every batch is a dict of int32 arrays with a leading rows dim (the engine adds the micro-batch dim in front and
puts rows over ``data``):

=======================  ===================  =============================================================
task                     ``labels``           meaning
=======================  ===================  =============================================================
``mlm``                  ``[rows, T]``        the original token at corrupted positions, ``IGNORE`` elsewhere
``classification``       ``[rows]``           the class of each row
``token_classification`` ``[rows, T]``        the tag of each word's first token, ``IGNORE`` elsewhere
=======================  ===================  =============================================================

``tokens`` are ``[rows, T]`` ids, ``mask`` ``[rows, T]`` is 1 on real tokens and 0 on (right) padding. Losses
are fp32 cross-entropy averaged over the rows / labelled positions of a micro-batch. ``predict`` gives the
argmax labels the metrics (:mod:`jzero.metrics`) compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jzero import kernels
from jzero.kernels import cross_entropy as kernel_ce
from jzero.loss import cross_entropy

IGNORE = -1   # the label of positions (or rows) that carry no loss


@dataclass(frozen=True)
class Task:
    """What a batch is and how a model turns it into a loss.

    ``micro_batch(rows)`` gives the ShapeDtypeStruct pytree of one micro-batch with ``rows`` rows (every leaf's
    leading dim is rows; the train step takes the same tree with an extra leading ``accum`` dim);
    ``loss(apply_fn, params, micro_batch) -> scalar``; ``init_inputs()`` are the args ``model.init`` traces with.
    ``weight(micro_batch) -> scalar`` (keyword only; None: every row counts the same): the denominator of
    ``loss``'s mean, e.g. the number of labelled positions. ZeRO++ hpZ and qgZ compute the loss per node / per
    rank on that part of the micro-batch's rows and combine the parts weighted by it, so that a loss averaged over
    a varying number of entries per row (masked LM, padded token tags) is the whole micro-batch's mean as without
    them; with equal-sized parts (the LM loss) the plain mean of the parts is already that.
    """

    micro_batch: Callable[[int], Any]
    loss: Callable[..., jax.Array]
    init_inputs: Callable[[], tuple]
    weight: Callable[[Any], jax.Array] | None = field(default=None, kw_only=True)


# --------------------------------------------------------------------------- causal LM


def lm_task(seq_len: int) -> Task:
    """Causal language modelling on int32 token rows of length ``seq_len + 1``."""
    return Task(micro_batch=lambda rows: jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32),
                loss=lm_loss, init_inputs=lambda: (jnp.zeros((1, seq_len), jnp.int32),))


def lm_loss(apply_fn: Callable, params, tokens_BxT1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (fp32) of ``tokens[:, :-1] -> tokens[:, 1:]``.

    A bf16 model with a fused head (GPT-2, Llama: ``fused_head``) on the GPU applies its head inside
    :func:`jzero.kernels.cross_entropy.head_cross_entropy` (Pallas; the logits are read once, never kept);
    otherwise logits from the model, then :func:`jzero.loss.cross_entropy`.
    """
    inputs, labels = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    if _use_fused_head(apply_fn):
        hidden, w_VxD = apply_fn({"params": params}, inputs, head=False)
        return kernel_ce.head_cross_entropy(hidden, w_VxD, labels).mean()
    return cross_entropy(apply_fn({"params": params}, inputs), labels).mean()


def _use_fused_head(apply_fn: Callable) -> bool:
    module = getattr(apply_fn, "__self__", None)
    cfg = getattr(module, "cfg", None)
    return (getattr(module, "fused_head", False) and cfg is not None
            and jnp.dtype(cfg.dtype) == jnp.dtype(jnp.bfloat16)
            and kernels.use("cross_entropy", (kernels.LAYOUT_WHY, kernel_ce.supported)))


# --------------------------------------------------------------------------- encoder tasks


@dataclass(frozen=True)
class LabelTask(Task):
    """A :class:`Task` whose model output can be read as labels: ``predict(apply_fn, params, batch) -> int32``
    of the labels' shape."""

    predict: Callable[..., jax.Array] = None
    name: str = ""


def masked_cross_entropy(logits, labels) -> jax.Array:
    """Mean fp32 cross-entropy over the entries whose label is not ``IGNORE`` (0 when there are none)."""
    valid = labels != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(valid.sum(), 1)


def _logits(apply_fn, params, batch):
    return apply_fn({"params": params}, batch["tokens"], batch["mask"])


def _loss(apply_fn, params, batch):
    return masked_cross_entropy(_logits(apply_fn, params, batch), batch["labels"])


def _weight(batch):
    """What :func:`masked_cross_entropy` averages over: the labelled entries (the :class:`Task` ``weight``)."""
    return (batch["labels"] != IGNORE).sum().astype(jnp.float32)


def _predict(apply_fn, params, batch):
    return jnp.argmax(_logits(apply_fn, params, batch), axis=-1).astype(jnp.int32)


def _spec(seq_len: int, per_token_labels: bool):
    def micro_batch(rows: int):
        tok = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
        lab = tok if per_token_labels else jax.ShapeDtypeStruct((rows,), jnp.int32)
        return {"tokens": tok, "mask": tok, "labels": lab}
    return micro_batch


def _init_inputs(seq_len: int):
    return lambda: (jnp.zeros((1, seq_len), jnp.int32), jnp.ones((1, seq_len), jnp.int32))


def mlm_task(seq_len: int) -> LabelTask:
    """Masked-LM pretraining (a BERT with ``head='mlm'``); corrupt the batches with :func:`mlm_corrupt`."""
    return LabelTask(_spec(seq_len, True), _loss, _init_inputs(seq_len), _predict, "mlm", weight=_weight)


def classification_task(seq_len: int) -> LabelTask:
    """One label per row (a BERT with ``head='classification'``)."""
    return LabelTask(_spec(seq_len, False), _loss, _init_inputs(seq_len), _predict, "classification", weight=_weight)


def token_classification_task(seq_len: int) -> LabelTask:
    """One tag per word, on its first token (a BERT with ``head='token_classification'``)."""
    return LabelTask(_spec(seq_len, True), _loss, _init_inputs(seq_len), _predict, "token_classification", weight=_weight)


TASKS = {"mlm": mlm_task, "classification": classification_task,
         "token_classification": token_classification_task}


# --------------------------------------------------------------------------- host-side batch layout


def mlm_corrupt(tokens_BxT: np.ndarray, mask_BxT: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                vocab_size: int, special_ids=(), prob: float = 0.15) -> dict[str, np.ndarray]:
    """BERT's corruption: pick ``prob`` of the real, non-special tokens; of those 80% become ``mask_id``, 10% a
    random id below ``vocab_size`` and 10% stay. Labels hold the original token there and ``IGNORE`` elsewhere.
    """
    tokens = np.asarray(tokens_BxT, np.int32)
    eligible = (np.asarray(mask_BxT) > 0) & ~np.isin(tokens, np.asarray(list(special_ids), np.int32))
    picked = eligible & (rng.random(tokens.shape) < prob)
    roll = rng.random(tokens.shape)
    inputs = np.where(picked & (roll < 0.8), mask_id, tokens)
    random_ids = rng.integers(0, vocab_size, tokens.shape, dtype=np.int32)
    inputs = np.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, inputs).astype(np.int32)
    labels = np.where(picked, tokens, IGNORE).astype(np.int32)
    return {"tokens": inputs, "mask": np.asarray(mask_BxT, np.int32), "labels": labels}
