"""What a jzero checkpoint saves besides the arrays: the saveable view of a train state, the JSON meta (config,
model sizes, optimizer and strategy, a ``path -> dtype[shape]`` description and a checksum of every leaf), the compatibility check
of a saved state against the one it is restored into, and the finite-state check that keeps inf/nan off disk.
Pure functions over pytrees and dicts; :mod:`jzero.checkpoint` does the orbax I/O with them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jzero.checksum import checksums
from jzero.errors import CheckpointError

FORMAT = 1


# --------------------------------------------------------------------------- state tree <-> saved tree


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _without_copies(state):
    """``state`` without ``TrainState.compute`` (the weights' compute-dtype copies: never saved, remade from the
    fp32 masters on restore, so a checkpoint is the same whatever the strategy kept)."""
    return state.replace(compute=None) if getattr(state, "compute", None) is not None else state


def saveable(state):
    """``state`` with typed PRNG key arrays replaced by their raw ``uint32`` key data (what orbax can write), and
    without the compute-dtype weight copies."""
    state = _without_copies(state)
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def restore_target(state):
    """ShapeDtypeStructs (with the current shardings) of ``saveable(state)``: where each saved leaf goes."""
    def one(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, state)


def _unsaveable(restored, like):
    """Re-wrap key data into typed keys wherever ``like`` holds typed keys (``like`` without its weight copies)."""
    like = _without_copies(like)
    return jax.tree.map(lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if _is_key(x) else r,
                        restored, like)


def describe(tree) -> dict[str, str]:
    """``{'params.wte': 'float32[256,64]', ...}`` for every leaf (the saved tree's fingerprint)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="."):
            f"{np.dtype(leaf.dtype).name}[{','.join(str(d) for d in leaf.shape)}]" for path, leaf in flat}


