"""Checkpoints: DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` on an orbax ``CheckpointManager``.

    engine.save_checkpoint("ckpt", client_state={"epoch": 3}, data_iterator=batches)  # returns at once
    path, client = engine.load_checkpoint("ckpt", data_iterator=batches)             # latest step
    jzero.checkpoint.wait_until_finished()                                              # before exit

Layout: ``DIR/<step>/`` holds three orbax items. ``state`` is whatever ``engine.state`` holds (step, params,
optimizer state, and any field later added to ``TrainState``: loss scale, 1-bit error buffers, RNG keys),
written sharded (OCDBT/zarr) by every process for its own shards. ``meta`` is JSON: the resolved config, the
model sizes, the optimizer's type and state classes, a ``path -> dtype[shape]`` description and a checksum
(:mod:`jzero.checksum`) of every state leaf, and the data iterator position (``BatchIterator.get_state()``).
``client`` is DeepSpeed's ``client_state``: JSON with string keys (other keys are refused, not turned into
strings; tuples come back as lists). A step directory appears only when complete: orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it when done, so a process killed mid-save leaves the previous
steps loadable.

Rotation: unlike DeepSpeed, which never deletes, a directory keeps the ``checkpoint.max_to_keep`` (default 3)
newest steps; each save past that deletes the oldest. orbax counts "oldest" by write order, not step number, so
with rotation on a save of a step below the directory's highest is refused (it would delete the higher steps
first); ``checkpoint.max_to_keep: null`` keeps every step, as DeepSpeed does.

Saves are asynchronous by default: ``save`` blocks only while device buffers are copied to host (so the next,
donating train step cannot touch them), then a background thread writes. Errors of that thread surface at the
next ``save`` or at ``wait_until_finished`` as :class:`CheckpointError`, never silently.

Restoring builds its targets from ``engine.state`` as it is now (shape, dtype, sharding of every leaf), so a
checkpoint written on 8 devices at ZeRO-3 loads onto 4 devices at ZeRO-1 or with tensor parallelism with no
conversion step: orbax reads each new shard's slice from the saved chunks. The saved tree must match the new
one leaf for leaf; when it does not (another optimizer, another model size) the error names both sides.

Modules: this one saves, loads and resumes; :mod:`jzero.checkpoint_io` holds the orbax managers and the reads
they share, :mod:`jzero.checkpoint_meta` the meta and compatibility check, :mod:`jzero.checkpoint_weights` the
host-side weights reader (their public names are re-exported here).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jzero.checkpoint_meta import (FORMAT, _unsaveable, check_compatible, config_changes,  # noqa: F401  (re-exported)
                                  describe, make_meta, restore_target, saveable, state_is_finite, unflatten)
from jzero.checkpoint_io import (ITEMS, NonFiniteStateError, UnreadableCheckpointError,  # noqa: F401 (re-exported)
                                _WRITERS, _finish, _key, _pick_step, _restore_item, _tag_step, _verified, _wait,
                                close, read_meta, reader, restore_partial, steps, wait_until_finished, writer)
from jzero.checkpoint_weights import read_params  # noqa: F401 (re-exported)
from jzero.errors import CheckpointError
from jzero.orbax_noise import drop_closed_loop_callbacks, first_line

UNREADABLE_SUFFIX = ".unreadable"


# --------------------------------------------------------------------------- save / load


def save(engine, directory, tag=None, client_state: Any = None, data_iterator=None) -> int:
    """Save ``engine.state`` (+ meta, client_state, the data iterator position) as step ``tag``.

    ``tag`` defaults to the engine's optimizer step. Returns the step. Asynchronous when
    ``checkpoint.async_save`` (the default): returns once the arrays are copied off the devices.
    """
    step = int(jax.device_get(engine.state.step)) if tag is None else _tag_step(tag)
    try:
        _string_keys(client_state)
        client_json = json.loads(json.dumps({} if client_state is None else client_state))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"client_state for checkpoint step {step} is not JSON-serialisable ({exc}); "
                              f"pass plain dicts, lists, strings and numbers") from None
    data_state = data_iterator.get_state() if data_iterator is not None else None
    cc = engine.config.checkpoint
    mgr = writer(directory, cc.max_to_keep, cc.async_save)
    key = _key(directory)
    _wait(key)   # surfaces a failed earlier async save before starting the next
    existing = sorted(mgr.all_steps())
    if step in existing:
        raise CheckpointError(f"checkpoint step {step} already exists in {key}; pass another tag, or delete "
                              f"{key}/{step} to overwrite it")
    if cc.max_to_keep is not None and existing and step < existing[-1]:
        raise CheckpointError(f"checkpoint step {step} is below step {existing[-1]} already in {key}, and with "
                              f"checkpoint.max_to_keep={cc.max_to_keep} orbax's rotation deletes by write order, so "
                              f"step {existing[0]} onwards would go before this one; save into another directory, or "
                              f"set checkpoint.max_to_keep=null to keep every step")
    if not state_is_finite(engine.state):
        last = steps(directory)
        raise NonFiniteStateError(
            f"checkpoint step {step} not saved into {key}: the train state holds inf/nan (training diverged), and "
            f"a nan checkpoint would rotate out the good ones; last good checkpoint: "
            f"{f'{key}/{last[-1]}' if last else 'none'}; resume from it with a lower learning rate")
    args = ocp.args.Composite(state=ocp.args.StandardSave(saveable(engine.state)),
                              meta=ocp.args.JsonSave(make_meta(engine, step, data_state)),
                              client=ocp.args.JsonSave(client_json))
    try:
        saved = mgr.save(step, args=args, force=True)
    except Exception as exc:  # OSError, or tensorstore's ValueError (e.g. RESOURCE_EXHAUSTED: disk full)
        raise CheckpointError(f"saving checkpoint step {step} into {key} failed: {type(exc).__name__}: "
                              f"{first_line(exc)}") from None
    if not saved:
        raise CheckpointError(f"orbax declined to save step {step} into {key}; is another save of it in progress?")
    if not cc.async_save:
        _wait(key)
    return step


def _string_keys(obj, where: str = "client_state") -> None:
    """Raise TypeError naming the first dict key of ``obj`` that is not a string (JSON would turn ``{1: x}`` into
    ``{"1": x}`` and the load would return another dict than was saved)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the non-string key {k!r}, which JSON would turn into {str(k)!r}")
            _string_keys(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _string_keys(v, f"{where}[{i}]")


def load(engine, directory, tag=None, data_iterator=None, load_module_only: bool = False,
         log: Callable[[str], None] = print) -> Any:
    """Restore ``engine.state`` from step ``tag`` (default latest) in the engine's current layout; return client_state.

    ``data_iterator`` (anything with ``set_state``) is moved to the saved position.
    ``load_module_only`` (DeepSpeed's flag) loads only the params and keeps this run's fresh optimizer state and
    step (fine-tuning from a pretraining checkpoint, possibly with another optimizer).
    """
    step, meta = read_meta(directory, tag)
    where = f"checkpoint {_key(directory)}/{step}"
    if data_iterator is not None and meta.get("data") is None:
        raise CheckpointError(f"{where} holds no data iterator position (saved without data_iterator); "
                              f"load it without data_iterator and position the data yourself")
    strategy = getattr(engine, "strategy", None)
    if load_module_only and strategy is not None and not strategy.params_are_masters:
        # the fp32 weights are not state.params (optimizer offload: host masters): read the checkpoint's fp32
        # weights (its params, or its masters if it was offloaded too) and rebuild the engine's from them
        engine.set_params(read_params(directory, step)[1])
        state = engine.state
    elif load_module_only:
        check_compatible(meta, engine.state, engine.config.optimizer.type, where, prefix="params.")
        target = {"params": restore_target(saveable(engine.state.params))}
        params = _verified(meta, _restore_state(directory, step, target, where, partial=True), where)["params"]
        state = engine.state.replace(params=_unsaveable(params, engine.state.params))
    else:
        _check_offload(meta, strategy, where)
        check_compatible(meta, engine.state, engine.config.optimizer.type, where)
        target = restore_target(saveable(engine.state))
        state = _unsaveable(_verified(meta, _restore_state(directory, step, target, where), where), engine.state)
        state = _fresh_loss_scale_if_precision_changed(meta, engine, state, where, log)
    client = _restore_item(directory, step, "client", where)
    if data_iterator is not None:
        data_iterator.set_state(meta["data"])
    if strategy is not None:   # the compute-dtype weight copies, remade from the restored masters
        state = strategy.refresh(state)
    engine.state = state
    return client


def _check_offload(meta: dict, strategy, where: str) -> None:
    """A whole-state resume needs the optimizer state where the checkpoint keeps it: host chunks under
    ``offload_optimizer`` (its state tree holds no moments), device arrays otherwise."""
    saved = meta.get("offload") is not None
    now = bool(getattr(strategy, "offloaded", False))
    if saved != now:
        dev = lambda off: "cpu" if off else "none"  # noqa: E731
        raise CheckpointError(f"{where} was written with zero_optimization.offload_optimizer.device={dev(saved)} "
                              f"but this run has device={dev(now)}; resume with device={dev(saved)}, or load only "
                              "the weights (load_module_only=True)")


def require_no_steps(directory, fix: str) -> None:
    """Refuse to start a fresh run that saves into ``directory`` while it holds steps of an earlier run: orbax's
    rotation (``max_to_keep``) deletes the oldest-written step whatever its number, so the old run's checkpoints
    would go one by one, and a later ``--resume`` could continue the old run from a step the new one never reached.
    ``fix``: what the caller's user should do instead (one clause)."""
    found = steps(directory)
    if found:
        shown = ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")
        raise CheckpointError(f"checkpoint directory {_key(directory)} already holds steps {shown} of an earlier "
                              f"run, which this run's checkpoint rotation would delete; {fix}")


def _fresh_loss_scale_if_precision_changed(meta: dict, engine, state, where: str, log):
    """A checkpoint written without fp16 holds the static 1.0 scale (and one with a static scale holds that
    scale): resumed under dynamic fp16 it would never scale. When the saved fp16 ``enabled`` / ``loss_scale``
    differ from this run's, the scaler starts fresh from this run's ``fp16`` section, and ``log`` says so."""
    from jzero.precision import init_loss_scale

    saved = (meta.get("config") or {}).get("fp16") or {}
    now = getattr(engine.config, "fp16", None)
    if now is None or not hasattr(state, "loss_scale"):
        return state
    if (bool(saved.get("enabled", False)), float(saved.get("loss_scale", 0.0))) == (now.enabled, now.loss_scale):
        return state
    fresh = init_loss_scale(now)
    fresh = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), fresh, state.loss_scale)
    log(f"checkpoint: {where} was written with fp16.enabled={saved.get('enabled', False)}, "
        f"loss_scale={saved.get('loss_scale', 0.0)}; the loss scaler starts fresh from this run's fp16 section "
        f"(scale {float(fresh.scale):g})")
    return state.replace(loss_scale=fresh.replace(skipped_steps=state.loss_scale.skipped_steps))


