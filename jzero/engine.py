"""The engine: DeepSpeed's ``initialize`` habit on a jitted, sharded JAX train step.

    engine = jzero.initialize(cfg)                 # mesh, model, optimizer, sharded state, compiled step
    metrics = engine.train_step(batch_AxBxT1)      # one optimizer step over `accum` micro-batches
    loss = engine.eval_step(batch_BxT1)

The step is built from small pure pieces so later features add to it rather than rewrite it:
``loss_fn`` (model + next-token cross-entropy) -> ``accumulate_grads`` (scan over micro-batches, gradients put in
the ZeRO gradient layout right after each backward pass) -> ``apply_update`` (optax chain with clipping and
the LR schedule). Shardings come from one :class:`jzero.sharding.ShardingPlan`; jit is given explicit in/out
shardings and donates the state, so XLA inserts ZeRO's collectives and reuses the buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero import pipeline
from jzero import sharding as shd
from jzero.config import JzeroConfig, resolve
from jzero.errors import ConfigError
from jzero.mesh import make_mesh
from jzero.optim import applied_steps
from jzero.optim.onebit import is_onebit
from jzero.precision import (LossScaleState, all_finite, init_loss_scale, scale_loss, select_tree,
                             skips_nonfinite_steps, unscale_grads, update_loss_scale)

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken (int32, replicated)
    params: Any              # fp32 master params, in the plan's storage layout
    opt_state: Any           # optax state, param-shaped leaves in the ZeRO layout for stage >= 1
    loss_scale: LossScaleState   # fp16 dynamic/static loss scaler (static 1.0 without fp16); skipped_steps


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
    if is_onebit(cfg.optimizer.type):
        if z.stage >= 1:
            unsupported.append(("zero_optimization.stage", f"{cfg.optimizer.type} needs every rank's whole momentum "
                                "(as DeepSpeed, it refuses ZeRO); use zero_optimization.stage=0"))
        if cfg.mesh.tensor not in (1, -1) or cfg.mesh.pipeline not in (1, -1):
            unsupported.append(("mesh", f"{cfg.optimizer.type} runs data parallel only; set mesh.tensor=1 "
                                "mesh.pipeline=1"))
    if z.offload_optimizer.device != "none":
        from jzero.offload import OFFLOADABLE_OPTIMIZERS

        key = "zero_optimization.offload_optimizer.device"
        if z.stage == 0:
            unsupported.append((key, "optimizer offload partitions like ZeRO (DeepSpeed: valid with stage 1, 2 and "
                                "3); set zero_optimization.stage to 1, 2 or 3"))
        if cfg.optimizer.type.lower() not in {o.lower() for o in OFFLOADABLE_OPTIMIZERS}:   # as DeepSpeed
            unsupported.append((key, f"offloading {cfg.optimizer.type} is not implemented (the chunked host update "
                                f"is exact only for element-wise optimizers: {', '.join(OFFLOADABLE_OPTIMIZERS)})"))
        if cfg.mesh.pipeline not in (1, -1):
            unsupported.append((key, "optimizer offload with mesh.pipeline > 1 is not implemented; set "
                                "mesh.pipeline=1"))
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
    from jzero.quantized_reduce import check_config as check_qgz

    check_qgz(cfg)   # ZeRO++ qgZ's unsupported combinations


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """What a batch is and how a model turns it into a loss.

    ``micro_batch(rows)`` gives the ShapeDtypeStruct pytree of one micro-batch with ``rows`` rows (every leaf's
    leading dim is rows; the train step takes the same tree with an extra leading ``accum`` dim);
    ``loss(apply_fn, params, micro_batch) -> scalar``; ``init_inputs()`` are the args ``model.init`` traces with.
    """

    micro_batch: Callable[[int], Any]
    loss: Callable[..., jax.Array]
    init_inputs: Callable[[], tuple]


def lm_task(seq_len: int) -> Task:
    """Causal language modelling on int32 token rows of length ``seq_len + 1``."""
    return Task(micro_batch=lambda rows: jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32),
                loss=lm_loss, init_inputs=lambda: (jnp.zeros((1, seq_len), jnp.int32),))


# --------------------------------------------------------------------------- pure pieces of the step


def lm_loss(apply_fn: Callable, params, tokens_BxT1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (fp32) of ``tokens[:, :-1] -> tokens[:, 1:]``.

    A bf16 model with a fused head (GPT-2, Llama: ``fused_head``) on the GPU applies its head inside
    :func:`jzero.kernels.cross_entropy.head_cross_entropy` (Pallas; the logits are read once, never kept);
    otherwise logits from the model, then :func:`cross_entropy`.
    """
    inputs, labels = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    if _use_fused_head(apply_fn):
        from jzero.kernels.cross_entropy import head_cross_entropy

        hidden, w_VxD = apply_fn({"params": params}, inputs, head=False)
        return head_cross_entropy(hidden, w_VxD, labels).mean()
    return cross_entropy(apply_fn({"params": params}, inputs), labels).mean()


