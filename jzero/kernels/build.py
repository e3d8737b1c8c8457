"""Build jzero's C++ XLA FFI kernels at first use (as DeepSpeed's op_builder JIT-compiles its CUDA ops).

``library("lt_gemm")`` compiles ``csrc/lt_gemm.cc`` with the host C++ compiler against jax's FFI headers
(``jax.ffi.include_dir()``) and the cuBLASLt of ONE CUDA root, and returns the shared library's path. A root is
the ``nvidia-*`` wheels of one site-packages directory (what the GPU jaxlib loads), or a toolkit (``CUDA_HOME``,
``CUDA_PATH``, ``/usr/local/cuda*``; x86_64 and aarch64/sbsa ``targets/`` layouts); the first that holds every
header and library is used whole, so headers and libraries never come from two CUDA versions.

The result is cached under ``$JZERO_CACHE_DIR`` (default ``~/.cache/jzero/kernels``) by a hash of the source,
the command line, the compiler's ``--version``, the CUDA headers' contents and the jax version, so each machine
builds once (about 4 s) and a new compiler or toolkit builds again. The file is written under a temporary name
and renamed, so processes building at the same time do not see half a library. A failed build is cached too
(``<name>-<hash>.failed`` holds its message; later processes fail at once instead of recompiling), and a build
runs at most ``$JZERO_KERNEL_BUILD_TIMEOUT`` seconds (default 300). Only host code is compiled: no nvcc.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

CSRC = pathlib.Path(__file__).with_name("csrc")
#: the CUDA headers cublasLt.h pulls in (host declarations only)
HEADERS = ("cublasLt.h", "driver_types.h", "cuComplex.h", "vector_types.h", "crt/host_defines.h", "cuda_fp16.h",
           "cuda_bf16.h", "library_types.h", "cuda_runtime_api.h")
#: cuBLASLt, and the CUDA runtime for the autotuner's events
LIBRARIES = ("libcublasLt.so*", "libcudart.so*")
#: where a root keeps them: a toolkit's include/ and lib64/ (or targets/<arch>-linux/...), a wheel set's */include
INCLUDE_DIRS = ("include", "*/include", "targets/*-linux/include")
LIB_DIRS = ("lib64", "lib", "*/lib", "targets/*-linux/lib")
TIMEOUT_S = 300
OFF = "turn the kernel off with JZERO_KERNELS=layer_norm,cross_entropy"


class BuildError(RuntimeError):
    """A kernel library could not be built here (the message names what is missing and the way around it)."""


def _cuda_roots() -> list[str]:
    """Candidate CUDA roots, in order: the nvidia-* wheels of each sys.path entry, then the toolkits."""
    roots = [os.path.join(entry, "nvidia") for entry in sys.path if entry]
    roots += [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    out: list[str] = []
    for r in roots:
        if os.path.isdir(r) and r not in out:
            out.append(r)
    return out


def _search(root: str, subdirs: tuple[str, ...], pattern: str) -> str | None:
    for sub in subdirs:
        hits = sorted(glob.glob(os.path.join(root, sub, pattern)))
        if hits:
            return hits[-1]
    return None


def cuda_root() -> tuple[str, dict[str, str], dict[str, str]]:
    """``(root, {header: path}, {library pattern: path})`` of the first root holding all of them."""
    closest = None
    for root in _cuda_roots():
        headers = {h: _search(root, INCLUDE_DIRS, h) for h in HEADERS}
        libs = {lib: _search(root, LIB_DIRS, lib) for lib in LIBRARIES}
        missing = [k for k, v in {**headers, **libs}.items() if v is None]
        if not missing:
            return root, headers, libs
        if closest is None or len(missing) < len(closest[1]):
            closest = (root, missing)
    where = (f"{closest[0]} (the closest root) lacks {', '.join(closest[1])}" if closest
             else "there is no nvidia-* wheel directory, CUDA_HOME or /usr/local/cuda")
    raise BuildError(f"cannot build jzero's cuBLASLt kernels: no CUDA root holds all of {', '.join(HEADERS)} and "
                     f"{', '.join(LIBRARIES)}: {where}; set CUDA_HOME to a CUDA toolkit, or {OFF}")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError(f"cannot build jzero's cuBLASLt kernels: no C++ compiler (c++/g++, or $CXX) on PATH; "
                         f"install one, or {OFF}")
    return cxx


def command(name: str, out: str) -> list[str]:
    """The compiler command line that builds ``csrc/NAME.cc`` into ``out``."""
    import jax

    _, headers, libs = cuda_root()
    includes = [jax.ffi.include_dir()]
    for header, found in headers.items():   # each header's own directory: the wheels split them over packages
        inc = found[: -len(header) - 1]
        if inc not in includes:
            includes.append(inc)
    link = []
    for found in libs.values():
        link += [f"-L{os.path.dirname(found)}", f"-l:{os.path.basename(found)}",
                 f"-Wl,-rpath,{os.path.dirname(found)}"]
    return [_compiler(), "-O2", "-shared", "-fPIC", "-std=c++17", "-w", *(f"-I{i}" for i in includes),
            str(CSRC / f"{name}.cc"), "-o", out, *link]


def _compiler_id(cxx: str) -> bytes:
    """The compiler's ``--version`` text (another compiler, another build)."""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return b"unknown compiler"