def _restore_state(directory, step: int, target, where: str, partial: bool = False):
    """Read the state; unreadable on any process -> :class:`UnreadableCheckpointError` on every process.

    Each process reads its own shards, so a damaged file may fail one process's read only. That process then
    joins the barrier orbax ends every restore with (where the others wait), and all agree on the outcome
    (:func:`jzero.distributed.failed_processes`), so a resume falls back to the same earlier step everywhere
    instead of pairing the processes' next collectives wrongly (a hang or a "name mismatch" traceback)."""
    from jzero.distributed import failed_processes

    state, error, manager = None, None, None
    try:
        if partial:
            state = restore_partial(directory, step, target, ocp.checkpoint_utils.construct_restore_args(target))
        else:
            manager = reader(directory)
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    except Exception as exc:
        drop_closed_loop_callbacks()
        error = f"{type(exc).__name__}: {first_line(exc)}"
        if jax.process_count() > 1:
            _join_restore_barrier(manager)
    failed = failed_processes(error is None)
    if failed:
        why = error if error is not None else f"on process {failed[0]}"
        raise UnreadableCheckpointError(f"{where} is unreadable: its state failed to load ({why}); it is partial "
                                        f"or corrupted, load an earlier step or delete it")
    return state


def _join_restore_barrier(manager) -> None:
    """Enter the barrier that ends an orbax restore (``manager``'s checkpointer's, or a default
    ``PyTreeCheckpointer``'s for ``manager=None``), as the processes whose read worked do."""
    from orbax.checkpoint._src.multihost import multihost

    ckptr = getattr(manager, "_checkpointer", None)
    key = multihost.unique_barrier_key("Checkpointer:restore", prefix=getattr(ckptr, "_barrier_sync_key_prefix", None))
    multihost.sync_global_processes(key, processes=getattr(ckptr, "_active_processes", None))