def _use_fused_head(apply_fn: Callable) -> bool:
    from jzero import kernels
    from jzero.kernels import cross_entropy as kernel_ce

    module = getattr(apply_fn, "__self__", None)
    cfg = getattr(module, "cfg", None)
    return (getattr(module, "fused_head", False) and cfg is not None
            and jnp.dtype(cfg.dtype) == jnp.dtype(jnp.bfloat16)
            and kernels.enabled("cross_entropy") and kernel_ce.supported())


@jax.custom_vjp
def cross_entropy(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32 without ever materialising fp32 logits (or their fp32 gradient).

    Forward: ``logsumexp(upcast(logits)) - logits[label]``, the upcast fused into the reductions. Backward (custom
    VJP): ``(softmax - onehot) * g`` computed in fp32 inside one fusion and written straight in the logits' dtype.
    With bf16 logits on GPT-2 124M (16 x 1024 x 50304) the fp32 copies cost ~2.8 ms of a 39 ms H100 step.
    """
    return _ce_fwd(logits_BxTxV, labels_BxT)[0]


def _lse_combine(a, b):
    """Merge two partial (max, sum of exp(x - max)) pairs; one exp per merge, empty (-inf, 0) pairs stay exact."""
    m1, s1 = a
    m2, s2 = b
    e = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """fp32 logsumexp over the last axis in ONE read of ``x`` (an online-softmax variadic reduction).

    ``jax.nn.logsumexp`` reads its input twice (a max pass, then a sum-of-exp pass); over bf16 logits of GPT-2
    124M (1.65 GB per step) each pass costs ~0.6 ms on an H100.
    """
    x32 = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x32, jnp.ones_like(x32)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), _lse_combine,
                          (x.ndim - 1,))
    return m + jnp.log(s)


def _ce_fwd(logits, labels):
    if logits.dtype != jnp.float32:
        lse = logsumexp_one_pass(logits)
    else:   # fp32 logits keep jax's two-pass logsumexp (results unchanged)
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse - picked, (logits, labels, lse)


def _ce_bwd(res, g):
    logits, labels, lse = res
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    dlogits = ((probs - onehot) * g[..., None]).astype(logits.dtype)
    return dlogits, None


cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def accumulate_grads(loss_fn: Callable, params, batch_AxBx: Any, grad_shardings, accum_dtype=jnp.float32,
                     value_and_grad: Callable | None = None):
    """Mean loss and gradient over the leading micro-batch axis (``lax.scan``; one backward at a time).

    Each micro-batch gradient is put in ``grad_shardings`` right after its backward pass: replicated (all-reduce)
    for ZeRO 0/1, partitioned over ``data`` (reduce-scatter) for ZeRO 2/3, so the accumulator is partitioned too.
    ``value_and_grad`` replaces ``jax.value_and_grad(loss_fn)`` (hpZ's node-first reduction, jzero.topology).
    """
    if grad_shardings is None:   # inside a shard_map (1-bit step): layouts are manual, nothing to constrain
        put = lambda g: g  # noqa: E731
    else:
        put = lambda g: jax.tree.map(jax.lax.with_sharding_constraint, g, grad_shardings)  # noqa: E731
    grad_fn = value_and_grad or jax.value_and_grad(loss_fn)
    n_micro = jax.tree.leaves(batch_AxBx)[0].shape[0]
    if n_micro == 1:
        loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch_AxBx))
        return loss, put(grads)

    def micro(carry, tokens):
        loss_sum, acc = carry
        loss, g = grad_fn(params, tokens)
        g = put(g)
        acc = jax.tree.map(lambda a, b: a + b.astype(accum_dtype), acc, g)
        return (loss_sum + loss, put(acc)), None

    refs = jax.tree.leaves((params, batch_AxBx))
    zeros = put(jax.tree.map(lambda p: _varying_like(jnp.zeros(p.shape, accum_dtype), refs), params))
    init = (_varying_like(jnp.zeros((), jnp.float32), refs), zeros)
    (loss_sum, acc), _ = jax.lax.scan(micro, init, batch_AxBx)
    grads = jax.tree.map(lambda a, p: (a / n_micro).astype(p.dtype), acc, params)
    return loss_sum / n_micro, grads


def _varying_like(x: jax.Array, refs) -> jax.Array:
    """``x`` marked varying over every manual mesh axis any of ``refs`` varies over (a no-op outside a
    ``shard_map``). Inside one (the 1-bit step) a scan's zero-initialised carry must have the varying-axes type
    its body returns, which a gradient of varying params over varying rows has."""
    varying = lambda a: jax.typeof(a).manual_axis_type.varying  # noqa: E731
    axes = frozenset().union(*(varying(r) for r in refs)) - varying(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def apply_update(tx: optax.GradientTransformation, params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


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
    offload: Any = None      # jzero.offload.OptimizerOffload under offload_optimizer (then _train is the gradient)

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

    # ---- data placement
    def put_batch(self, local_batch) -> Any:
        """Assemble the global train batch from this process's rows (leaves ``[accum, local_rows, ...]``)."""
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s.sharding, np.asarray(x, s.dtype),
                                                                                  s.shape),
                            local_batch, self.batch_spec())

    def put_eval_batch(self, local_batch) -> Any:
        """Assemble a global eval batch (leaves ``[local_rows, ...]``, rows over ``data``)."""
        def one(x):
            x = np.asarray(x)
            shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            return jax.make_array_from_process_local_data(self.plan.batch(x.ndim, 0), x, shape)
        return jax.tree.map(one, local_batch)

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
        """One optimizer step; ``batch`` is a global ``[accum, rows, seq+1]`` array or this process's numpy rows."""
        if not isinstance(jax.tree.leaves(batch)[0], jax.Array):
            batch = self.put_batch(batch)
        if self.offload is not None:
            grads, mult, ok, loss_scale, step, metrics = self.compile()(self.state, batch)
            params, opt_state = self.offload.apply(self.state.params, grads, self.state.opt_state, mult, ok)
            self.state = TrainState(step=step, params=params, opt_state=opt_state, loss_scale=loss_scale)
            return metrics
        self.state, metrics = self.compile()(self.state, batch)
        return metrics

    def eval_step(self, batch) -> jax.Array:
        if not isinstance(jax.tree.leaves(batch)[0], jax.Array):
            batch = self.put_eval_batch(batch)
        return self._eval(self.state.params, batch)

    # ---- measurements
    def memory_per_device(self) -> dict[str, int]:
        """Bytes of params and optimizer state held by the first local device (from the real shards)."""
        return {"params": shd.per_device_bytes(self.state.params, memory_kind="device"),
                "opt_state": shd.per_device_bytes(self.state.opt_state, memory_kind="device"),
                "host": shd.per_device_bytes(self.state, memory_kind="pinned_host")}

    def master_params(self):
        """The fp32 weights as jax arrays in the params' storage layout: ``state.params``, or under optimizer
        offload the host masters re-stacked and placed like the device params."""
        if self.offload is None:
            return self.state.params
        host = self.offload.master_params(self.state.opt_state)
        return jax.tree.map(lambda x, s: jax.device_put(x, s), host, self.plan.param_storage)

    def set_params(self, params) -> None:
        """Replace the weights with ``params`` (same tree and shapes; fp32 values, numpy or jax, any layout).

        Under optimizer offload the host masters and the device copies are both rebuilt from them and the
        optimizer moments start fresh (as DeepSpeed's load_module_only / fine-tuning from weights).
        """
        from jzero.errors import CheckpointError

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
        if self.offload is None:
            self.state = self.state.replace(params=jax.tree.unflatten(
                cdef, [x.astype(c.dtype) for x, c in zip(fp32, cur)]))
        else:
            dev, opt_state, _ = self.offload.init(jax.tree.unflatten(cdef, fp32))
            self.state = self.state.replace(params=dev, opt_state=opt_state)

    def n_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.state.params)))

    # ---- checkpoints (DeepSpeed's names; the work is in jzero.checkpoint)
    def save_checkpoint(self, save_dir, tag=None, client_state=None, data_iterator=None) -> int:
        """Save the train state as step ``tag`` (default: the optimizer step), async; see :func:`jzero.checkpoint.save`."""
        from jzero import checkpoint

        return checkpoint.save(self, save_dir, tag, client_state, data_iterator)

    def load_checkpoint(self, load_dir, tag=None, data_iterator=None, load_module_only: bool = False):
        """Restore the train state into this engine's layout; returns client_state. See :func:`jzero.checkpoint.load`."""
        from jzero import checkpoint

        return checkpoint.load(self, load_dir, tag, data_iterator, load_module_only)


