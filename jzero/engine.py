"""The engine: DeepSpeed's ``initialize`` habit on a jitted, sharded JAX train step. Wiring only.

    engine = jzero.initialize(cfg)                 # mesh, model, optimizer, sharded state, compiled step
    metrics = engine.train_step(batch_AxBxT1)      # one optimizer step over `accum` micro-batches
    loss = engine.eval_step(batch_BxT1)

What a step is lives below this module, which only picks the pieces the config names:
:mod:`jzero.tasks` (batch -> loss), :mod:`jzero.step` (``make_step(grads_fn, update_fn)``: micro-batch scan,
fp16 skip, LR count, metrics), a gradient path (:func:`_grads_of`: the micro-batch scan with its one
``value_and_grad`` slot, or the pipeline's) and a strategy that holds the optimizer state and runs the update
(:func:`_strategy`: :class:`jzero.step.OnDevice`, :class:`jzero.optim.onebit.OneBit`,
:class:`jzero.offload.OptimizerOffload`). Shardings come from one :class:`jzero.sharding.ShardingPlan`; jit is
given explicit in/out shardings and donates the state, so XLA inserts ZeRO's collectives and reuses the buffers.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jzero import pipeline, quantized_gather, quantized_reduce, topology
from jzero import sharding as shd
from jzero.config import JzeroConfig, resolve
from jzero.batch import check_global_batch, check_global_eval_batch, check_local_batch, check_local_eval_batch
from jzero.errors import CheckpointError, ConfigError, DataError
from jzero.loss import cross_entropy, logsumexp_one_pass  # noqa: F401  (re-exported: their old home)
from jzero.layout import Layout, build_layout
from jzero.offload import OptimizerOffload, offloaded, unsupported as offload_unsupported
from jzero.optim import build_optimizer
from jzero.optim.onebit import OneBit, build_onebit, is_onebit, unsupported as onebit_unsupported
from jzero.optim.schedules import build_momentum_schedule, build_schedule
from jzero.pipeline_loss import micro_batch_mean
from jzero.precision import dtype_from_name, init_loss_scale, skips_nonfinite_steps
from jzero.step import (OnDevice, TrainState, accumulate_grads, apply_update,  # noqa: F401  (re-exported)
                        compute_copies, copy_shardings, micro_batch_grads, weight_matrices)
from jzero.tasks import Task, lm_loss, lm_task  # noqa: F401  (re-exported: their old home)

def compute_dtype(cfg: JzeroConfig):
    if cfg.bf16.enabled:
        return jnp.bfloat16
    if cfg.fp16.enabled:
        return jnp.float16
    return jnp.float32


def check_supported(cfg: JzeroConfig) -> None:
    """Reject config that names a feature this build does not implement (never accept-and-ignore)."""
    z = cfg.zero_optimization
    unsupported = []
    if cfg.data_types.grad_accum_dtype == "fp16" and not cfg.fp16.enabled:
        unsupported.append(("data_types.grad_accum_dtype", "fp16 accumulation needs fp16.enabled; use fp32 or bf16"))
    unsupported += onebit_unsupported(cfg) + offload_unsupported(cfg)
    if cfg.mesh.sequence_parallel and cfg.mesh.tensor == 1:
        unsupported.append(("mesh.sequence_parallel", "true splits activations over mesh.tensor, which is 1 here, so "
                            "it would have no effect; set mesh.tensor > 1 or drop it"))
    if z.offload_param.device != "none":
        unsupported.append(("zero_optimization.offload_param.device", "parameter offload is not implemented (the "
                            "device needs each layer's weights in its scan step, and jzero streams only the "
                            "optimizer state); use offload_optimizer, and activation_checkpointing.cpu_checkpointing "
                            "for activations"))
    if z.zero_hpz_partition_size > 1 or z.zero_quantized_weights:
        key = ("zero_optimization.zero_hpz_partition_size" if z.zero_hpz_partition_size > 1
               else "zero_optimization.zero_quantized_weights")
        if is_onebit(cfg.optimizer.type) or z.offload_optimizer.device != "none" or cfg.mesh.pipeline not in (1, -1):
            unsupported.append((key, "ZeRO++ with 1-bit optimizers, optimizer offload or mesh.pipeline > 1 is not "
                                "implemented; use plain ZeRO-3 with mesh.pipeline=1"))
        if z.zero_quantized_weights and cfg.mesh.tensor not in (1, -1):
            unsupported.append(("zero_optimization.zero_quantized_weights", "qwZ with mesh.tensor > 1 is not "
                                "implemented (a dim split over tensor and data); set mesh.tensor=1"))
    if unsupported:
        key, why = unsupported[0]
        raise ConfigError(f"{key}: {why}")
    pipeline.check_config(cfg)
    quantized_reduce.check_config(cfg)   # ZeRO++ qgZ's unsupported combinations


# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    config: JzeroConfig           # resolved: mesh sizes and batch triple filled in
    mesh: jax.sharding.Mesh
    model: nn.Module
    model_config: Any
    tx: optax.GradientTransformation
    schedule: Callable
    plan: shd.ShardingPlan
    state: TrainState
    state_shardings: Any
    task: Task
    compile_seconds: float = 0.0
    _train: Any = field(default=None, repr=False)
    _eval: Any = field(default=None, repr=False)
    _compiled: Any = field(default=None, repr=False)
    pipeline: Any = None     # jzero.pipeline.PipelineRun when mesh.pipeline > 1 (spec; block once traced)
    strategy: Any = None     # where the optimizer state lives and how a step updates it (_strategy)

    @property
    def offload(self):
        """The :class:`jzero.offload.OptimizerOffload` under ``offload_optimizer`` (its chunks, homes), else None."""
        return self.strategy if self.strategy.offloaded else None

    # ---- shapes
    @property
    def accum_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    @property
    def global_batch_rows(self) -> int:
        return self.config.train_batch_size

    def batch_spec(self):
        """ShapeDtypeStruct pytree of one global train batch: leaves ``[accum, rows/accum, ...]``."""
        A = self.accum_steps
        micro = self.task.micro_batch(self.global_batch_rows // A)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct((A,) + s.shape, s.dtype,
                                                           sharding=self.plan.batch(len(s.shape) + 1, 1)), micro)

    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the (single-leaf) LM train batch ``[accum, rows, seq+1]``."""
        return jax.tree.leaves(self.batch_spec())[0].shape

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (token ids in a batch must be below it): the model config's, else that of the
        model passed to :func:`initialize` (its ``cfg``); None when neither says."""
        for c in (self.model_config, getattr(self.model, "cfg", None)):
            if getattr(c, "vocab_size", None):
                return int(c.vocab_size)
        return None

    # ---- data placement
    def row_block(self) -> tuple[int, int]:
        """``(block, blocks)``: the block of each global batch's rows this process feeds to :meth:`put_batch` /
        :meth:`put_eval_batch` (:func:`jzero.distributed.row_block`): its 1/N share, except when ``pipeline`` or
        ``tensor`` spans processes and several processes hold the same rows."""
        from jzero.distributed import row_block

        spec = jax.tree.leaves(self.batch_spec())[0]
        return row_block(spec.sharding, spec.shape, 1)

    def put_batch(self, local_batch) -> Any:
        """Assemble the global train batch from this process's rows (leaves ``[accum, local_rows, ...]``), after
        :func:`jzero.batch.check_local_batch` (shape, integer dtype, token ids in the vocabulary)."""
        spec = self.batch_spec()
        local_batch = check_local_batch(local_batch, spec, self.row_block()[1], self.vocab_size)
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s.sharding, x, s.shape),
                            local_batch, spec)

    def put_eval_batch(self, local_batch) -> Any:
        """Assemble a global eval batch (leaves ``[local_rows, ...]``, rows over ``data``), after
        :func:`jzero.batch.check_local_eval_batch` (one-line DataErrors)."""
        pc = self.row_block()[1]
        local = check_local_eval_batch(local_batch, self.batch_spec(), pc, self.vocab_size,
                                       lambda ndim: self.plan.batch(ndim, 0))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.plan.batch(x.ndim, 0), x, (x.shape[0] * pc,) + x.shape[1:]), local)

    # ---- steps
    def lower_train_step(self):
        """The lowered train step (``.compile()``, ``.as_text()``, ``memory_analysis()`` for tests/benchmarks)."""
        return self._train.lower(self.state, self.batch_spec())

    def compile(self):
        if self._compiled is None:
            t0 = time.perf_counter()
            self._compiled = self.lower_train_step().compile()
            self.compile_seconds = time.perf_counter() - t0
        return self._compiled

    def train_step(self, batch) -> dict[str, jax.Array]:
        """One optimizer step; ``batch`` is a global ``[accum, rows, seq+1]`` array or this process's numpy rows.
        Numpy rows are checked in full (:func:`jzero.batch.check_local_batch`); a batch already on the devices only
        by shape and dtype, since reading its token ids would wait for them (keep them below the vocabulary size),
        and moved to :meth:`batch_spec`'s sharding when it has another one."""
        if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
            batch = self.put_batch(batch)
        else:
            spec = self.batch_spec()
            check_global_batch(batch, spec)
            batch = jax.tree.map(lambda x, s: _placed(x, s.sharding, "train_step", "engine.put_batch"), batch, spec)
        self.state, metrics = self.strategy.run(self.compile(), self.state, batch)
        return metrics

    def eval_step(self, batch) -> jax.Array:
        """Mean loss of one eval batch (no update): the train batch's leaves without the accumulation axis
        (``[rows, seq+1]`` for the LM task), this process's numpy rows (checked in full like
        :meth:`put_eval_batch`) or global device arrays (checked by shape and dtype only, like ``train_step``'s)."""
        if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
            return self._eval(self.state.params, self.put_eval_batch(batch))
        check_global_eval_batch(batch, self.batch_spec(), lambda ndim: self.plan.batch(ndim, 0))
        batch = jax.tree.map(lambda x: _placed(x, self.plan.batch(x.ndim, 0), "eval_step", "engine.put_eval_batch"),
                             batch)
        return self._eval(self.state.params, batch)

    # ---- measurements
    def memory_per_device(self) -> dict[str, int]:
        """Bytes of params (the fp32 masters), their bf16/fp16 copies (``TrainState.compute``) and optimizer state
        held by the first local device (from the real shards), and what the state keeps in host memory."""
        return {"params": shd.per_device_bytes(self.state.params, memory_kind="device"),
                "weight_copies": shd.per_device_bytes(self.state.compute, memory_kind="device"),
                "opt_state": shd.per_device_bytes(self.state.opt_state, memory_kind="device"),
                "host": shd.per_device_bytes(self.state, memory_kind="pinned_host")}

    def master_params(self):
        """The fp32 weights as jax arrays in the params' storage layout: ``state.params``, or under optimizer
        offload the host masters re-stacked and placed like the device params."""
        return self.strategy.masters(self.state, self.plan.param_storage)

    def set_params(self, params) -> None:
        """Replace the weights with ``params`` (same tree and shapes; fp32 values, numpy or jax, any layout).

        Under optimizer offload the host masters and the device copies are both rebuilt from them and the
        optimizer moments start fresh (as DeepSpeed's load_module_only / fine-tuning from weights).
        """
        new, tdef = jax.tree.flatten(params)
        cur, cdef = jax.tree.flatten(self.state.params)
        if tdef != cdef:
            raise CheckpointError(f"set_params: the new weights' tree {tdef} is not this model's {cdef}; use the "
                                  "same model family and sizes")
        bad = [(a.shape, b.shape) for a, b in zip(new, cur) if tuple(a.shape) != tuple(b.shape)]
        if bad:
            raise CheckpointError(f"set_params: a weight of shape {list(bad[0][0])} replaces one of shape "
                                  f"{list(bad[0][1])} ({len(bad)} differ); use the same model sizes")
        storage = jax.tree.leaves(self.plan.param_storage)
        fp32 = [jax.device_put(jnp.asarray(x, jnp.float32) if not isinstance(x, jax.Array) else x.astype(jnp.float32),
                               s) for x, s in zip(new, storage)]
        self.state = self.strategy.with_params(self.state, jax.tree.unflatten(cdef, fp32))

    def n_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.state.params)))

    # ---- checkpoints (DeepSpeed's names; the work is in jzero.checkpoint)
    def save_checkpoint(self, save_dir, tag=None, client_state=None, data_iterator=None) -> int:
        """Save the train state as step ``tag`` (default: the optimizer step), async; see :func:`jzero.checkpoint.save`.
        Unlike DeepSpeed, the directory keeps only the ``checkpoint.max_to_keep`` (default 3) newest steps (null:
        all), and with that rotation on, a step below the directory's highest is refused."""
        from jzero import checkpoint

        return checkpoint.save(self, save_dir, tag, client_state, data_iterator)

    def load_checkpoint(self, load_dir, tag=None, data_iterator=None, load_module_only: bool = False):
        """Restore the train state into this engine's layout; returns DeepSpeed's ``(load_path, client_state)``:
        the step directory read (``<load_dir>/<step>``) and the saved ``client_state``. See
        :func:`jzero.checkpoint.load` (which returns the client_state alone)."""
        from jzero import checkpoint

        step = checkpoint._pick_step(checkpoint.reader(load_dir), load_dir, tag)   # (no meta read twice)
        client = checkpoint.load(self, load_dir, step, data_iterator, load_module_only)
        return f"{checkpoint.location(load_dir)}/{step}", client


