"""jzero.compile_cache: the key's path checks, and a second process loading what the first compiled."""

import os
import subprocess
import sys
import textwrap

import pytest

from jzero import compile_cache
from jzero.config import load_config
from jzero.errors import ConfigError


def test_off_by_default_and_paths_checked(tmp_path):
    assert load_config(None, [], base={}).train.compile_cache_dir is None
    assert compile_cache.apply(load_config(None, [], base={})) is None
    assert compile_cache.cache_path(None) is None and compile_cache.cache_path("") is None
    made = compile_cache.cache_path(str(tmp_path / "a" / "b"))
    assert made == tmp_path / "a" / "b" and made.is_dir()
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(ConfigError, match=r"train.compile_cache_dir=.*is a file, not a directory"):
        compile_cache.cache_path(str(f))
    assert f.read_text() == "keep me"
    cfg = load_config(None, [f"train.compile_cache_dir={tmp_path / 'c'}"], base={})
    assert cfg.train.compile_cache_dir == str(tmp_path / "c")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_dir_is_an_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            compile_cache.cache_path(str(ro))
    finally:
        ro.chmod(0o700)


SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from jzero import compile_cache
    from jzero.config import load_config
    compile_cache.MIN_COMPILE_S = 0.0
    hits = []
    monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    compile_cache.apply(load_config(None, [f"train.compile_cache_dir={sys.argv[1]}"], base={}))
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(float(f(jnp.arange(64.0).reshape(8, 8) / 64)), len(hits))
""")


def test_second_process_loads_the_first_ones_executable(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "XLA_FLAGS": ""}   # one CPU device is enough here
    run = lambda: subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True,  # noqa: E731
                                 env=env, timeout=120)
    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    value1, hits1 = first.stdout.split()
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries, "the first compile wrote nothing to the cache"
    second = run()
    assert second.returncode == 0, second.stderr[-2000:]
    value2, hits2 = second.stdout.split()
    # every program the first process compiled (the step and the eager ops feeding it) is loaded, none compiled
    assert int(hits1) == 0 and int(hits2) == len([p for p in cache.glob("*") if p.is_file()]) >= 1
    assert value1 == value2