def _remat_policy(cfg: JzeroConfig):
    ac = cfg.activation_checkpointing
    if ac == type(ac)():
        return None
    from jzero.remat import remat_policy

    return remat_policy(ac, in_scan=cfg.model.scan_layers)[1]


def _names_tree(boxed_params):
    """Logical names of every param leaf, as tuples (from Flax's LogicallyPartitioned metadata)."""
    specs = nn.get_partition_spec(boxed_params)
    shapes = nn.unbox(boxed_params)

    def one(spec, leaf):
        names = tuple(spec) if spec is not None else ()
        return names if len(names) == len(leaf.shape) else (None,) * len(leaf.shape)

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def initialize(config: JzeroConfig, model: nn.Module | None = None, model_config: Any = None,
               mesh: jax.sharding.Mesh | None = None, vocab_size: int | None = None,
               tx: optax.GradientTransformation | None = None, schedule: Callable | None = None,
               rules: shd.LogicalRules | None = None, task: Task | None = None) -> Engine:
    """Build mesh, model, optimizer and the sharded train state; jit the steps (compiled on first use).

    ``model`` defaults to the config's ``model`` section; ``vocab_size`` is the data's vocabulary (default 256);
    ``task`` defaults to causal LM on ``data.seq_len`` tokens (pass another for BERT heads and the like).
    """
    devices = mesh.devices.size if mesh is not None else jax.device_count()
    cfg = resolve(config, devices)
    check_supported(cfg)
    rules = rules if rules is not None else shd.rules_for(cfg.mesh)   # mesh.sequence_parallel picks the table
    spec = pipeline.spec_from_config(cfg)
    run = pipeline.PipelineRun(spec) if spec is not None else None
    if run is not None:
        rules = pipeline.pipeline_rules(rules)   # the stacked 'layers' dim stored over the pipeline axis
    hpz = cfg.zero_optimization.zero_hpz_partition_size
    flat_rules = rules
    if hpz > 1:   # ZeRO++ hpZ: batch over node x data, ZeRO over data (within the node)
        from jzero.topology import hierarchical_rules

        rules = hierarchical_rules(rules)
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh, hpz=hpz)
    if hpz > 1 and "node" not in mesh.axis_names:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz}: the given mesh has no 'node' axis; "
                          "build it with jzero.mesh.make_mesh(cfg.mesh, hpz=...) or leave mesh out")
    dtype = compute_dtype(cfg)
    if model is None:
        from models import build_model

        policy = _remat_policy(cfg)
        model, model_config = build_model(cfg.model, vocab_size=vocab_size or 256, seq_len=cfg.data.seq_len,
                                          dtype=dtype, remat=policy is not None,
                                          remat_policy=policy if policy is not None else None)
    onebit = is_onebit(cfg.optimizer.type)
    offload = cfg.zero_optimization.offload_optimizer.device == "cpu"
    if tx is None:   # under offload, clipping is decided on the device over the global norm, not per chunk
        tx, schedule = _build_tx(cfg, mesh, clipping=not offload)
    accum_dtype = DTYPES[cfg.data_types.grad_accum_dtype or "fp32"]

    seed_key = jax.random.key(cfg.train.seed)
    task = task or lm_task(cfg.data.seq_len)
    inputs = task.init_inputs()
    boxed = jax.eval_shape(lambda k: model.init(k, *inputs), seed_key)["params"]
    names = _names_tree(boxed)
    abstract_params = nn.unbox(boxed)
    if run is not None:
        pipeline.check_stack(names, abstract_params, spec)
    try:
        plan = shd.make_plan(abstract_params, names, mesh, cfg.zero_optimization.stage, rules,
                             threshold=cfg.zero_optimization.stage3_param_persistence_threshold)
    except ValueError as exc:
        raise ConfigError(f"mesh.tensor={mesh.shape['tensor']}: {exc}") from None

    params = jax.jit(lambda k: nn.unbox(model.init(k, *inputs))["params"],
                     out_shardings=plan.param_storage)(seed_key)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    runner = None
    if offload:   # fp32 master + optimizer state to pinned host; the device keeps compute-dtype weights
        from jzero.offload import OptimizerOffload

        runner = OptimizerOffload.build(tx, plan, abstract_params, dtype,
                                        ratio=cfg.zero_optimization.offload_optimizer.ratio)
        params, opt_state, opt_shardings = runner.init(params)
    elif onebit:   # per-rank error buffers carry a leading data dim; the rest replicated
        from jzero.optim.onebit import onebit_state_specs

        opt_specs = onebit_state_specs(abstract_opt)
        opt_shardings = jax.tree.map(lambda sp: NamedSharding(mesh, sp), opt_specs,
                                     is_leaf=lambda x: isinstance(x, P))
    else:
        opt_shardings = shd.opt_state_shardings(tx, abstract_opt, plan)
    if not offload:
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    loss_scale = jax.device_put(init_loss_scale(cfg.fp16), plan.replicated)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), plan.replicated), params=params,
                       opt_state=opt_state, loss_scale=loss_scale)
    state_shardings = TrainState(step=plan.replicated, params=plan.param_storage, opt_state=opt_shardings,
                                 loss_scale=jax.tree.map(lambda _: plan.replicated, loss_scale))
    skip_nonfinite = skips_nonfinite_steps(cfg.fp16, cfg.bf16)

    loss_fn = lambda p, b: task.loss(model.apply, p, b)  # noqa: E731
    from jzero import quantized_gather, quantized_reduce, topology

    qwz_context = lambda: quantized_gather.for_step(  # noqa: E731  (ZeRO++ qwZ: int8 weight gathers when on)
        cfg.zero_optimization.zero_quantized_weights, plan, abstract_params)

    # mesh.pipeline > 1: the step's micro-batches go through the pipeline together, one backward pass
    def train_fn(state: TrainState, batch):
        ls = state.loss_scale
        scaled_loss_fn = lambda p, b: scale_loss(loss_fn(p, b), ls)  # noqa: E731  (x1.0 without fp16)
        with shd.activate(mesh, rules), qwz_context():
            if run is not None:
                scaled_loss, grads = pipeline.pipelined_grads(scaled_loss_fn, state.params, batch, plan.grad, run)
            else:
                vg = (topology.hierarchical_value_and_grad(scaled_loss_fn, mesh, flat_rules, plan.grad)
                      if hpz > 1 else None)
                if cfg.zero_optimization.zero_quantized_gradients:   # ZeRO++ qgZ (under hpZ: node, then across)
                    vg = quantized_reduce.value_and_grad(scaled_loss_fn, mesh, rules, plan, abstract_params,
                                                         cfg.zero_optimization.zero_quantized_weights)
                scaled_loss, grads = accumulate_grads(scaled_loss_fn, state.params, batch, plan.grad, accum_dtype,
                                                      value_and_grad=vg)
            grads = unscale_grads(grads, ls, jnp.float32) if cfg.fp16.enabled else grads
            grad_norm = optax.tree.norm(grads)
            params, opt_state = apply_update(tx, state.params, state.opt_state, grads)
        lr = jnp.asarray(schedule(_lr_count(state)), jnp.float32)
        if skip_nonfinite:   # DeepSpeed: an overflowed step leaves params, optimizer state and the LR untouched
            finite = all_finite(grads)
            params, opt_state = select_tree(finite, (params, opt_state), (state.params, state.opt_state))
            ls = update_loss_scale(ls, finite)
        metrics = {"loss": scaled_loss / state.loss_scale.scale, "grad_norm": grad_norm, "lr": lr,
                   "loss_scale": state.loss_scale.scale, "skipped_steps": ls.skipped_steps}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls), metrics

    if onebit:
        from jzero.optim.onebit import onebit_train_fn

        train_fn = onebit_train_fn(loss_fn, tx, schedule, mesh, opt_specs, accum_dtype, fp16=cfg.fp16.enabled,
                                   skip_nonfinite=skip_nonfinite)
    if offload:
        from jzero.offload import make_grad_fn

        grad_fn = make_grad_fn(loss_fn, schedule, mesh, rules, plan, accum_dtype, cfg.gradient_clipping,
                               skip_nonfinite)
        rep = plan.replicated
        grad_out = (plan.grad, rep, rep, jax.tree.map(lambda _: rep, loss_scale), rep, rep)

    def eval_fn(params, batch):
        with shd.activate(mesh, rules), qwz_context():
            if run is not None:
                return pipeline.pipelined_eval(loss_fn, params, batch, run, mesh.shape["data"])
            return loss_fn(params, batch)

    if offload:   # the device program is the gradient; the update is OptimizerOffload.apply's chunk programs
        train = jax.jit(grad_fn, out_shardings=grad_out)
    else:
        train = jax.jit(train_fn, out_shardings=(state_shardings, plan.replicated), donate_argnums=(0,))
    evaluate = jax.jit(eval_fn, out_shardings=plan.replicated)
    return Engine(config=cfg, mesh=mesh, model=model, model_config=model_config, tx=tx, schedule=schedule,
                  plan=plan, state=state, state_shardings=state_shardings, task=task, _train=train, _eval=evaluate,
                  pipeline=run, offload=runner)