def _state_classes(tree) -> list[str]:
    """Names of the optax state classes (namedtuples) in an optimizer state, outermost first, deduplicated."""
    names: list[str] = []

    def walk(x):
        if hasattr(x, "_fields"):
            if type(x).__name__ not in names:
                names.append(type(x).__name__)
        if isinstance(x, (tuple, list)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
    walk(tree)
    return names


def _model_meta(engine) -> dict:
    """The model's family and its config's plain fields (numbers, strings, tuples of numbers such as Llama's
    ``rope_scaling``; JSON keeps tuples as lists): what rebuilding the model needs (jzero.weights)."""
    mc = engine.model_config

    def plain(v) -> bool:
        return isinstance(v, (bool, int, float, str)) or (
            isinstance(v, tuple) and all(isinstance(e, (int, float)) for e in v))

    sizes = {k: v for k, v in asdict(mc).items() if plain(v)} if is_dataclass(mc) else {}
    return {"family": engine.config.model.family, **sizes}


def make_meta(engine, step: int, data_state: dict | None) -> dict:
    from jzero.config import to_dict

    cfg = engine.config
    opt_state = getattr(engine.state, "opt_state", None)
    return {
        "format": FORMAT,
        "step": int(step),
        "engine_step": int(jax.device_get(engine.state.step)),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(cfg),
        "model": _model_meta(engine),
        "optimizer": {"type": cfg.optimizer.type, "state": _state_classes(opt_state)},
        "layout": {"mesh": {k: int(v) for k, v in engine.mesh.shape.items()},
                   "zero_stage": cfg.zero_optimization.stage, "n_devices": int(engine.mesh.devices.size)},
        "state": describe(saveable(engine.state)),
        "checksums": checksums(saveable(engine.state)),   # verified by every restore (jzero.checksum)
        "data": data_state,
        # what the strategy needs to rebuild the fp32 weights (optimizer offload: which (param path, layer) each
        # host master chunk holds, so read_params can re-stack them); None when state.params are those weights
        "offload": _strategy_meta(engine),
    }


def _strategy_meta(engine):
    strategy = getattr(engine, "strategy", None)
    return strategy.checkpoint_meta() if strategy is not None else None


def check_compatible(meta: dict, state, optimizer_type: str, where: str, prefix: str = "") -> None:
    """Raise a one-line :class:`CheckpointError` when the saved tree cannot land in ``state``.

    ``prefix`` limits the comparison to leaves under it (``"params."`` when loading weights only).
    """
    pick = lambda d: {k: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
    saved, now = pick(meta["state"]), pick(describe(saveable(state)))
    if saved == now:
        return
    saved_opt = meta.get("optimizer", {})
    now_opt = {"type": optimizer_type, "state": _state_classes(getattr(state, "opt_state", None))}
    opt_keys = lambda d: {k: v for k, v in d.items() if k.startswith("opt_state")}  # noqa: E731
    if opt_keys(saved) != opt_keys(now) and saved_opt != now_opt:
        raise CheckpointError(
            f"{where} holds the state of optimizer.type='{saved_opt.get('type')}' "
            f"({', '.join(saved_opt.get('state', []))})"
            f" but this run builds optimizer.type='{now_opt['type']}' ({', '.join(now_opt['state'])}); resume with "
            f"optimizer.type={saved_opt.get('type')} and the same optimizer params, or load only the weights "
            f"(load_module_only=True)")
    missing = [k for k in now if k not in saved]
    extra = [k for k in saved if k not in now]
    stacked = lambda d: any(".blocks." in f".{k}" for k in d if k.startswith("params."))  # noqa: E731
    if missing and extra and stacked(saved) != stacked(now):
        was = "true (layers stacked in 'blocks')" if stacked(saved) else "false (one 'block_<i>' per layer)"
        raise CheckpointError(f"{where} was written with model.scan_layers={was}, this run has the other setting; "
                              f"resume with model.scan_layers={'true' if stacked(saved) else 'false'}")
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ and all(k.startswith("opt_state") for k in differ):   # same weights, other optimizer-state shapes
        k = differ[0]
        raise CheckpointError(f"{where}: optimizer state leaf '{k}' is {saved[k]} in the checkpoint but {now[k]} "
                              f"in this run ({len(differ)} leaves differ) while the weights match: the optimizer's "
                              f"state layout differs (other optimizer params, or a jzero version that kept it "
                              f"otherwise); resume with the checkpoint's optimizer settings, or load only the weights "
                              f"(load_module_only=True)")
    if differ:
        k = differ[0]
        raise CheckpointError(f"{where}: state leaf '{k}' is {saved[k]} in the checkpoint but {now[k]} in this run "
                              f"({len(differ)} leaves differ); use the checkpoint's model {meta.get('model')}")
    if missing:
        raise CheckpointError(f"{where} has no state leaf '{missing[0]}' ({len(missing)} missing) that this run's "
                              f"train state holds; it was written by a run with other features (see its meta config)")
    raise CheckpointError(f"{where} holds state leaf '{extra[0]}' ({len(extra)} extra) that this run's train state "
                          f"lacks; enable the same features as the run that wrote it")


@jax.jit
def _all_finite(leaves):
    ok = [jnp.all(jnp.isfinite(x)) for x in leaves]
    return jnp.all(jnp.stack(ok)) if ok else jnp.asarray(True)


def state_is_finite(state) -> bool:
    """Whether every floating leaf of ``state`` on the devices is finite (one compiled reduction, one host sync);
    :func:`save` refuses to write a state for which it is false.

    Typed PRNG keys are not floating and are skipped. Leaves in pinned host memory (optimizer offload's masters
    and moments) are left out: a non-finite update of theirs reaches the device params, which are checked.
    """
    leaves = [x for x in jax.tree.leaves(state)
              if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)
              and getattr(x.sharding, "memory_kind", None) in (None, "device")]
    return bool(jax.device_get(_all_finite(leaves))) if leaves else True


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``['optimizer.params.lr: 0.001 -> 0.0003', ...]``: where a resumed run's config differs from the saved one."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def unflatten(flat: dict) -> dict:
    """``{'a.b': x}`` -> ``{'a': {'b': x}}`` (dotted leaf names back into a nested tree)."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
