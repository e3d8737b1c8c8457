"""Build jzero's C++ XLA FFI kernels at first use (as DeepSpeed's op_builder JIT-compiles its CUDA ops).

``library("lt_gemm")`` compiles ``csrc/lt_gemm.cc`` with the host C++ compiler against jax's FFI headers
(``jax.ffi.include_dir()``) and the cuBLASLt that the GPU jaxlib already uses (the ``nvidia-cublas`` wheel, or a
CUDA toolkit under ``CUDA_HOME``), and returns the shared library's path. The result is cached under
``$JZERO_CACHE_DIR`` (default ``~/.cache/jzero/kernels``) by a hash of the source, the flags and the jax version, so
each machine builds once (about 4 s); the file is written under a temporary name and renamed, so processes
building at the same time do not see half a library. Only host code is compiled: no nvcc is needed.
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


class BuildError(RuntimeError):
    """A kernel library could not be built here (the message names what is missing and the way around it)."""


def _cuda_roots() -> list[str]:
    """Directories that may hold CUDA headers/libraries: the nvidia-* wheels, then CUDA_HOME and friends."""
    roots = []
    for entry in sys.path:
        roots += sorted(glob.glob(os.path.join(entry, "nvidia", "*")))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(os.environ[var])
    roots += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    return [r for r in roots if os.path.isdir(r)]


def _find(pattern: str, subdirs: tuple[str, ...], what: str) -> str:
    for root in _cuda_roots():
        for sub in subdirs:
            hits = sorted(glob.glob(os.path.join(root, sub, pattern)))
            if hits:
                return hits[-1]
    raise BuildError(f"cannot build jzero's cuBLASLt kernels: {what} ({pattern}) not found under the nvidia-* "
                     f"wheels or CUDA_HOME; set CUDA_HOME to a CUDA toolkit, or turn the kernel off with "
                     f"JZERO_KERNELS=layer_norm,cross_entropy")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("cannot build jzero's cuBLASLt kernels: no C++ compiler (c++/g++, or $CXX) on PATH; "
                         "install one, or turn the kernel off with JZERO_KERNELS=layer_norm,cross_entropy")
    return cxx


def command(name: str, out: str) -> list[str]:
    """The compiler command line that builds ``csrc/NAME.cc`` into ``out``."""
    import jax

    includes = [jax.ffi.include_dir()]
    for header in HEADERS:   # each header's own directory: the wheels split the CUDA headers over packages
        found = _find(header, ("include", "targets/x86_64-linux/include"), "a CUDA header")
        inc = found[: -len(header) - 1]
        if inc not in includes:
            includes.append(inc)
    link = []
    for lib in ("libcublasLt.so*", "libcudart.so*"):   # cuBLASLt; the CUDA runtime for the autotuner's events
        found = _find(lib, ("lib", "lib64"), "a CUDA library")
        link += [f"-L{os.path.dirname(found)}", f"-l:{os.path.basename(found)}",
                 f"-Wl,-rpath,{os.path.dirname(found)}"]
    return [_compiler(), "-O2", "-shared", "-fPIC", "-std=c++17", "-w", *(f"-I{i}" for i in includes),
            str(CSRC / f"{name}.cc"), "-o", out, *link]


def library(name: str) -> str:
    """Path of the built ``csrc/NAME.cc`` shared library (built now if this machine has not built it yet)."""
    import jax

    src = CSRC / f"{name}.cc"
    if not src.is_file():
        raise BuildError(f"cannot build jzero's {name} kernels: {src} is missing from this install; reinstall jzero, "
                         f"or turn the kernel off with JZERO_KERNELS=layer_norm,cross_entropy")
    cache = pathlib.Path(os.environ.get("JZERO_CACHE_DIR", pathlib.Path.home() / ".cache" / "jzero" / "kernels"))
    probe = command(name, "OUT")
    digest = hashlib.sha256(src.read_bytes() + " ".join(probe).encode() + jax.__version__.encode()).hexdigest()
    target = cache / f"{name}-{digest[:16]}.so"
    if target.exists():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        run = subprocess.run(command(name, tmp), capture_output=True, text=True)
        if run.returncode != 0:
            lines = run.stderr.strip().splitlines() or ["(no output)"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            raise BuildError(f"building {src} failed ({first.strip()}); turn the kernel off with "
                             f"JZERO_KERNELS=layer_norm,cross_entropy")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)
