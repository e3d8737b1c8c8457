"""Every key of DeepSpeed's config schema, and what jzero does with it: one table, applied before validation.

DeepSpeed's config classes (``deepspeed/runtime/config.py``, ``zero/config.py``, ``zero/offload_config.py``,
``precision_config.py``, ``activation_checkpointing/config.py``, ``monitor/config.py``, ``comm/config.py``,
``checkpoint_engine``, ``pipe``, ``elasticity``, ``autotuning``, ...) accept far more keys than a JAX engine
has uses for. Each key here has exactly one fate:

``implemented``    jzero does what DeepSpeed does (the pydantic schema in :mod:`jzero.config` validates it);
``xla``            mapped to its XLA equivalent (the note names the flag);
``no_effect``      meaningless under XLA (PyTorch allocator, hook timing, CUDA-stream knobs, launcher-only
                   features): accepted with any value, removed before validation, and named in ONE line the run
                   prints at start (:func:`no_effect_line`) with the reason;
``alias``          DeepSpeed's deprecated or alternative spelling, rewritten to the key it stands for;
``unimplemented``  accepted only at the value that switches the feature off (DeepSpeed's default); any other
                   value is a :class:`ConfigError` naming the feature.

Keys the pydantic schema checks itself (``by_schema``) are listed for the table in ``docs/deepspeed_keys.md``
(generated from :data:`KEYS` by :func:`markdown_table`) and are left alone by :func:`normalize`.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from jzero.errors import ConfigError

IMPLEMENTED, XLA, NO_EFFECT, ALIAS, UNIMPLEMENTED = "implemented", "xla", "no_effect", "alias", "unimplemented"


class _Off:
    """Marker default of a section that is off unless its ``enabled`` key is true."""

    def __repr__(self):
        return "{enabled: false}"


OFF = _Off()
ABSENT = object()   # marker default of a section that DeepSpeed turns on by its mere presence


@dataclass(frozen=True)
class Key:
    fate: str
    why: str
    default: Any = None          # unimplemented: the accepted (feature-off) value; OFF / ABSENT for sections
    to: str | None = None        # alias: the key it stands for
    convert: Callable[[Any], Any] | None = None   # alias: value -> the target's value (None: drop the alias)
    by_schema: bool = False      # validated by jzero.config's pydantic models, not by normalize


def _impl(why: str) -> Key:
    return Key(IMPLEMENTED, why, by_schema=True)


def _schema_refuses(why: str) -> Key:
    return Key(UNIMPLEMENTED, why, by_schema=True)


def _none(why: str) -> Key:
    return Key(NO_EFFECT, why)


def _unimpl(why: str, default: Any = OFF) -> Key:
    return Key(UNIMPLEMENTED, why, default=default)


_XLA_PLANS = "XLA plans every buffer of the compiled step itself"
_XLA_SCHEDULES = ("XLA's scheduler orders and overlaps the collectives of the compiled step itself (its "
                  "latency-hiding scheduler on GPU)")
_STAGE3_FETCH = ("ZeRO-3 gathers each layer's weights inside the scanned layer body and XLA schedules the "
                 "gathers; there is no parameter cache to size")
_AC = "activation_checkpointing: jzero picks what to keep with activation_checkpointing.policy"
_LAUNCHER = "is run by DeepSpeed's launcher or a separate tool, not by the training engine"


def _cpu(value):
    return {"device": "cpu"} if value else None


#: dotted DeepSpeed key -> its fate (a section entry covers everything under it)
KEYS: dict[str, Key] = {
    # ---- batch, logging, clipping (deepspeed/runtime/config.py)
    "train_batch_size": _impl("DeepSpeed's rule: train_batch_size = micro * accumulation * data-parallel size"),
    "train_micro_batch_size_per_gpu": _impl("rows per data-parallel rank per micro-batch"),
    "gradient_accumulation_steps": _impl("micro-batches scanned inside the compiled step (lax.scan)"),
    "steps_per_print": _impl("jzero.monitor: progress line every N steps"),
    "gradient_clipping": _impl("global-norm clipping with DeepSpeed's 1e-6 (jzero.optim)"),
    "wall_clock_breakdown": _impl("data / compute / host-sync times per logged step (jzero.monitor)"),
    "prescale_gradients": _none("jzero differentiates the mean loss over the global batch, so every rank's gradient "
                                "is already divided by the data-parallel size before XLA reduces it (what prescale "
                                "does)"),
    "gradient_predivide_factor": _none("splits DeepSpeed's 1/world-size division around its all-reduce; the "
                                       "reduced gradient is the same, and jzero's is the mean loss's"),
    "sparse_gradients": _none("PyTorch sparse embedding gradients; XLA's gradients are dense arrays and the result "
                              "is the same"),
    "zero_allow_untested_optimizer": _none("allows a client PyTorch optimizer under ZeRO; jzero's optimizers are "
                                           "its own, built from optimizer.type"),
    "zero_force_ds_cpu_optimizer": _none("forces DeepSpeedCPUAdam under offload; jzero's offloaded update is its "
                                         "own (jzero.offload)"),
    "communication_data_type": _unimpl("a gradient all-reduce dtype other than XLA's choice", default=None),
    "seq_parallel_communication_data_type": _none("dtype of DeepSpeed-Ulysses' all-to-alls, which jzero does not "
                                                  "have (mesh.sequence_parallel is Megatron-style)"),
    "fp32_allreduce": _unimpl("forcing an fp32 gradient all-reduce (legacy key)", default=False),
    "disable_allgather": _none("deprecated in DeepSpeed, which no longer reads it"),
    "dump_state": _none("prints DeepSpeed's engine state at start; jzero writes the resolved config.json"),
    "memory_breakdown": _none("prints PyTorch allocator statistics; jzero reports bytes per device measured from "
                              "the arrays (summary.json)"),
    "graph_harvesting": _none("captures CUDA graphs; the whole jzero step is one compiled XLA program"),
    "dataloader_drop_last": _none("configures the DataLoader deepspeed.initialize builds from training_data; "
                                  "jzero's loaders always drop the last partial batch"),
    "use_data_before_expert_parallelism": _none("orders MoE process groups; jzero has no MoE"),
    "timers": _none("DeepSpeed's throughput timer; jzero measures tokens/s on every step"),
    "compile": _none("torch.compile / DeepCompile; the whole jzero step is always compiled by XLA"),
    "flops_profiler": _none("train.pretrain always records the compiled step's FLOPs profile in summary.json "
                            "(flops_profile)"),
    "autotuning": _none(f"DeepSpeed's autotuner {_LAUNCHER} (deepspeed --autotuning); jzero has none"),
    "aio": _none("configures libaio for NVMe offload, which jzero does not implement"),
    "elasticity": _unimpl("elastic training (changing the GPU count during a run)"),
    "amp": _unimpl("NVIDIA Apex AMP (use fp16 or bf16)"),
    "torch_autocast": _unimpl("torch.autocast mixed precision (use bf16 or fp16)"),
    "eigenvalue": _unimpl("eigenvalue (Hessian) computation"),
    "progressive_layer_drop": _unimpl("progressive layer dropping"),
    "curriculum_learning": _unimpl("curriculum learning"),
    "data_efficiency": _unimpl("data efficiency (data sampling / routing)"),
    "compression_training": _unimpl("compression training (quantization-aware training, pruning)", default=ABSENT),
    "quantize_training": _unimpl("MoQ quantized training"),
    "weight_quantization": _unimpl("weight quantization", default=ABSENT),
    "sparse_attention": _unimpl("block-sparse attention (DeepSpeed Sparse Attention kernels)", default=ABSENT),
    "nebula": _unimpl("Nebula checkpointing service"),
    "hybrid_engine": _unimpl("the RLHF hybrid engine"),
    "comms_logger": _unimpl("the communication logger (jzero.optim.comm.collective_bytes counts a compiled "
                            "program's collectives)"),
    "tensor_parallel": _unimpl("DeepSpeed AutoTP (use mesh.tensor)", default=ABSENT),
    "sequence_parallel_size": _unimpl("DeepSpeed-Ulysses sequence parallelism", default=1),
    "bfloat16": Key(ALIAS, "DeepSpeed's older name of bf16", to="bf16", convert=lambda v: v),
    # ---- optimizer / scheduler
    "optimizer.type": _impl("Adam, AdamW, Lamb, OneBitAdam, ZeroOneAdam, OneBitLamb, SignSGD (case-insensitive); "
                            "DeepSpeed_Adam (DeepSpeedCPUAdam in old DeepSpeed) is Adam"),
    "optimizer.params": _impl("DeepSpeed's parameters of that optimizer (jzero.optim, jzero.optim.onebit)"),
    "scheduler.type": _impl("WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"),
    "scheduler.params.last_batch_iteration": Key(IMPLEMENTED, "-1 (a fresh schedule; a resumed run's position "
                                                 "comes from the checkpoint); other values are refused "
                                                 "(jzero.optim.schedules)"),
    "scheduler.params": _impl("DeepSpeed's parameters of that schedule (jzero.optim.schedules)"),
    # ---- fp16 / bf16 / data_types (precision_config.py)
    "fp16.enabled": _impl("fp16 compute, fp32 masters (+ fp16 copies of the weight matrices, jzero.step), dynamic "
                          "loss scaling (jzero.precision)"),
    "fp16.loss_scale": _impl("0 = dynamic, > 0 = static scale"),
    "fp16.initial_scale_power": _impl("initial dynamic scale 2**power"),
    "fp16.loss_scale_window": _impl("clean steps before the scale doubles"),
    "fp16.hysteresis": _impl("overflows absorbed before the scale halves"),
    "fp16.consecutive_hysteresis": _impl("refill hysteresis on every clean step"),
    "fp16.min_loss_scale": _impl("floor of the dynamic scale"),
    "fp16.auto_cast": _none("casts a PyTorch module's floating inputs to fp16; jzero's inputs are integer tokens "
                            "and with fp16.enabled the model already computes in fp16"),
    "fp16.fp16_master_weights_and_grads": _schema_refuses("fp16 master weights (jzero keeps fp32 masters)"),
    "bf16.enabled": _impl("bf16 compute, fp32 masters and optimizer state (+ bf16 copies of the weight matrices, "
                          "jzero.step)"),
    "bf16.check_grad_overflow": _impl("skip a step whose gradients are not finite"),
    "bf16.immediate_grad_update": _schema_refuses("a PyTorch backward-hook timing detail"),
    "bf16.bf16_master_weights_and_grads": _schema_refuses("bf16 master weights"),
    "bf16.bf16_optimizer_states": _schema_refuses("bf16 optimizer state"),
    "data_types.grad_accum_dtype": _impl("dtype of the micro-batch gradient accumulator"),
    "data_types.param_dtype": _schema_refuses("a separate parameter dtype"),
    "data_types.buffer_dtype": _schema_refuses("a separate buffer dtype"),
    # ---- zero_optimization (zero/config.py)
    "zero_optimization.stage": _impl("what is partitioned over the data axis (jzero.sharding)"),
    "zero_optimization.reduce_scatter": _impl("ZeRO-2/3 reduce-scatter the gradients; false needs stage <= 1"),
    "zero_optimization.allgather_partitions": _schema_refuses("false = broadcast-based gathers"),
    "zero_optimization.reduce_bucket_size": Key(XLA, "--xla_gpu_all_reduce_combine_threshold_bytes and "
                                                "--xla_gpu_reduce_scatter_combine_threshold_bytes = elements x 4 "
                                                "(jzero.mesh.xla_flags_for); 0 = each gradient reduced on its own "
                                                "(DeepSpeed's one-gradient bucket), XLA's threshold 0: no combining",
                                                by_schema=True),
    "zero_optimization.allgather_bucket_size": Key(XLA, "--xla_gpu_all_gather_combine_threshold_bytes = elements "
                                                   "x 4 (jzero.mesh.xla_flags_for); 0 = no combining",
                                                   by_schema=True),
    "zero_optimization.overlap_comm": Key(XLA, "true: latency-hiding scheduler, collectives pipelined across the "
                                          "layer scan, collective matmul under tensor parallelism with "
                                          "`mesh.sequence_parallel` (XLA's windowed einsum; plain TP's matmul + "
                                          "all-reduce has nothing for it to rewrite); false: "
                                          "--xla_gpu_disable_async_collectives=ALLCOLLECTIVES; unset: XLA's "
                                          "defaults (jzero.overlap; GPU flags, XLA:CPU has no async "
                                          "collectives). XLA:GPU schedule for 8 GPUs: BENCHMARKS.md, session 7",
                                          by_schema=True),
    "zero_optimization.contiguous_gradients": _none(f"copies gradients into one PyTorch buffer; {_XLA_PLANS}"),
    "zero_optimization.use_multi_rank_bucket_allreduce": _none(_XLA_SCHEDULES),
    "zero_optimization.load_from_fp32_weights": _unimpl("restoring fp32 masters from the 16-bit weights",
                                                        default=True),
    "zero_optimization.elastic_checkpoint": _none("jzero checkpoints restore onto any mesh and ZeRO stage"),
    "zero_optimization.offload_optimizer": _impl("ZeRO-Offload to pinned host memory, device cpu (jzero.offload); "
                                                 "device nvme is refused"),
    "zero_optimization.offload_optimizer.device": _impl("none or cpu; nvme (ZeRO-Infinity) is refused"),
    "zero_optimization.offload_optimizer.pin_memory": _impl("true (false is refused: host arrays are pinned)"),
    "zero_optimization.offload_optimizer.ratio": _impl("fraction of the parameters offloaded (ZeRO-Offload++)"),
    "zero_optimization.offload_optimizer.nvme_path": _schema_refuses("NVMe offload (ZeRO-Infinity)"),
    "zero_optimization.offload_optimizer.buffer_count": _schema_refuses("NVMe offload buffers (4 accepted)"),
    "zero_optimization.offload_optimizer.pipeline_read": _schema_refuses("NVMe offload pipelining"),
    "zero_optimization.offload_optimizer.pipeline_write": _schema_refuses("NVMe offload pipelining"),
    "zero_optimization.offload_optimizer.fast_init": _schema_refuses("NVMe offload fast init"),
    "zero_optimization.offload_param": _schema_refuses("parameter offload (device cpu or nvme)"),
    "zero_optimization.offload_param.device": _schema_refuses("parameter offload (only none is run)"),
    "zero_optimization.offload_param.pin_memory": _impl("true"),
    "zero_optimization.offload_param.nvme_path": _schema_refuses("NVMe offload (ZeRO-Infinity)"),
    "zero_optimization.offload_param.buffer_count": _schema_refuses("NVMe offload buffers (4 accepted)"),
    "zero_optimization.offload_param.buffer_size": _schema_refuses("NVMe offload buffers"),
    "zero_optimization.offload_param.max_in_cpu": _schema_refuses("NVMe offload host cache"),
    "zero_optimization.cpu_offload": Key(ALIAS, "deprecated: offload_optimizer.device=cpu when true",
                                         to="zero_optimization.offload_optimizer", convert=_cpu),
    "zero_optimization.cpu_offload_param": Key(ALIAS, "deprecated: offload_param.device=cpu when true",
                                               to="zero_optimization.offload_param", convert=_cpu),
    "zero_optimization.cpu_offload_params": Key(ALIAS, "DeepSpeed 0.3's spelling of cpu_offload_param",
                                                to="zero_optimization.offload_param", convert=_cpu),
    "zero_optimization.cpu_offload_use_pin_memory": _none("deprecated; DeepSpeed no longer reads it (offload_*."
                                                          "pin_memory replaced it)"),
    "zero_optimization.sub_group_size": _none(f"tiles DeepSpeed's optimizer step to bound PyTorch memory; "
                                              f"{_XLA_PLANS}"),
    "zero_optimization.stage3_param_persistence_threshold": _impl("leaves with fewer elements stay replicated"),
    "zero_optimization.param_persistence_threshold": Key(
        ALIAS, "DeepSpeed's field name of stage3_param_persistence_threshold",
        to="zero_optimization.stage3_param_persistence_threshold", convert=lambda v: v),
    "zero_optimization.stage3_prefetch_bucket_size": _none(_STAGE3_FETCH),
    "zero_optimization.prefetch_bucket_size": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_max_live_parameters": _none(_STAGE3_FETCH),
    "zero_optimization.max_live_parameters": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_max_reuse_distance": _none(_STAGE3_FETCH),
    "zero_optimization.max_reuse_distance": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_model_persistence_threshold": _none("caps the total of unpartitioned small "
                                                                  "parameters; jzero's threshold applies per leaf "
                                                                  "and the small leaves are biases and norms"),
    "zero_optimization.model_persistence_threshold": _none("see stage3_model_persistence_threshold"),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _none(
        "for save_16bit_model(); jzero's python -m train.export always writes consolidated weights"),
    "zero_optimization.gather_16bit_weights_on_model_save": _none("see stage3_gather_16bit_weights_on_model_save"),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _none(
        "see stage3_gather_16bit_weights_on_model_save"),
    "zero_optimization.stage3_module_granularity_threshold": _none(_STAGE3_FETCH),
    "zero_optimization.module_granularity_threshold": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": _none(_STAGE3_FETCH),
    "zero_optimization.use_all_reduce_for_fetch_params": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_allgather_sequential": _none(_STAGE3_FETCH),
    "zero_optimization.allgather_sequential": _none(_STAGE3_FETCH),
    "zero_optimization.stage3_partition_stream_chunk_size": _none(f"bounds zero.Init's partitioning memory; "
                                                                  f"jzero initialises directly into shards"),
    "zero_optimization.partition_stream_chunk_size": _none("see stage3_partition_stream_chunk_size"),
    "zero_optimization.ignore_unused_parameters": _none("JAX gives unused parameters zero gradients"),
    "zero_optimization.legacy_stage1": _none("DeepSpeed's old stage-1 implementation"),
    "zero_optimization.round_robin_gradients": _none("parallelises PyTorch gradient copies to the host"),
    "zero_optimization.memory_efficient_linear": _none(f"a PyTorch autograd memory detail; {_XLA_PLANS}"),
    "zero_optimization.pipeline_loading_checkpoint": _none("a PyTorch pipeline-module loading detail"),
    "zero_optimization.override_module_apply": _none("patches torch.nn.Module.apply for zero.Init"),
    "zero_optimization.log_trace_cache_warnings": _none("DeepSpeed's parameter-fetch trace cache"),
    "zero_optimization.enable_sanity_checks": _none("DeepSpeed's internal debugging checks"),
    "zero_optimization.save_muon_momentum_buffer_in_memory": _none("Muon with NVMe offload only"),
    "zero_optimization.leaf_module": _none("marks PyTorch leaf modules for ZeRO-3 hooks; jzero has no hooks"),
    "zero_optimization.zero_hpz_partition_size": _impl("ZeRO++ hpZ (stage 3): ranks per node; the data axis splits "
                                                       "into node x data, ZeRO-3 shards within the node "
                                                       "(jzero.topology); 0 or 1 = off, as DeepSpeed"),
    "zero_optimization.zero_quantized_weights": _impl("ZeRO++ qwZ (stage 3): weight gathers move int8 blocks + "
                                                      "fp32 scales (jzero.quantized_gather)"),
    "zero_optimization.zero_quantized_nontrainable_weights": _unimpl("ZeRO++ quantized frozen weights",
                                                                     default=False),
    "zero_optimization.zero_quantized_gradients": _impl("ZeRO++ qgZ (stage 3): the gradient reduce-scatter is an "
                                                        "all-to-all of int8 blocks + fp32 scales "
                                                        "(jzero.quantized_reduce)"),
    "zero_optimization.zeropp_loco_param": _unimpl("LoCo-ZeRO++", default=None),
    "zero_optimization.mics_shard_size": _unimpl("MiCS sharding groups", default=-1),
    "zero_optimization.mics_hierarchical_params_gather": _unimpl("MiCS hierarchical gathers", default=False),
    "zero_optimization.zenflow": _unimpl("ZenFlow", default=None),
    # ---- activation_checkpointing (activation_checkpointing/config.py)
    "activation_checkpointing.policy": _impl("jzero's key: none / full / save_dots / save_dots_no_batch / save_named "
                                             "/ offload_named (jzero.remat)"),
    "activation_checkpointing.save_names": _impl("jzero's key: the checkpoint_name tags save_named / offload_named "
                                                 "keep"),
    "activation_checkpointing.cpu_checkpointing": _impl("saved activations to pinned host memory (policy "
                                                        "offload_named; with no save_names, every tagged one)"),
    "activation_checkpointing.partition_activations": _none("splits saved activations over model-parallel ranks "
                                                            "in PyTorch; in jzero they keep the shardings the "
                                                            "logical axis rules give them (split over 'tensor')"),
    "activation_checkpointing.contiguous_memory_optimization": _none(f"copies checkpoints into one PyTorch "
                                                                     f"buffer; {_XLA_PLANS}"),
    "activation_checkpointing.number_checkpoints": _none(f"sizes that buffer; {_XLA_PLANS}"),
    "activation_checkpointing.synchronize_checkpoint_boundary": _none("a CUDA synchronize for timing; use "
                                                                      "jax.profiler traces"),
    "activation_checkpointing.profile": _none("times DeepSpeed's checkpoint calls; use jax.profiler traces"),
    # ---- monitors (monitor/config.py)
    "tensorboard": _impl("enabled, output_path, job_name (jzero.monitor)"),
    "csv_monitor": _impl("enabled, output_path, job_name (jzero.monitor)"),
    "wandb": _schema_refuses("Weights & Biases (enabled: false accepted)"),
    "comet": _schema_refuses("Comet (enabled: false accepted)"),
    "trackio": _schema_refuses("Trackio (enabled: false accepted)"),
    # ---- DeepSpeed's pipeline section (jzero's pipeline section shares the name)
    "pipeline.stages": _unimpl("pipeline.stages as a number (set mesh.pipeline)", default="auto"),
    "pipeline.partition": _impl("'uniform' (DeepSpeed's 'parameters' / 'type:' partitioners are refused)"),
    "pipeline.seed_layers": _none("seeds each PyTorch layer's init separately; jzero initialises from one key"),
    "pipeline.activation_checkpoint_interval": _unimpl("pipeline-stage activation checkpointing (use "
                                                       "activation_checkpointing.policy)", default=0),
    "pipeline.pipe_partitioned": _none("activations between stages keep their tensor-parallel shardings"),
    "pipeline.grad_partitioned": _none("gradients between stages keep their tensor-parallel shardings"),
    "pipeline.use_reentrant": _none("a torch.utils.checkpoint detail"),
    # ---- DeepSpeed's checkpoint section (jzero's checkpoint section shares the name)
    "checkpoint.tag_validation": _none("checks that every rank saves the same tag; jzero's orbax checkpoints are "
                                       "written by one coordinated save"),
    "checkpoint.load_universal": _none("jzero checkpoints restore onto any mesh and ZeRO stage already"),
    "checkpoint.use_node_local_storage": _unimpl("node-local checkpoint storage", default=False),
    "checkpoint.parallel_write": _none("pipeline-stage parallel writes; orbax writes shards in parallel"),
    "checkpoint.writer": _none("DeepSpeed's checkpoint writer engine; orbax writes jzero's"),
}

_JZERO_SECTIONS = ("mesh", "model", "data", "train", "finetune")
_OPTIMIZER_ALIASES = {"deepspeed_adam": "Adam"}


# --------------------------------------------------------------------------- applying the table


def _get(data: dict, path: str):
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def _pop(data: dict, path: str) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    # an emptied DeepSpeed section (e.g. "pipeline": {} after its DeepSpeed-only keys) goes too
    if parents and not node:
        _pop(data, ".".join(parents))


def _set(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _feature_on(value, default) -> bool:
    if default is OFF:
        return isinstance(value, dict) and bool(value.get("enabled", False)) or (
            not isinstance(value, dict) and bool(value))
    if default is ABSENT:
        return True
    return value != default or isinstance(value, bool) != isinstance(default, bool)


def normalize(data: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Apply :data:`KEYS` to a raw config dict: rewrite aliases, drop no-effect keys, refuse unimplemented
    features. Returns the dict for the pydantic schema and ``[(key, why)]`` of the no-effect keys found."""
    data = copy.deepcopy(data)
    notes: list[tuple[str, str]] = []
    if isinstance(data.get("zero_optimization"), bool):   # DeepSpeed's deprecated "zero_optimization": true
        data["zero_optimization"] = {"stage": 1 if data["zero_optimization"] else 0}
    opt = data.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("type"), str) and opt["type"].lower() in _OPTIMIZER_ALIASES:
        opt["type"] = _OPTIMIZER_ALIASES[opt["type"].lower()]
    if isinstance(opt, dict) and isinstance(opt.get("type"), str) and isinstance(opt.get("params"), dict):
        from jzero.optim.onebit import NO_EFFECT_KEYS, is_onebit

        if is_onebit(opt["type"]):
            notes += [(f"optimizer.params.{k}", why) for k, why in NO_EFFECT_KEYS.items() if k in opt["params"]]
    for path, key in KEYS.items():
        if key.by_schema or key.fate == IMPLEMENTED:
            continue
        value = _get(data, path)
        if value is ABSENT:
            continue
        if key.fate == ALIAS:
            _pop(data, path)
            new = key.convert(value) if key.convert else None
            if new is None:
                continue
            current = _get(data, key.to)
            if isinstance(new, dict) and isinstance(current, dict):
                clash = {k: v for k, v in new.items() if k in current and current[k] != v}
                if clash:
                    k = next(iter(clash))
                    raise ConfigError(f"{path}={value!r} means {key.to}.{k}={new[k]!r}, but {key.to}.{k} is "
                                      f"{current[k]!r}; remove {path}")
                _set(data, key.to, {**new, **current})
            elif current is not ABSENT and current != new:
                raise ConfigError(f"{path} is DeepSpeed's other name of {key.to}, which is also set (to "
                                  f"{current!r}, not {new!r}); remove one of them")
            else:
                _set(data, key.to, new)
        elif key.fate == NO_EFFECT:
            _pop(data, path)
            notes.append((path, key.why))
        elif key.fate == UNIMPLEMENTED:
            if _feature_on(value, key.default):
                raise ConfigError(f"{path}={_short(value)}: {key.why} is not implemented in jzero; "
                                  f"{_how_off(key.default)}")
            _pop(data, path)
    return data, notes