def _placed(x: jax.Array, sharding, what: str, fix: str) -> jax.Array:
    """``x`` with ``sharding`` (the compiled step's input sharding): as is when it has it, moved when this process
    holds all of it; a global array laid out otherwise across processes is a one-line DataError."""
    if x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if not x.is_fully_addressable:
        raise DataError(f"{what}: a batch array sharded as {x.sharding} across processes, expected {sharding}; "
                        f"build it with {fix} (or jax.make_array_from_process_local_data with that sharding)")
    return jax.device_put(x, sharding)


# --------------------------------------------------------------------------- wiring


def initialize(config: JzeroConfig | str | os.PathLike | dict, model: nn.Module | None = None,
               model_config: Any = None, mesh: jax.sharding.Mesh | None = None, vocab_size: int | None = None,
               tx: optax.GradientTransformation | None = None, schedule: Callable | None = None,
               rules: shd.LogicalRules | None = None, task: Task | None = None, abstract: bool = False) -> Engine:
    """Build mesh, model, optimizer and the sharded train state; jit the steps (compiled on first use).

    ``config``: a :func:`jzero.load_config` result, or what it takes (a config file path, or a dict), as
    ``deepspeed.initialize(config=...)`` takes either. ``model`` defaults to the config's ``model`` section;
    ``vocab_size`` is the data's vocabulary (default 256; only for that default model). ``tx`` and ``schedule``
    (given together) replace the config's optimizer and scheduler; ``gradient_clipping`` still applies, chained
    before ``tx`` as DeepSpeed clips before a client optimizer;
    ``task`` defaults to causal LM on ``data.seq_len`` tokens (pass another for BERT heads and the like).
    ``abstract=True`` runs nothing and allocates nothing: the state is ShapeDtypeStructs with their shardings, for
    lowering and compiling the step on a topology this process cannot run (a mock GPU cluster, plan's fake one).
    """
    if isinstance(config, (str, os.PathLike, dict)):
        from jzero.config import load_config

        config = load_config(config)
    elif not isinstance(config, JzeroConfig):
        raise ConfigError(f"initialize: config has type {type(config).__name__}; pass "
                          "jzero.load_config(PATH_OR_DICT), a config file path or a dict")
    cfg = resolve(config, mesh.devices.size if mesh is not None else jax.device_count())
    check_supported(cfg)
    layout = build_layout(cfg, mesh, rules)
    own_model = model is None
    if model is not None and vocab_size is not None:
        raise ConfigError(f"initialize: vocab_size={vocab_size} is for the model built from the config; with a model "
                          f"passed in, its own config sets the vocabulary (drop vocab_size=)")
    if (tx is None) != (schedule is None):
        given, missing = ("tx", "schedule") if schedule is None else ("schedule", "tx")
        raise ConfigError(f"initialize: {given}= given without {missing}=; pass both (schedule: the step -> LR "
                          f"function tx uses, reported as lr) or neither (both built from the config's optimizer "
                          f"and scheduler)")
    if model is None:
        _check_save_names(cfg)
        model, model_config = _default_model(cfg, vocab_size)
    task = task or lm_task(cfg.data.seq_len)
    seed_key = jax.random.key(cfg.train.seed)
    init = lambda k: model.init(k, *task.init_inputs())  # noqa: E731
    boxed = jax.eval_shape(init, seed_key)["params"]
    abstract_params = nn.unbox(boxed)
    if tx is None:   # under offload, clipping is decided on the device over the global norm, not per chunk
        tx, schedule = _build_tx(cfg, layout.mesh, clipping=not offloaded(cfg), param_names=shd.logical_names(boxed))
    elif cfg.gradient_clipping > 0 and not offloaded(cfg):   # DeepSpeed clips before a client optimizer too
        tx = optax.chain(optax.clip_by_global_norm(cfg.gradient_clipping), tx)
    plan = _plan(cfg, layout, boxed, abstract_params)
    copies = (_copy_dtype(cfg, layout, own_model), weight_matrices(shd.logical_names(boxed)))
    strategy = _strategy(cfg, tx, plan, layout.mesh, abstract_params, copies)
    if abstract:
        state, state_shardings = _abstract_state(cfg, plan, strategy, abstract_params)
    else:
        from models.layers import init_as_scanned   # (an unrolled jzero model starts from its scanned twin's weights)

        params = jax.jit(lambda k: init_as_scanned(model, k, *task.init_inputs())["params"],
                         out_shardings=plan.param_storage)(seed_key)
        params, opt_state, opt_shardings = strategy.init(params)
        rep = plan.replicated
        loss_scale = jax.device_put(init_loss_scale(cfg.fp16), rep)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
                           loss_scale=loss_scale, compute=strategy.copies(params))
        state_shardings = _state_shardings(plan, opt_shardings, loss_scale, state.compute)

    loss_fn = lambda p, b: task.loss(model.apply, p, b)  # noqa: E731
    context = _step_context(cfg, layout, plan, abstract_params)
    # the pipeline applies the model once to all micro-batches; the loss stays the mean of the micro-batch means
    train_loss = (micro_batch_mean(task.loss, model.apply, layout.run.spec.micro_batches)
                  if layout.run is not None else loss_fn)
    grads_of = _grads_of(cfg, layout, plan, abstract_params, task.weight)
    train_fn = strategy.train_fn(train_loss, grads_of, schedule, context=context,
                                 skip_nonfinite=skips_nonfinite_steps(cfg.fp16, cfg.bf16))

    def eval_fn(params, batch):
        with context():
            if layout.run is not None:
                return pipeline.pipelined_eval(loss_fn, params, batch, layout.run, layout.mesh.shape["data"])
            return loss_fn(params, batch)

    return Engine(config=cfg, mesh=layout.mesh, model=model, model_config=model_config, tx=tx, schedule=schedule,
                  plan=plan, state=state, state_shardings=state_shardings, task=task,
                  _train=strategy.jit(train_fn, state_shardings, plan),
                  _eval=jax.jit(eval_fn, out_shardings=plan.replicated),
                  pipeline=layout.run, strategy=strategy)