def read_client(directory, step: int):
    """The ``client_state`` saved with ``step`` (no array read)."""
    return _restore_item(directory, step, "client", f"checkpoint {_key(directory)}/{step}")


def config_changes_line(directory, step: int, cfg) -> str | None:
    """``"resume: config differs from the checkpoint's in N keys: ..."`` for a run resumed from ``step`` with the
    config ``cfg``, or None when they agree (what the mains print on ``--resume``)."""
    from jzero.config import to_dict

    changes = config_changes(read_meta(directory, step)[1]["config"], to_dict(cfg))
    return (f"resume: config differs from the checkpoint's in {len(changes)} keys: " + "; ".join(changes[:8])
            if changes else None)


# --------------------------------------------------------------------------- resume


def restore_latest(engine, directory, data_iterator=None, log: Callable[[str], None] = print,
                   set_aside: bool = True):
    """Resume from the newest loadable step; ``(step, client_state)``, or ``None`` when there is no checkpoint.

    An unreadable step (partial or corrupted) is reported through ``log`` and skipped for the one before it;
    with ``set_aside`` it is renamed ``<step>.unreadable`` so that the resumed run can save that step again.
    A checkpoint that is readable but does not fit this run (other optimizer/model) raises at once.
    """
    available = steps(directory)
    if not available:
        return None
    tried = []
    for step in reversed(available):
        try:
            client = load(engine, directory, step, data_iterator, log=log)
            if tried:
                log(f"checkpoint: resumed from step {step}, the latest loadable one in {_key(directory)} "
                    f"(skipped unreadable steps {tried})")
            return step, client
        except UnreadableCheckpointError as exc:
            tried.append(step)
            log(f"checkpoint: {exc}; falling back to an earlier checkpoint")
            if set_aside:
                _set_aside(directory, step, log)
    raise CheckpointError(f"no loadable checkpoint in {_key(directory)}: steps {sorted(tried)} are all unreadable; "
                          f"delete them or start without --resume")


def _set_aside(directory, step: int, log: Callable[[str], None]) -> None:
    """Rename ``<step>`` to ``<step>.unreadable-<time>`` (process 0; all processes wait for it), so orbax no longer
    lists it and the resumed run can write that step again."""
    if jax.process_index() == 0:
        src = Path(_key(directory)) / str(step)
        dst = src.with_name(f"{step}{UNREADABLE_SUFFIX}-{int(time.time())}")
        shutil.move(str(src), str(dst))
        log(f"checkpoint: moved unreadable {src} aside to {dst}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jzero_checkpoint_set_aside_{step}")
    if _key(directory) in _WRITERS:
        _WRITERS[_key(directory)][0].reload()


# --------------------------------------------------------------------------- the weights alone, on the host


def location(directory) -> str:
    """The absolute path a checkpoint directory is known by (in messages, and export's metadata)."""
    return _key(directory)