def drop_no_effect(data: dict) -> dict:
    """``data`` without the no-effect keys (what ``config.json`` leaves out: they are not part of the run)."""
    data = copy.deepcopy(data)
    for path, key in KEYS.items():
        if key.fate == NO_EFFECT and _get(data, path) is not ABSENT:
            _pop(data, path)
    return data


def _how_off(default) -> str:
    if default is OFF:
        return "remove the section or set enabled: false"
    if default is ABSENT:
        return "remove the section"
    return f"remove it or set DeepSpeed's default {default!r}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def no_effect_line(notes: list[tuple[str, str]]) -> str | None:
    """The one line a run prints at start naming the config's no-effect keys and why (None when there are none)."""
    if not notes:
        return None
    return "ds_config keys with no effect under XLA: " + "; ".join(f"{k} ({why})" for k, why in notes)


# --------------------------------------------------------------------------- closest-key suggestions


def _schema_paths(model_cls, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out = set()
    for name, field in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        ann = field.annotation
        for cls in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                out |= _schema_paths(cls, path + ".")
    return out


def _words(name: str) -> tuple[str, ...]:
    return tuple(sorted(w for w in name.lower().split("_") if w))


def _reordered(name: str, names) -> str | None:
    """The one of ``names`` made of the same underscore-separated words as ``name`` in another order
    (``comm_overlap`` -> ``overlap_comm``), else None."""
    words = _words(name)
    if len(words) < 2:
        return None
    return next((n for n in sorted(names) if n != name and _words(n) == words), None)


def closest_key(key: str, keys: set[str]) -> str | None:
    """The key of ``keys`` (every valid dotted key: :func:`jzero.config.valid_keys`) closest to an unknown dotted
    ``key``: the same words reordered or a near spelling under the same parent, else a key of the same (or nearly
    the same, or reordered) name elsewhere (``stage`` -> ``zero_optimization.stage``)."""
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    match = _reordered(name, siblings) or next(iter(difflib.get_close_matches(name, list(siblings), n=1,
                                                                              cutoff=0.75)), None)
    if match:
        return siblings[match]
    by_name: dict[str, list[str]] = {}
    for k in sorted(keys, key=lambda k: (k.count("."), k)):
        by_name.setdefault(k.rpartition(".")[2], []).append(k)
    match = next(iter(difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.8)), None) or \
        _reordered(name, by_name)
    return by_name[match][0] if match else None


