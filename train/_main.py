"""What every training main does around its own loop: config, XLA flags, jax.distributed, one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors one line (``error: PROG: MESSAGE; see PROG --help``, exit 2) like every
    other bad input of the mains, instead of the usage block and a second line."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def run_main(args, default_config: dict, run: Callable) -> int:
    """Load ``args.config`` (or ``default_config``) + overrides, set XLA flags before the backend starts, join
    a multi-process run if the flags/environment say so, then ``run(cfg)`` holding ``train.output_dir``'s lock
    (process 0; :mod:`jzero.rundir`: a second run into it fails at once) and its checkpoint directory's
    (:func:`_run_dirs`); a JzeroError prints one line, exit 2."""
    import contextlib

    from jzero import compile_cache, rundir, xla_flags
    from jzero.config import load_config
    from jzero.distributed import maybe_initialize_from_args
    from jzero.errors import JzeroError

    try:
        cfg = load_config(args.config, args.overrides, base=None if args.config else default_config)
        xla_flags.apply(cfg)   # measured GPU flags + DeepSpeed bucket sizes as XLA combine thresholds, pre-backend
        maybe_initialize_from_args(args)
        compile_cache.apply(cfg)   # before the first compile: a restart loads the step XLA compiled and autotuned
        print_start_notes(cfg)
        import jax

        with contextlib.ExitStack() as held:
            if jax.process_index() == 0:
                for directory, key in _run_dirs(cfg):
                    held.enter_context(rundir.claim(directory, key))
            run(cfg)
    except JzeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_dirs(cfg) -> list[tuple[str, str]]:
    """The directories a run writes and must hold alone: ``train.output_dir``, and the checkpoint directory when
    the run checkpoints or names one (``checkpoint.dir``, default ``<output_dir>/checkpoints``): another run
    pointing its ``checkpoint.dir`` there would otherwise rotate this one's steps away."""
    from jzero.config import checkpoint_dir

    dirs = [(cfg.train.output_dir, "train.output_dir")]
    if cfg.checkpoint.dir or cfg.train.checkpoint_interval:
        dirs.append((checkpoint_dir(cfg), "checkpoint.dir"))
    return dirs


def print_start_notes(cfg) -> None:
    """Process 0 prints the config's start lines: the DeepSpeed keys that have no effect under XLA and why
    (:mod:`jzero.ds_keys`), the "auto" values resolved (:mod:`jzero.ds_auto`), and the optimizer a config without
    one trains; nothing when there are none."""
    import jax

    if jax.process_index() == 0:
        for line in cfg.start_notes(include_optimizer=True):
            print(line, flush=True)


def exit_with(main: Callable[[], int]) -> None:
    """``sys.exit(main())``, with a :class:`jzero.errors.JzeroError` escaping ``main`` printed as one line, exit 2
    (for the utility mains, plot and sweep, that do not go through :func:`run_main`)."""
    from jzero.errors import JzeroError

    try:
        sys.exit(main())
    except JzeroError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