def _state_shardings(plan, opt_shardings, loss_scale, compute=None) -> TrainState:
    """Where each part of the train state lives: params (and their compute copies) per the plan, scalars
    replicated."""
    rep = plan.replicated
    return TrainState(step=rep, params=plan.param_storage, opt_state=opt_shardings,
                      loss_scale=jax.tree.map(lambda _: rep, loss_scale),
                      compute=None if compute is None else copy_shardings(plan.param_storage, compute))


def _abstract_state(cfg: JzeroConfig, plan, strategy, abstract_params) -> tuple[TrainState, TrainState]:
    """(state as ShapeDtypeStructs with shardings, its shardings): ``initialize(abstract=True)``."""
    if strategy.offloaded:
        raise ConfigError("initialize(abstract=True): optimizer offload keeps its state in host memory, which an "
                          "abstract engine does not model; compile with offload_optimizer off")
    loss_scale = jax.eval_shape(lambda: init_loss_scale(cfg.fp16))
    compute = (None if strategy.copy_dtype is None
               else jax.eval_shape(lambda p: compute_copies(p, strategy.copy_dtype, strategy.copy_matrices),
                                   abstract_params))
    shardings = _state_shardings(plan, strategy.opt_shardings, loss_scale, compute)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=jax.eval_shape(strategy.tx.init, abstract_params), loss_scale=loss_scale,
                        compute=compute)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return state, shardings


