"""Orbax and tensorstore failures as one readable line: what :mod:`jzero.checkpoint` does about their noise.

A failed save or restore is reported once, by :mod:`jzero.checkpoint`, as a one-line
:class:`jzero.errors.CheckpointError`. Around it orbax and tensorstore make a lot of noise of their own:

* INFO/WARNING chatter while a manager opens ('directory is read only', ...): :func:`quiet_absl`;
* ERROR records with full tracebacks from orbax's background save threads (~50 on a full disk) for the failure
  that :func:`jzero.checkpoint.wait_until_finished` re-raises anyway: :func:`quiet_background_failures`;
* tensorstore read callbacks that land on orbax's closed event loop after a failed restore, each printing a
  ``RuntimeError('Event loop is closed')`` traceback (~100 on 8 devices): :func:`drop_closed_loop_callbacks`;
* tensorstore messages that end in their whole JSON spec, which cut the cause out of a short message:
  :func:`first_line` keeps the cause and drops the spec.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys


@contextlib.contextmanager
def quiet_absl():
    """Hide orbax's INFO/WARNING chatter ('directory is read only', ...) while opening a manager."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _OrbaxBackgroundErrors(logging.Filter):
    """Drop orbax's ERROR records: the background failure they report is re-raised once as a one-line error.
    Also asyncio's "Task exception was never retrieved" for orbax's own write tasks, logged whenever the garbage
    collector happens to reach them (the same failure again, at a time that differs from run to run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "orbax" in record.pathname:
            return False
        return not (record.name == "asyncio" and "orbax" in record.getMessage())


_ORBAX_FILTER = _OrbaxBackgroundErrors()


def quiet_background_failures() -> None:
    """Before async saves run: orbax's background error logs and tensorstore's late callbacks stay quiet (the
    error surfaces through ``jzero.checkpoint._wait``). Idempotent."""
    for name in ("absl", "asyncio"):   # orbax logs through absl; asyncio reports its failed, unawaited tasks
        logger = logging.getLogger(name)
        if _ORBAX_FILTER not in logger.filters:
            logger.addFilter(_ORBAX_FILTER)
    drop_closed_loop_callbacks()


def drop_closed_loop_callbacks() -> None:
    """Put a filter in front of the current ``sys.unraisablehook`` that drops ``RuntimeError('Event loop is
    closed')`` (tensorstore's late callbacks after orbax closed its loop); every other unraisable exception
    still goes through. Installed once."""
    if getattr(sys.unraisablehook, "_jzero_filter", False):
        return
    previous = sys.unraisablehook

    def hook(info):
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            return
        previous(info)

    hook._jzero_filter = True
    sys.unraisablehook = hook


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message without tensorstore's trailing ``[tensorstore_spec='...']`` and
    ``[source locations='...']`` parts, its middle elided past 500 characters (the cause, e.g. 'No space left
    on device', is at the end of tensorstore's messages)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = re.sub(r"\s*\[(?:tensorstore_spec|source locations)(?:\[\d+\])?=.*$", "", line).strip()
    return line if len(line) <= 500 else f"{line[:240]} ... {line[-250:]}"
