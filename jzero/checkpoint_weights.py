"""A checkpoint's weights alone, as host numpy: no mesh, no optimizer state (``train.export``, ``load_module_only``
under optimizer offload). An offloaded run's weights are its fp32 master chunks, re-stacked per leaf. The I/O and
the checksum check are :mod:`jzero.checkpoint_io`'s."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from jzero.checkpoint_io import UnreadableCheckpointError, _key, _verified, read_meta, restore_partial
from jzero.checkpoint_meta import unflatten
from jzero.errors import CheckpointError
from jzero.orbax_noise import first_line


def read_params(directory, step: int | None = None) -> tuple[int, dict, dict]:
    """``(step, params, meta)``: the checkpoint's fp32 weights as host numpy arrays (a nested dict), read alone:
    no mesh, no optimizer state (except an offloaded run's masters, which are its weights)."""
    step, meta = read_meta(directory, step)
    where = f"checkpoint {_key(directory)}/{step}"
    if meta.get("offload"):   # the fp32 masters are the host chunks in the optimizer state, not the device params
        return step, _read_offloaded_masters(directory, step, meta, where), meta
    shapes = {k.removeprefix("params."): v for k, v in meta["state"].items() if k.startswith("params.")}
    if not shapes:
        raise CheckpointError(f"{where} holds no params (state leaves: {list(meta['state'])[:3]}...)")
    item = {"params": unflatten({k: _struct(v) for k, v in shapes.items()})}
    return step, _verified(meta, _read_host(directory, step, item, where, "params"), where)["params"], meta


def _read_offloaded_masters(directory, step: int, meta: dict, where: str) -> dict:
    """Params of a run saved under ``offload_optimizer``: its fp32 master chunks, re-stacked per leaf."""
    from jzero.offload import restack_masters

    chunks = meta["offload"]["chunks"]
    keys = [f"opt_state.master.{i}" for i in range(len(chunks))]
    missing = [k for k in keys if k not in meta["state"]]
    if missing:
        raise CheckpointError(f"{where}: its meta lists {len(chunks)} offloaded master chunks but the state has no "
                              f"{missing[0]}; the checkpoint is inconsistent, export another step")
    item = {"opt_state": {"master": [_struct(meta["state"][k]) for k in keys]}}
    masters = _verified(meta, _read_host(directory, step, item, where, "master weights"), where)["opt_state"]["master"]
    return unflatten(restack_masters(chunks, masters))


def _read_host(directory, step: int, item, where: str, what: str):
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        return restore_partial(directory, step, item, restore_args)
    except Exception as exc:
        raise UnreadableCheckpointError(f"{where} is unreadable: its {what} failed to load ({type(exc).__name__}: "
                                        f"{first_line(exc)}); export an earlier --step") from None


def _struct(desc: str):
    """ShapeDtypeStruct from a :func:`describe` entry like ``float32[2,64]``."""
    dtype, dims = desc[:-1].split("[")
    return jax.ShapeDtypeStruct(tuple(int(d) for d in dims.split(",") if d), np.dtype(dtype))