def _check_save_names(cfg: JzeroConfig) -> None:
    """jzero's own models name only :data:`jzero.remat.MODEL_ACTIVATION_NAMES`: another name in
    ``activation_checkpointing.save_names`` would match nothing and silently save nothing (full remat)."""
    from jzero.remat import MODEL_ACTIVATION_NAMES

    unknown = [n for n in cfg.activation_checkpointing.effective_save_names if n not in MODEL_ACTIVATION_NAMES]
    if unknown:
        raise ConfigError(f"activation_checkpointing.save_names: {unknown[0]!r} names no activation of jzero's models; "
                          f"use some of {', '.join(MODEL_ACTIVATION_NAMES)} (a model you pass to initialize may name "
                          "its own)")


def _default_model(cfg: JzeroConfig, vocab_size: int | None):
    """The config's ``model`` section as a Flax module (remat from ``activation_checkpointing``)."""
    from models import build_model

    policy = _remat_policy(cfg)
    return build_model(cfg.model, vocab_size=vocab_size or 256, seq_len=cfg.data.seq_len, dtype=compute_dtype(cfg),
                       remat=policy is not None, remat_policy=policy)


def _plan(cfg: JzeroConfig, layout: Layout, boxed_params, abstract_params) -> shd.ShardingPlan:
    names = shd.logical_names(boxed_params)
    if layout.run is not None:
        pipeline.check_stack(names, abstract_params, layout.run.spec)
    try:
        return shd.make_plan(abstract_params, names, layout.mesh, cfg.zero_optimization.stage, layout.rules,
                             threshold=cfg.zero_optimization.stage3_param_persistence_threshold)
    except ValueError as exc:
        raise ConfigError(f"mesh.tensor={layout.mesh.shape['tensor']}: {exc}") from None


