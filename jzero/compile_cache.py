"""JAX's persistent compilation cache from the config (``train.compile_cache_dir``), as MaxText's ``jax_cache_dir``.

Why: the first compile of a step runs XLA:GPU's autotuner, which times candidate GEMM algorithms and fusion
emitters and keeps the fastest. The timings are noisy, so two processes compiling the same program pick
differently: on one H100, 6 and 9 of the Llama-1B step's 100 autotuned choices differed between three identical
runs, and each run's choices reproduced its own step time when loaded back (BENCHMARKS.md, "Session 10"). With a
cache directory, a restart (a resumed job, the next sweep point with the same shapes) loads the executable the
first run compiled: the same kernels, so the same step time, and no compile (XLA's per-fusion autotune cache goes
in a subdirectory, so a changed program reuses the fusions it shares). Off by default (``null``): the cached
executable has been loaded on CPU (tests/test_compile_cache.py) but not yet on a GPU, where the step holds
jzero's FFI and Pallas kernels and cuDNN attention; loading one run's autotune choices there did reproduce its step
time and halve the compile.

    compile_cache.apply(cfg)    # before the first jit compile (the mains call it next to xla_flags.apply)

Entries are keyed by JAX on the program, the compile options, the XLA flags and the jax/jaxlib/device versions, so
one directory serves many configs and versions. Compiles under ``MIN_COMPILE_S`` seconds are not written.
"""

from __future__ import annotations

import os
from pathlib import Path

from jzero.errors import ConfigError

#: compiles faster than this are not cached (JAX's own default; tiny CPU test programs stay out of the cache)
MIN_COMPILE_S = 1.0


def cache_path(value: str | None) -> Path | None:
    """``train.compile_cache_dir`` -> the directory (``~`` and ``$VARS`` expanded, created), or None when off.

    A path that exists and is not a directory, or cannot be created or written, is a :class:`ConfigError` naming
    the key and the fix (nothing is deleted or overwritten)."""
    if value is None or str(value).strip() == "":
        return None
    path = Path(os.path.expandvars(os.path.expanduser(str(value))))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.compile_cache_dir={value!r} is a file, not a directory; give a directory path "
                          f"(or null to compile without a cache)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"train.compile_cache_dir={value!r} cannot be created ({exc.strerror}); give a writable "
                          f"directory (or null to compile without a cache)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"train.compile_cache_dir={value!r} is not writable; give a writable directory (or null "
                          f"to compile without a cache)")
    return path


def apply(cfg) -> Path | None:
    """Point JAX's persistent compilation cache at ``cfg.train.compile_cache_dir``; return the directory or None.

    A config without the key (or with null) leaves JAX's settings as they are."""
    path = cache_path(getattr(getattr(cfg, "train", None), "compile_cache_dir", None))
    if path is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
