"""A checkpoint directory's orbax managers and the reads every consumer shares (:mod:`jzero.checkpoint` saves and
restores whole train states with them, :mod:`jzero.checkpoint_weights` reads the weights alone).

Writers stay open per directory so asynchronous saves can run on; an error of a background save surfaces at the
next ``save``, ``wait_until_finished`` or read of that directory as :class:`CheckpointError`. Reads check each
restored leaf's checksum against the one saved in the meta (:mod:`jzero.checksum`).
"""

from __future__ import annotations

import atexit
import contextlib
import re
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from jzero.checkpoint_meta import FORMAT
from jzero.checksum import checksums, mismatches
from jzero.errors import CheckpointError
from jzero.orbax_noise import drop_closed_loop_callbacks, first_line, quiet_absl, quiet_background_failures

ITEMS = ("state", "meta", "client")


class UnreadableCheckpointError(CheckpointError):
    """A step directory exists but cannot be read (partial, corrupted, not a jzero checkpoint)."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds inf/nan: it is never written (it would rotate out the last good checkpoints)."""


# --------------------------------------------------------------------------- managers


_WRITERS: dict[str, tuple[ocp.CheckpointManager, tuple]] = {}


def _key(directory) -> str:
    return str(Path(directory).expanduser().absolute())


def writer(directory, max_to_keep: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """The process's manager that saves into ``directory`` (kept open so async saves can run on)."""
    key = _key(directory)
    opts = (max_to_keep, async_save)
    if key in _WRITERS:
        mgr, old = _WRITERS[key]
        if old == opts:
            return mgr
        _finish(key)
    quiet_background_failures()
    try:
        with quiet_absl():
            mgr = ocp.CheckpointManager(
                key, item_names=ITEMS,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                     cleanup_tmp_directories=True, create=True))
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {key} cannot be created ({exc.strerror or exc}); "
                              f"set checkpoint.dir to a writable directory") from None
    _WRITERS[key] = (mgr, opts)
    return mgr


def reader(directory) -> ocp.CheckpointManager:
    """A manager for reading ``directory`` (the open writer after its saves finish, else a read-only one)."""
    key = _key(directory)
    if key in _WRITERS:
        _wait(key)
        return _WRITERS[key][0]
    if not Path(key).is_dir():
        raise CheckpointError(f"checkpoint directory {key} does not exist; pass the directory that "
                              f"save_checkpoint / train.checkpoint_interval wrote")
    with quiet_absl():
        return ocp.CheckpointManager(key, item_names=ITEMS,
                                     options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def _wait(key: str) -> None:
    """Wait for ``key``'s writer; a background failure is raised once, and the writer dropped (the next save
    opens a fresh one, e.g. after space was freed)."""
    mgr = _WRITERS[key][0]
    try:
        mgr.wait_until_finished()
        mgr.check_for_errors()
    except Exception as exc:  # the background writer's error, re-raised here
        _WRITERS.pop(key, None)
        with contextlib.suppress(Exception):
            mgr.close()
        raise CheckpointError(f"writing a checkpoint into {key} failed: {type(exc).__name__}: "
                              f"{first_line(exc)}") from exc


def _finish(key: str) -> None:
    _wait(key)
    mgr, _ = _WRITERS.pop(key)
    mgr.close()


def wait_until_finished(directory=None) -> None:
    """Block until the async saves into ``directory`` (default: every directory) are on disk; raise their errors."""
    keys = [_key(directory)] if directory is not None else list(_WRITERS)
    for key in keys:
        if key in _WRITERS:
            _wait(key)


def close(directory=None) -> None:
    """Wait for and close the writers (all by default); later saves open new ones."""
    keys = [_key(directory)] if directory is not None else list(_WRITERS)
    for key in keys:
        if key in _WRITERS:
            _finish(key)


atexit.register(close)


def steps(directory) -> list[int]:
    """Complete checkpoint steps in ``directory``, ascending ([] if it does not exist)."""
    if _key(directory) not in _WRITERS and not Path(directory).expanduser().is_dir():
        return []
    return sorted(reader(directory).all_steps())


def _tag_step(tag) -> int:
    if isinstance(tag, (int, np.integer)) and not isinstance(tag, bool) and tag >= 0:
        return int(tag)
    m = re.fullmatch(r"(?:global_step)?(\d+)", str(tag))
    if m is None:
        raise CheckpointError(f"checkpoint tag {tag!r} is not a step number; jzero names checkpoints by step "
                              f"(orbax's layout): pass an int such as 100 or 'global_step100'")
    return int(m.group(1))


# --------------------------------------------------------------------------- reads


def read_meta(directory, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)`` of ``step`` (default: the latest complete step) without reading any array."""
    mgr = reader(directory)
    step = _pick_step(mgr, directory, step)
    where = f"checkpoint {_key(directory)}/{step}"
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as exc:
        drop_closed_loop_callbacks()
        raise UnreadableCheckpointError(f"{where} is unreadable: its meta item failed to load "
                                        f"({type(exc).__name__}: {first_line(exc)}); it is partial or corrupted, "
                                        f"load an earlier step or delete it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UnreadableCheckpointError(f"{where} is not a jzero checkpoint (meta format {found!r}, expected "
                                        f"{FORMAT}); write it with engine.save_checkpoint")
    return step, meta


def _pick_step(mgr, directory, step) -> int:
    available = sorted(mgr.all_steps())
    if not available:
        raise CheckpointError(f"no complete checkpoint in {_key(directory)}; train with train.checkpoint_interval>0 "
                              f"or call engine.save_checkpoint first")
    if step is None:
        return available[-1]
    step = _tag_step(step)
    if step not in available:
        raise CheckpointError(f"checkpoint step {step} is not in {_key(directory)} (complete steps: {available}); "
                              f"pick one of those")
    return step


def _verified(meta: dict, restored, where: str):
    """``restored`` (a saveable tree, or a sub-tree of one), after checking its leaves' checksums against the ones
    saved in ``meta``; changed bytes raise :class:`UnreadableCheckpointError` (so a resume falls back a step).
    Checkpoints written before checksums existed carry none and are not checked."""
    saved = meta.get("checksums")
    if saved:
        now = checksums(restored)
        bad = mismatches(saved, now)
        if bad:
            raise UnreadableCheckpointError(
                f"{where} is corrupted: state leaf '{bad[0]}' read back with checksum {now[bad[0]]}, but it was "
                f"saved with {saved[bad[0]]} ({len(bad)} of {len(now)} leaves differ: its files changed on disk "
                f"after the save); load an earlier step or delete it")
    return restored


def restore_partial(directory, step: int, item, restore_args):
    """Read only the leaves of ``item`` (a sub-tree of the saved state, e.g. ``{'params': ...}``) of ``step``.

    ``restore_args`` says where each leaf goes: ``ocp.ArrayRestoreArgs(sharding=...)`` for device arrays,
    ``ocp.RestoreArgs(restore_type=np.ndarray)`` for host numpy (export, no mesh needed).
    """
    if _key(directory) in _WRITERS:
        _wait(_key(directory))
    ckptr = ocp.PyTreeCheckpointer()
    try:
        return ckptr.restore(Path(_key(directory)) / str(step) / "state",
                             args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    finally:
        ckptr.close()


def _restore_item(directory, step: int, item: str, where: str):
    try:
        return getattr(reader(directory).restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})), item)
    except Exception as exc:
        raise UnreadableCheckpointError(f"{where} is unreadable: its {item} item failed to load "
                                        f"({type(exc).__name__}: {first_line(exc)})") from None