def _copy_dtype(cfg: JzeroConfig, layout: Layout, own_model: bool):
    """The dtype of the weight copies the on-device step keeps (:func:`jzero.step.compute_copies`), or None.

    Kept under bf16/fp16 for jzero's own models (``models/``: every weight matrix is cast to the compute dtype at
    its use, so reading a copy is the same number; a model passed in may use a matrix in fp32). Not kept, so the
    model casts the masters as before, where the gradient path is not the plain micro-batch scan: the pipeline,
    and ZeRO++ hpZ/qgZ/qwZ, whose manual regions and quantized gathers take the fp32 masters themselves; nor
    with ``JZERO_WEIGHT_COPIES=0`` in the environment (to measure what they save).
    """
    z = cfg.zero_optimization
    dtype = compute_dtype(cfg)
    flag = os.environ.get("JZERO_WEIGHT_COPIES", "").strip()   # the A/B switch (docs/cluster.md)
    if flag not in ("", "0", "1"):
        raise ConfigError(f"JZERO_WEIGHT_COPIES={flag!r}: use 0 (no weight copies) or 1 / unset (the default)")
    if flag == "0":
        return None
    if (not own_model or dtype == jnp.float32 or layout.run is not None or layout.hpz > 1
            or z.zero_quantized_gradients or z.zero_quantized_weights):
        return None
    return dtype


