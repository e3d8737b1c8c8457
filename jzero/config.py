"""The run configuration: a DeepSpeed ``ds_config.json`` accepted as is, plus jzero's own sections.

DeepSpeed keys keep DeepSpeed's names and meanings (``train_batch_size``, ``zero_optimization.stage``,
``fp16.*``, ``optimizer.{type,params}`` ...). jzero adds ``mesh``, ``model``, ``data``, ``train``.

Everything is validated before anything compiles: unknown keys, wrong types, impossible batch triples and
mesh sizes that do not fit the devices raise :class:`ConfigError` with a one-line message naming the key and
the fix. A key that jzero knows but does not implement is an error too, never silently ignored.

    cfg = load_config("ds_config.json", overrides=["zero_optimization.stage=3", "mesh.data=4"])
    cfg = resolve(cfg, n_devices=jax.device_count())     # fills mesh -1 and the batch triple
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from jzero.config_files import YamlLoader, apply_overrides, load_yaml, read_config_file  # noqa: F401 (re-exported)
from jzero.errors import ConfigError
from jzero.monitor import CometConfig, CSVMonitorConfig, TensorboardConfig, TrackioConfig, WandbConfig
from jzero.precision import BF16Config, DataTypesConfig, FP16Config
from jzero.remat import ActivationCheckpointingConfig
from jzero.resolve import check_hpz, resolve, resolve_batch, resolve_mesh_shape  # noqa: F401 (re-exported)
from jzero.section import Section


# --------------------------------------------------------------------------- DeepSpeed sections


class OffloadConfig(Section):
    """``zero_optimization.offload_optimizer`` / ``offload_param``: ``device`` is "none" or "cpu".

    ``ratio`` (DeepSpeed's partial offload, ZeRO-Offload++): the fraction of the parameters whose master weights
    and optimizer state go to host memory; the rest stay on the device. ``pin_memory=false`` is refused: jzero's
    host arrays are always pinned (the only host memory a GPU program can DMA to directly).
    """

    device: Literal["none", "cpu", "nvme"] = "none"
    pin_memory: bool = True
    ratio: float = Field(1.0, gt=0.0, le=1.0)
    # DeepSpeed's NVMe (ZeRO-Infinity) knobs: accepted at DeepSpeed's defaults, which do nothing without NVMe
    nvme_path: str | None = None
    buffer_count: int = 4
    buffer_size: int | None = None
    max_in_cpu: int | None = None
    fast_init: bool = False
    pipeline_read: bool = False
    pipeline_write: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.device == "nvme":
            raise ValueError("device='nvme': NVMe offload (ZeRO-Infinity) is not implemented; use device 'cpu' "
                             "(pinned host memory)")
        if self.device == "none" and self.ratio != 1.0:
            raise ValueError(f"ratio={self.ratio} without device 'cpu' would offload nothing; set device: cpu or "
                             "remove ratio")
        if not self.pin_memory:
            raise ValueError("pin_memory=false: jzero offloads only to pinned host memory (JAX's 'pinned_host' "
                             "memory kind); remove pin_memory or set it to true")
        nvme_only = {"nvme_path": None, "buffer_count": 4, "buffer_size": None, "max_in_cpu": None,
                     "fast_init": False, "pipeline_read": False, "pipeline_write": False}
        for key, default in nvme_only.items():
            if getattr(self, key) != default:
                raise ValueError(f"{key}={getattr(self, key)!r} configures DeepSpeed's NVMe offload, which jzero "
                                 f"does not implement; remove it (or set it to DeepSpeed's default {default!r})")
        return self


class ZeroConfig(Section):
    """``zero_optimization``: which trees are partitioned over the ``data`` axis.

    stage 0: nothing; 1: optimizer state; 2: + gradients (and the accumulation buffer); 3: + parameters.
    ``stage3_param_persistence_threshold``: leaves with fewer elements stay replicated (DeepSpeed's default 1e5);
    jzero applies it to every partitioned tree, so small biases and norms are never split.
    The bucket keys have no PyTorch buckets to size under XLA; they set XLA's collective-combining thresholds
    on GPU (elements x 4 bytes), see :func:`jzero.mesh.xla_flags_for`. 0 is DeepSpeed's too (``ge=0``): its
    bucket then holds one gradient, each reduced on its own, which is XLA's threshold 0 (its combiners skip the
    module: every collective by itself); ``overlap_comm`` sets XLA's scheduler
    flags (:mod:`jzero.overlap`). DeepSpeed's other ZeRO keys (``contiguous_gradients``, the stage-3 prefetch knobs, ...) are handled by
    :mod:`jzero.ds_keys` before this schema sees the section.
    """

    stage: Literal[0, 1, 2, 3] = 0
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    reduce_bucket_size: int | None = Field(None, ge=0)
    allgather_bucket_size: int | None = Field(None, ge=0)
    reduce_scatter: bool = True
    allgather_partitions: bool = True
    #: true/false: XLA's async collectives + latency-hiding scheduler on / off (jzero.overlap); None: XLA's defaults
    overlap_comm: bool | None = None
    offload_optimizer: OffloadConfig = OffloadConfig()
    offload_param: OffloadConfig = OffloadConfig()

    @field_validator("offload_optimizer", "offload_param", mode="before")
    @classmethod
    def _null_is_off(cls, v):   # DeepSpeed's schema: Optional, null = no offload
        return {} if v is None else v
    #: ZeRO++ hpZ: data-parallel ranks per "node" (DeepSpeed's secondary partition group). > 1 splits the data
    #: axis into ``node`` (inter-node) x ``data`` (intra-node); ZeRO-3 shards within the node, replicates across.
    #: 0 or 1 = off (DeepSpeed's ``ge=0``; it turns hpZ on only above 1, and so does every jzero consumer).
    zero_hpz_partition_size: int = Field(1, ge=0)
    #: ZeRO++ qwZ: ZeRO-3's weight gathers move int8 blocks + one scale per block (jzero.quantized_gather).
    zero_quantized_weights: bool = False
    #: ZeRO++ qgZ: ZeRO-3's gradient reduce-scatter moves int8 blocks + fp32 scales (jzero.quantized_reduce).
    zero_quantized_gradients: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.zero_hpz_partition_size > 1 and self.stage != 3:
            raise ValueError(f"zero_hpz_partition_size={self.zero_hpz_partition_size} needs stage 3 (hpZ partitions "
                             "ZeRO-3's parameters within a node, as DeepSpeed); set stage=3 or remove it")
        if self.zero_quantized_weights and self.stage != 3:
            raise ValueError("zero_quantized_weights=true needs stage 3 (qwZ quantizes ZeRO-3's weight gathers); "
                             "set stage=3 or remove it")
        if self.zero_quantized_gradients and self.stage != 3:
            raise ValueError("zero_quantized_gradients=true needs stage 3 (qgZ quantizes the reduce-scatter of the "
                             "gradient of ZeRO-3's gathered weights); set stage=3 or remove it")
        if not self.reduce_scatter and self.stage >= 2:
            raise ValueError("reduce_scatter=false with stage>=2: ZeRO-2/3 partitions gradients by a reduce-scatter; "
                             "use stage 1 for all-reduced gradients")
        if not self.allgather_partitions:
            raise ValueError("allgather_partitions=false (broadcast-based gather) is not implemented; remove it")
        return self


class OptimizerConfig(Section):
    """``optimizer``: DeepSpeed's ``{type, params}``. A key missing from ``params`` takes the default of DeepSpeed's
    own optimizer of that type (FusedAdam / FusedLamb: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0;
    :mod:`jzero.optim`), so a ``ds_config.json`` trains with the hyperparameters DeepSpeed would use; with no
    ``optimizer.type`` at all (DeepSpeed would train the client's optimizer; jzero's mains have none), AdamW at
    those defaults (:attr:`JzeroConfig.optimizer_defaulted`, named at start). :func:`resolve` writes every
    parameter the optimizer trains with into ``params`` (what ``config.json`` records)."""

    type: str = "AdamW"
    params: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(Section):
    type: str
    params: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- jzero sections


class MeshConfig(Section):
    """Mesh axis sizes; one may be -1 = all remaining devices. Their product must equal the device count."""

    data: int = -1
    tensor: int = 1
    pipeline: int = 1
    #: Megatron sequence parallelism over ``tensor``: the residual stream between blocks is split along the
    #: sequence (jzero.sharding.SEQUENCE_PARALLEL_RULES); all-reduces become reduce-scatter + all-gather pairs.
    sequence_parallel: bool = False

    @model_validator(mode="after")
    def _check(self):
        sizes = {"data": self.data, "tensor": self.tensor, "pipeline": self.pipeline}
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"mesh.{bad[0]}={sizes[bad[0]]}: axis sizes are positive, or -1 for 'the rest of the devices'")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError("more than one mesh axis is -1; give explicit sizes to all but one")
        return self


class PipelineConfig(Section):
    """Pipeline parallelism over the ``pipeline`` mesh axis (stages = ``mesh.pipeline``).

    Micro-batches are ``gradient_accumulation_steps`` (DeepSpeed's meaning). ``circular`` with ``repeats`` R
    gives each stage R non-adjacent layer chunks, cutting the bubble from (S-1)/(M+S-1) to (S-1)/(R*M+S-1).
    """

    schedule: Literal["gpipe", "circular"] = "gpipe"
    repeats: int = Field(1, ge=1)
    partition: Literal["uniform"] = "uniform"


class ModelConfig(Section):
    """A model family plus sizes, or a named preset (see ``models.PRESETS``); explicit sizes override the preset.

    Family-specific keys (an error when set for a family that has no such thing): ``n_kv_head``, ``rope_theta``,
    ``tie_embeddings`` (llama); ``head`` = mlm | classification | token_classification and ``num_labels`` (bert);
    ``norm_eps`` (llama, bert).
    """

    family: Literal["gpt2", "llama", "bert"] = "gpt2"
    preset: str | None = None
    n_layer: int | None = Field(None, gt=0)
    n_head: int | None = Field(None, gt=0)
    d_model: int | None = Field(None, gt=0)
    d_ff: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(None, gt=0)
    max_len: int | None = Field(None, gt=0)
    n_kv_head: int | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    norm_eps: float | None = Field(None, gt=0)
    tie_embeddings: bool | None = None
    head: Literal["mlm", "classification", "token_classification"] | None = None
    num_labels: int | None = Field(None, gt=1)
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    scan_layers: bool = True
    dropout: float = Field(0.0, ge=0.0, le=0.0, description="dropout is not implemented; must be 0")


class DataConfig(Section):
    """``path``: a directory from ``python -m train.prepare_data`` (train.bin, val.bin, meta.json);
    null = the embedded default corpus (the Python standard library's own sources, byte-level)."""

    path: str | None = None
    seq_len: int = Field(128, gt=0)
    shuffle: bool = True
    default_corpus_bytes: int = Field(8_000_000, gt=0)


class TrainConfig(Section):
    steps: int = Field(300, gt=0)
    seed: int = 0
    output_dir: str = "runs/default"
    log_interval: int = Field(1, gt=0)
    eval_interval: int = Field(0, ge=0)
    eval_batches: int = Field(4, gt=0)
    checkpoint_interval: int = Field(0, ge=0)   # save every N steps and at the last step (0 = never)
    #: stop (one line naming the last good checkpoint) after this many consecutive steps with a non-finite loss
    #: or gradient norm (jzero.guard); dynamic fp16 scaling stops instead when its scale is stuck at the minimum
    max_nonfinite_steps: int = Field(10, gt=0)
    #: JAX's persistent compilation cache (jzero.compile_cache): a restart loads the compiled step (same kernels,
    #: same speed, no compile) instead of compiling and autotuning again; null = no cache
    compile_cache_dir: str | None = None
    #: trace this many steps of the loop with jax.profiler into ``<output_dir>/profile`` and report how busy the
    #: device was (jzero.profiler; MaxText's profiler_steps); 0 = no trace
    profile_steps: int = Field(0, ge=0)
    #: the first traced step; 0 = the first steady step (after the warm-up and the timing probes)
    profile_start: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_profile(self):
        from jzero.profiler import overrun

        # (profile_start 0 = the first steady step, known only in the loop: jzero.profiler.LoopProfile checks it)
        message = self.profile_start and overrun(self.profile_start, self.profile_steps, self.steps)
        if message:
            raise ValueError(message)
        return self


class CheckpointConfig(Section):
    """Checkpoints (see :mod:`jzero.checkpoint`): ``dir`` defaults to ``<train.output_dir>/checkpoints``;
    ``max_to_keep`` newest steps are kept (null = all, as DeepSpeed; with rotation on, saving a step below the
    directory's highest is refused, since orbax rotates by write order); ``async_save`` writes in a background
    thread while training goes on (the main waits for it before exiting)."""

    dir: str | None = None
    max_to_keep: int | None = Field(3, gt=0)
    async_save: bool = True


class FinetuneConfig(Section):
    """``python -m train.finetune``: labelled data, tokenisation, epochs, and the weights to start from.

    ``train_file``/``val_file``: JSONL (see :mod:`jzero.finetune_data`); null ``train_file`` = the embedded
    synthetic set for ``task`` (``synthetic_train_examples`` / ``synthetic_val_examples`` examples); null
    ``val_file`` with a ``train_file`` holds out ``val_fraction`` of it. ``tokenizer``: ``words`` (default: a
    word vocabulary of the training set, or of the ``init_from`` run), ``bytes`` or the path of a tokenizer.json.
    ``init_from``: a jzero checkpoint directory or a safetensors file from ``python -m train.export``; params with
    the same path and shape are loaded, the task's head only when the checkpoint's labels are this run's, in the
    same order (else it starts fresh, and the run says so).
    """

    task: Literal["classification", "token_classification"] = "classification"
    train_file: str | None = None
    val_file: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    synthetic_train_examples: int = Field(2000, gt=0)
    synthetic_val_examples: int = Field(400, gt=0)
    tokenizer: str = "words"
    init_from: str | None = None
    epochs: int = Field(3, gt=0)

    @model_validator(mode="after")
    def _check(self):
        # keys set to their default change nothing, so they conflict with nothing: a run's own config.json
        # (every key written out) loads back with --config
        given = {k for k in self.model_fields_set if getattr(self, k) != type(self).model_fields[k].default}
        if self.train_file is not None and given & {"synthetic_train_examples", "synthetic_val_examples"}:
            raise ValueError("synthetic_*_examples size the embedded set, which train_file replaces; remove them")
        if self.val_file is not None and self.train_file is None:
            raise ValueError("val_file without train_file; give both, or neither for the embedded set")
        if self.val_file is not None and "val_fraction" in given:
            raise ValueError("val_fraction splits train_file when val_file is null; remove one of the two")
        if self.train_file is None and "val_fraction" in given:
            raise ValueError("val_fraction splits a train_file; the embedded set has its own validation split")
        return self


class JzeroConfig(Section):
    # DeepSpeed keys
    train_batch_size: int | None = Field(None, gt=0)
    train_micro_batch_size_per_gpu: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    steps_per_print: int = Field(10, gt=0)
    gradient_clipping: float = Field(0.0, ge=0.0)
    wall_clock_breakdown: bool = False
    zero_optimization: ZeroConfig = ZeroConfig()
    fp16: FP16Config = FP16Config()
    bf16: BF16Config = BF16Config()
    data_types: DataTypesConfig = DataTypesConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig | None = None
    activation_checkpointing: ActivationCheckpointingConfig = ActivationCheckpointingConfig()
    tensorboard: TensorboardConfig = TensorboardConfig()
    csv_monitor: CSVMonitorConfig = CSVMonitorConfig()
    wandb: WandbConfig = WandbConfig()
    comet: CometConfig = CometConfig()
    trackio: TrackioConfig = TrackioConfig()
    # jzero keys
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    #: [(key, why)] of the DeepSpeed keys given that have no effect under XLA (jzero.ds_keys), and
    #: [(key, value)] of the "auto" values resolved (jzero.ds_auto); printed by the mains at start
    _no_effect: list = PrivateAttr(default_factory=list)
    _auto_filled: list = PrivateAttr(default_factory=list)

    @property
    def optimizer_defaulted(self) -> bool:
        """True when the config names no ``optimizer.type`` (no ``optimizer`` section, or one without ``type``):
        DeepSpeed would train the client's optimizer; jzero trains its default, AdamW at DeepSpeed's FusedAdam
        defaults for every parameter not given (:meth:`optimizer_note`)."""
        return "type" not in self.optimizer.model_fields_set

    def optimizer_note(self) -> str | None:
        """One line naming the optimizer a config without ``optimizer.type`` trains, with its parameters (None when
        the config names its optimizer)."""
        if not self.optimizer_defaulted:
            return None
        from jzero.optim import resolved_params

        p = resolved_params(self.optimizer)
        given = set(self.optimizer.params)
        shown = ", ".join(f"{k}={p[k]!r}{' (given)' if k in given else ''}"
                          for k in ("lr", "betas", "eps", "weight_decay") if k in p)
        return (f"optimizer: no optimizer.type given (DeepSpeed would train the client's optimizer; jzero's mains have "
                f"none), so {self.optimizer.type} trains with {shown} (keys not given: DeepSpeed's FusedAdam "
                f"defaults); set optimizer.type and optimizer.params to choose")

    def bias_correction_note(self) -> str | None:
        """One line for a 1-bit optimizer (OneBitAdam, ZeroOneAdam, OneBitLamb) whose config leaves
        ``bias_correction`` out: jzero applies Adam's bias correction by default, which DeepSpeed's versions list
        but never apply, so the same config takes larger early steps in DeepSpeed (None otherwise)."""
        if self.optimizer.type not in ("OneBitAdam", "ZeroOneAdam", "OneBitLamb") or \
                "bias_correction" in self.optimizer.params:
            return None
        return (f"optimizer: {self.optimizer.type} applies Adam's bias correction (bias_correction=true by default; "
                f"DeepSpeed's {self.optimizer.type} accepts the key but never applies it); set "
                f"optimizer.params.bias_correction=false to train as DeepSpeed does")

    def start_notes(self, include_optimizer: bool = False) -> list[str]:
        """The lines a run prints at start: the no-effect DeepSpeed keys and the resolved "auto" values; with
        ``include_optimizer``, also :meth:`optimizer_note` (the default optimizer a config without one trains)."""
        from jzero.ds_auto import filled_line
        from jzero.ds_keys import no_effect_line

        lines = [no_effect_line(self._no_effect), filled_line(self._auto_filled)]
        if include_optimizer:
            lines += [self.optimizer_note(), self.bias_correction_note()]
        return [line for line in lines if line]

    @model_validator(mode="after")
    def _check(self):
        if self.fp16.enabled and self.bf16.enabled:
            raise ValueError("fp16.enabled and bf16.enabled are both true; pick one")
        return self


# --------------------------------------------------------------------------- loading


def _fmt_loc(loc) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def valid_keys() -> set[str]:
    """Every dotted key jzero accepts: the pydantic schema's fields plus the DeepSpeed key table's."""
    from jzero.ds_keys import KEYS, _schema_paths

    return _schema_paths(JzeroConfig) | set(KEYS)


def _raise_from_validation(err: ValidationError, source: str, overrides: list[str] = ()) -> None:
    e = err.errors()[0]
    key = _fmt_loc(e["loc"])
    kind = e["type"]
    source = _source_of(key, source, overrides)
    if kind == "extra_forbidden":
        from jzero.ds_keys import closest_key

        parent = key.rsplit(".", 1)[0] if "." in key else "top level"
        near = closest_key(key, valid_keys())
        fix = f"did you mean '{near}'?" if near else "remove or rename it"
        msg = f"unknown key '{key}' in {source}: not a DeepSpeed or jzero key under {parent}; {fix}"
    elif kind == "value_error":
        text = e["msg"].removeprefix("Value error, ")
        named = not key or text.startswith((key, key.rsplit(".", 1)[-1]))
        msg = f"{'' if named else key + ': '}{text} ({source})"
    elif kind == "string_type" and isinstance(e.get("input"), (int, float, bool)):
        msg = (f"key '{key}' in {source}: must be text, not the {type(e['input']).__name__} {e['input']!r}; quote "
               f"the value (on the command line: {key}='\"VALUE\"')")
    else:
        msg = f"key '{key}' in {source}: {e['msg']} (got {e.get('input')!r})"
    raise ConfigError(msg) from None


def validate_section(cls, data: dict, prefix: str):
    """One section built from a dict outside a whole config (``jzero.mesh.make_mesh({"data": 4})``), with the
    whole config's one-line errors, keys named ``prefix.key``."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        e["loc"] = (prefix, *e["loc"])
        _raise_from_validation(ValidationError.from_exception_data(err.title, [e]), f"{prefix} given in code")


def _source_of(key: str, source: str, overrides: list[str]) -> str:
    """Where the value at ``key`` came from: the last ``key=value`` override that set it (or a section above
    it), else ``source`` (the file)."""
    for item in reversed(overrides):
        k = item.split("=", 1)[0].strip()
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f"override '{item}'"
    return source


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> JzeroConfig:
    """Build a validated config from a file (or ``base`` dict, or the defaults) plus dotted overrides. A dict as
    ``path`` is taken as the config itself, as ``deepspeed.initialize(config=dict)`` takes one."""
    if isinstance(overrides, str):   # iterated, it would be one-character overrides ("override 'z' is not key=value")
        raise ConfigError(f"load_config: overrides={overrides!r} is one string; pass a list of key=value strings, "
                          f"e.g. [{overrides!r}]")
    if isinstance(path, dict):
        if base is not None:
            raise ConfigError("load_config: a dict config and base= both given; pass one of them")
        path, base = None, path
    data = read_config_file(path) if path is not None else copy.deepcopy(base or {})
    data = apply_overrides(data, overrides or [])
    return validate(data, source=str(path) if path else "config", overrides=overrides or [])


def validate(data: dict, source: str = "config", overrides: list[str] = ()) -> JzeroConfig:
    """The validated config of a raw dict: DeepSpeed's key table applied first (:func:`jzero.ds_keys.normalize`:
    aliases, no-effect keys, unimplemented features; only the ``"auto"`` of a switch it reads, Apex's ``amp.*``,
    is resolved before it), then ``"auto"`` values (:func:`jzero.ds_auto.resolve_auto`), then the schema."""
    from jzero.ds_auto import resolve_auto, resolve_auto_before_keys
    from jzero.ds_keys import normalize
    from jzero.optim import default_params

    try:
        # "auto" of a switch the key table reads (HF's amp.enabled: off) first, so the table sees the resolved value
        data, early = resolve_auto_before_keys(data)
        data, no_effect = normalize(data)
        data, filled = resolve_auto(data, default_lr=default_params(OptimizerConfig().type)["lr"],
                                    default_steps=TrainConfig().steps)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({source})") from None
    try:
        cfg = JzeroConfig.model_validate(data)
    except ValidationError as err:
        _raise_from_validation(err, source, list(overrides))
    cfg._no_effect, cfg._auto_filled = no_effect, early + filled
    return cfg


def checkpoint_dir(cfg: JzeroConfig) -> Path:
    """Where a run's checkpoints go: ``checkpoint.dir``, default ``<train.output_dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.output_dir) / "checkpoints"


def to_dict(cfg: JzeroConfig) -> dict:
    """The config as written to ``config.json``: every key, except the DeepSpeed keys that have no effect under
    XLA (:mod:`jzero.ds_keys`; the run named them at start), so the file loads back without them."""
    from jzero.ds_keys import drop_no_effect

    return drop_no_effect(cfg.model_dump(mode="json"))