# --------------------------------------------------------------------------- the docs table


_FATE_TEXT = {IMPLEMENTED: "implemented", XLA: "mapped to XLA", NO_EFFECT: "no effect under XLA (accepted, "
              "printed at start)", ALIAS: "alias", UNIMPLEMENTED: "not implemented (error unless off)"}


def markdown_table() -> str:
    """The table of docs/deepspeed_keys.md: every key, its fate, and what jzero does or why."""
    rows = ["| DeepSpeed key | fate | what jzero does / why |", "|---|---|---|"]
    for path, key in KEYS.items():
        note = key.why
        if key.fate == ALIAS:
            note = f"{note}; becomes `{key.to}`"
        elif key.fate == UNIMPLEMENTED and not key.by_schema:
            off = ("absent or enabled: false" if key.default is OFF else "absent" if key.default is ABSENT
                   else f"{key.default!r}")
            note = f"{note}; accepted: {off}"
        rows.append(f"| `{path}` | {_FATE_TEXT[key.fate]} | {note.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def regenerate_docs(path: str = "docs/deepspeed_keys.md") -> None:
    """Rewrite the generated part of ``path`` (the "auto" table and every key) from :data:`KEYS` and
    :data:`jzero.ds_auto.RULES`; the prose above the "auto" table is kept.
    ``python -c "from jzero.ds_keys import regenerate_docs; regenerate_docs()"`` after editing the table."""
    from pathlib import Path

    from jzero.ds_auto import RULES

    marker = '| key | `"auto"` becomes |'
    head = Path(path).read_text().split(marker)[0]
    auto = f"{marker}\n|---|---|\n" + "".join(f"| `{k}` | {v} |\n" for k, v in RULES.items())
    Path(path).write_text(head + auto + "\n## Every key\n\n<!-- generated by jzero.ds_keys.markdown_table() -->\n"
                          + markdown_table())