def _strategy(cfg: JzeroConfig, tx, plan: shd.ShardingPlan, mesh, abstract_params, copies=(None, None)):
    """Where the optimizer state lives and how a step updates it: fp32 masters + moments in pinned host memory,
    streamed chunk by chunk (offload_optimizer); the 1-bit optimizers' per-rank buffers and manual step; or the
    ZeRO layout on the devices (``copies``: the dtype and leaves of its compute-dtype weight copies)."""
    if offloaded(cfg):
        oo = cfg.zero_optimization.offload_optimizer
        return OptimizerOffload.build(tx, plan, abstract_params, compute_dtype(cfg), ratio=oo.ratio,
                                      max_norm=cfg.gradient_clipping)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    if is_onebit(cfg.optimizer.type):
        return OneBit.build(tx, abstract_opt, mesh, dtype_from_name(cfg.data_types.grad_accum_dtype),
                            fp16=cfg.fp16.enabled)
    return OnDevice(tx, shd.opt_state_shardings(tx, abstract_opt, plan), fp16=cfg.fp16.enabled,
                    copy_dtype=copies[0], copy_matrices=copies[1] if copies[0] is not None else None)


def _grads_of(cfg: JzeroConfig, layout: Layout, plan: shd.ShardingPlan, abstract_params,
              weight_fn: Callable | None = None) -> Callable:
    """The step's gradient path, ``(loss_fn, params, batch) -> (loss, grads)``: the pipeline's one forward and
    backward over all micro-batches, or the micro-batch scan. ``value_and_grad`` is the scan's one slot for
    another gradient path (``loss_fn -> value_and_grad fn``; None = ``jax.value_and_grad``): hpZ and qgZ fill it,
    weighting their per-node / per-rank losses by ``weight_fn`` (the task's ``weight``)."""
    if layout.run is not None:
        return lambda f, p, b: pipeline.pipelined_grads(f, p, b, plan.grad, layout.run)
    value_and_grad = None
    if layout.hpz > 1:   # ZeRO++ hpZ: the gradient reduced within the node first
        value_and_grad = lambda f: topology.hierarchical_value_and_grad(  # noqa: E731
            f, layout.mesh, layout.flat_rules, plan.grad, weight_fn)
    z = cfg.zero_optimization
    if z.zero_quantized_gradients:   # ZeRO++ qgZ: int8 gradient reduce-scatter (under hpZ: in the node, then across)
        value_and_grad = lambda f: quantized_reduce.value_and_grad(  # noqa: E731
            f, layout.mesh, layout.rules, plan, abstract_params, z.zero_quantized_weights, weight_fn=weight_fn)
    return micro_batch_grads(plan.grad, dtype_from_name(cfg.data_types.grad_accum_dtype), value_and_grad)