def _lr_count(state: TrainState):
    """Applied optimizer updates (the schedule's count; DeepSpeed's scheduler does not advance on a skipped
    step); a user-supplied optax chain without a schedule state falls back to the step counter."""
    try:
        return applied_steps(state.opt_state)
    except ValueError:
        return state.step


def _build_tx(cfg: JzeroConfig, mesh, clipping: bool = True):
    """The optax chain and LR schedule named by the config (1-bit optimizers get the data-axis size);
    ``clipping=False`` leaves ``gradient_clipping`` out of the chain (the offloaded step applies it itself)."""
    from jzero.optim import build_optimizer
    from jzero.optim.onebit import build_onebit
    from jzero.optim.schedules import build_schedule

    sched = cfg.scheduler.model_dump() if cfg.scheduler else None
    if is_onebit(cfg.optimizer.type):
        params = cfg.optimizer.params
        schedule = build_schedule(sched["type"] if sched else None, sched["params"] if sched else {},
                                  float(params.get("lr", 1e-3)))
        tx = build_onebit(cfg.optimizer.type, params, schedule, data_size=mesh.shape["data"],
                          gradient_clipping=cfg.gradient_clipping)
        return tx, schedule
    return build_optimizer(cfg.optimizer.model_dump(), sched, cfg.gradient_clipping if clipping else 0.0)
