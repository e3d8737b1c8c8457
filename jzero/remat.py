"""Activation checkpointing: DeepSpeed's ``activation_checkpointing`` section mapped onto ``jax.checkpoint``.

DeepSpeed checkpoints whole layers (the model calls ``deepspeed.checkpointing.checkpoint``) and tunes how the
saved layer inputs are stored. In JAX the choice is a *policy* deciding which intermediates of a rematerialized
block are kept for the backward pass; everything else is recomputed. jzero's ``policy`` key picks one:

=====================  =========================================================================================
``none``               no rematerialization: every intermediate is kept (fastest, most memory)
``full``               keep nothing inside the block, recompute it all (DeepSpeed's layer checkpointing)
``save_dots``          keep matmul outputs (``dots_saveable``), recompute the cheap elementwise ops
``save_dots_no_batch`` keep only matmuls without batch dimensions (weights x activations, not attention scores)
``save_named``         keep only the intermediates tagged ``checkpoint_name(x, name)`` with a name in
                       ``save_names``
``offload_named``      the ``save_names`` intermediates go to pinned host memory and come back for the backward
                       pass; nothing else is kept (DeepSpeed's ``cpu_checkpointing: true`` selects this)
=====================  =========================================================================================

DeepSpeed's other keys describe its PyTorch buffers and have no JAX meaning; set to anything but their default
they are errors that say what to use instead (never silently ignored).
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jzero.errors import ConfigError

Policy = Literal["none", "full", "save_dots", "save_dots_no_batch", "save_named", "offload_named"]
POLICIES: tuple[str, ...] = Policy.__args__

#: the activations models/layers.py names with ``checkpoint_name`` (attention q/k/v and output, MLP hidden)
MODEL_ACTIVATION_NAMES = ("qkv", "attn_out", "mlp_hidden")

_NO_JAX_MEANING = {
    "partition_activations": "splits saved activations across model-parallel ranks in PyTorch; in jzero saved "
                             "activations keep the shardings the model's logical axis rules give them (shard over "
                             "'tensor' there)",
    "contiguous_memory_optimization": "is a PyTorch memory-allocator detail (copy checkpoints into one buffer); XLA "
                                      "plans all buffers of the compiled step itself",
    "number_checkpoints": "sizes DeepSpeed's contiguous checkpoint buffer; XLA plans buffers itself",
    "synchronize_checkpoint_boundary": "is a CUDA synchronize for timing; use jax.profiler traces instead",
    "profile": "times DeepSpeed's checkpoint calls; use jax.profiler traces instead",
}


class ActivationCheckpointingConfig(BaseModel):
    """DeepSpeed's ``activation_checkpointing`` keys plus jzero's ``policy`` and ``save_names``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: Policy = "none"
    save_names: list[str] = Field(default_factory=list)
    cpu_checkpointing: bool = False
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False

    @field_validator(*_NO_JAX_MEANING)
    @classmethod
    def _no_jax_meaning(cls, v, info):
        if v is not None and v is not False:
            raise ValueError(f"activation_checkpointing.{info.field_name}={v!r}: {_NO_JAX_MEANING[info.field_name]}; "
                             "jzero does not implement it: remove it and choose activation_checkpointing.policy")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.cpu_checkpointing and "policy" in self.model_fields_set and self.policy != "offload_named":
            raise ValueError(f"activation_checkpointing.cpu_checkpointing=true means policy 'offload_named', but "
                             f"policy is {self.policy!r}; drop one of them")
        policy = self.effective_policy
        if policy in ("save_named", "offload_named") and not self.effective_save_names:
            raise ValueError(f"activation_checkpointing.save_names: policy {policy!r} needs the names (given to "
                             "jax.ad_checkpoint.checkpoint_name in the model) of the activations to keep; jzero's "
                             f"models name {', '.join(MODEL_ACTIVATION_NAMES)}")
        if self.save_names and policy not in ("save_named", "offload_named"):
            raise ValueError(f"activation_checkpointing.save_names is only read by policies 'save_named' and "
                             f"'offload_named', not {policy!r}; remove it or change the policy")
        return self

    @property
    def effective_save_names(self) -> list[str]:
        """``save_names``; under DeepSpeed's ``cpu_checkpointing`` with none given, every activation jzero's models
        name (:data:`MODEL_ACTIVATION_NAMES`: DeepSpeed moves all the activations it checkpoints to the CPU)."""
        if not self.save_names and self.cpu_checkpointing:
            return list(MODEL_ACTIVATION_NAMES)
        return list(self.save_names)

    @property
    def effective_policy(self) -> str:
        """``policy``, or 'offload_named' when DeepSpeed's ``cpu_checkpointing`` is true."""
        return "offload_named" if self.cpu_checkpointing else self.policy


def as_config(cfg) -> ActivationCheckpointingConfig:
    """``cfg`` as this module's validated model: accepts the model itself, a dict of the section, or another
    pydantic model with the same keys (only the keys the user set are carried over, so ``cpu_checkpointing``
    still selects the policy when ``policy`` was left at its default)."""
    if isinstance(cfg, ActivationCheckpointingConfig):
        return cfg
    if isinstance(cfg, BaseModel):
        cfg = cfg.model_dump(exclude_unset=True)
    try:
        return ActivationCheckpointingConfig.model_validate(cfg or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        where = f"activation_checkpointing.{key}: " if key else ""
        raise ConfigError(f"{where}{err['msg'].removeprefix('Value error, ')}") from None


def remat_policy(cfg: ActivationCheckpointingConfig | dict, *, in_scan: bool = True) -> tuple[bool, Callable | None]:
    """``(prevent_cse, policy)`` for ``jax.checkpoint``/``nn.remat``; policy None means do not rematerialize.

    ``prevent_cse`` is False inside ``scan`` (the loop already stops XLA from merging the recomputation into the
    forward pass, and the guard would cost performance) and True for a block called outside a loop.
    """
    cfg = as_config(cfg)
    cp = jax.checkpoint_policies
    policy = cfg.effective_policy
    names = cfg.effective_save_names
    chosen = {
        "none": None,
        "full": cp.nothing_saveable,
        "save_dots": cp.dots_saveable,
        "save_dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "save_named": cp.save_only_these_names(*names) if policy == "save_named" else None,
        "offload_named": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=names,
            offload_src="device", offload_dst="pinned_host") if policy == "offload_named" else None,
    }[policy]
    return (not in_scan), chosen