def _step_context(cfg: JzeroConfig, layout: Layout, plan: shd.ShardingPlan, abstract_params) -> Callable:
    """What the steps trace under: the sharding rules and (ZeRO++ qwZ) int8 weight gathers."""
    qwz = cfg.zero_optimization.zero_quantized_weights

    @contextlib.contextmanager
    def context():
        with shd.activate(layout.mesh, layout.rules), quantized_gather.for_step(qwz, plan, abstract_params):
            yield

    return context


def _remat_policy(cfg: JzeroConfig):
    ac = cfg.activation_checkpointing
    if ac == type(ac)():
        return None
    from jzero.remat import remat_policy

    return remat_policy(ac, in_scan=cfg.model.scan_layers)[1]


def _build_tx(cfg: JzeroConfig, mesh, clipping: bool = True, param_names=None):
    """The optax chain and LR schedule named by the config (1-bit optimizers get the data-axis size);
    ``clipping=False`` leaves ``gradient_clipping`` out of the chain (the offloaded step applies it itself);
    ``param_names`` (logical names per param leaf) tell LAMB which leaves stack layers (a trust ratio per layer)."""
    from jzero.optim import layer_stacked_axes

    stacked = layer_stacked_axes(param_names) if param_names is not None else None
    sched = cfg.scheduler.model_dump() if cfg.scheduler else None
    if is_onebit(cfg.optimizer.type):
        params = cfg.optimizer.params
        schedule = build_schedule(sched["type"] if sched else None, sched["params"] if sched else {},
                                  float(params.get("lr", 1e-3)))
        tx = build_onebit(cfg.optimizer.type, params, schedule, data_size=mesh.shape["data"],
                          gradient_clipping=cfg.gradient_clipping, stacked_axes=stacked,
                          momentum=build_momentum_schedule(sched["type"], sched["params"]) if sched else None)
        return tx, schedule
    return build_optimizer(cfg.optimizer.model_dump(), sched, cfg.gradient_clipping if clipping else 0.0,
                           stacked_axes=stacked)