def _header_bytes(cmd: list[str]) -> bytes:
    """The contents of the CUDA headers the command's ``-I`` directories provide (a new toolkit rebuilds)."""
    out = []
    for inc in (a[2:] for a in cmd if a.startswith("-I")):
        for h in HEADERS:
            path = os.path.join(inc, h)
            if os.path.isfile(path):
                out.append(h.encode() + pathlib.Path(path).read_bytes())
    return b"".join(out)


def cache_key(src: pathlib.Path, cmd: list[str]) -> str:
    """Hash of everything the library depends on: source, command line, compiler, CUDA headers, jax version."""
    import jax

    h = hashlib.sha256(src.read_bytes())
    for part in (" ".join(cmd).encode(), _compiler_id(cmd[0]), _header_bytes(cmd), jax.__version__.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    """Where built libraries (and the cuBLASLt algorithm choices, ``lt_gemm_algos.txt``) are kept."""
    return pathlib.Path(os.environ.get("JZERO_CACHE_DIR", pathlib.Path.home() / ".cache" / "jzero" / "kernels"))


def library(name: str) -> str:
    """Path of the built ``csrc/NAME.cc`` shared library (built now if this machine has not built it yet)."""
    src = CSRC / f"{name}.cc"
    if not src.is_file():
        raise BuildError(f"cannot build jzero's {name} kernels: {src} is missing from this install; reinstall jzero, "
                         f"or {OFF}")
    cache = cache_dir()
    digest = cache_key(src, command(name, "OUT"))
    target, failed = cache / f"{name}-{digest}.so", cache / f"{name}-{digest}.failed"
    if target.exists():
        return str(target)
    if failed.exists():
        raise BuildError(f"{failed.read_text().strip()} (cached; delete {failed} to try again)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    timeout = float(os.environ.get("JZERO_KERNEL_BUILD_TIMEOUT", TIMEOUT_S))
    try:
        try:
            run = subprocess.run(command(name, tmp), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:   # not cached: a busy machine may build it next time
            raise BuildError(f"building {src} timed out after {timeout:g} s (JZERO_KERNEL_BUILD_TIMEOUT); raise it, "
                             f"or {OFF}") from None
        if run.returncode != 0:
            lines = run.stderr.strip().splitlines() or ["(no output)"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            message = f"building {src} failed ({first.strip()}); {OFF}"
            _write_atomic(failed, message + "\n")
            raise BuildError(message)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
