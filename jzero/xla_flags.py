"""GPU XLA flags from the config (a model family's measured flags, DeepSpeed's bucket sizes, ``overlap_comm``), set
from a main before the backend starts.

    from jzero import xla_flags
    cfg = load_config(...)
    xla_flags.apply(cfg)          # before jzero.initialize / the first jax device use
    engine = jzero.initialize(cfg)

XLA reads ``XLA_FLAGS`` once, when the backend initialises; a flag added later is silently ignored, so call this
first. Flags the user already put in ``XLA_FLAGS`` win (a name already present is never overridden), and
``JZERO_XLA_FLAGS=0`` turns the whole thing off. The per-family flags in ``FLAGS`` are the ones measured faster on
the lent H100 (BENCHMARKS.md); ``overlap_comm``'s scheduler flags (:mod:`jzero.overlap`) map DeepSpeed's key and
have not yet been timed on a GPU:

- ``--xla_gpu_dot_merger_threshold_mb=0`` (GPT-2): XLA merges the q/k/v projections (they share their input) into
  one [d, 3d] GEMM, then needs a copy per q/k/v to split its output for cuDNN attention, and a concatenate of
  dq/dk/dv in the backward pass; unmerged, each projection writes its own array. Measured on GPT-2 124M:
  BENCHMARKS.md, "History" and "Notes: predictions vs measurements" (dot merger off). Llama-style models too: the
  same flag, with the deferred residual and the q/k/v gradients summed in the norm's kernel
  (:mod:`jzero.kernels.layer_norm` ``DEFER_RESIDUAL``, ``MULTI_DY``), made the Llama-1B main 1.0% faster on an
  H100 (238.2 vs 240.7 ms, 2 rounds; BENCHMARKS.md, "Session 14").
- ``--xla_gpu_enable_triton_gemm=false`` (GPT-2, Llama): XLA's autotuner may run a GEMM as a Triton fusion (GPT-2's
  MLP projection forward, [16384, 3072] x [3072, 768]: 115 us where cuBLAS runs the same shape in 105); with
  the Triton emitter off every GEMM is cuBLAS's. GPT-2 main on an H100: 31.77 vs 32.12 ms (-1.1%, 2 rounds
  interleaved), compile 10.5 vs 13-15 s; Llama-1B: one 30-step window 233.3 vs 235.2 ms (-0.8%, not paired:
  to confirm), compile 12.6 vs 23.2 s (BENCHMARKS.md, "Session 16").
"""

from __future__ import annotations

import os

#: model family -> XLA flags (GPU only; harmless on CPU, where these options are unused)
FLAGS: dict[str, tuple[str, ...]] = {
    "gpt2": ("--xla_gpu_dot_merger_threshold_mb=0", "--xla_gpu_enable_triton_gemm=false"),
    "llama": ("--xla_gpu_dot_merger_threshold_mb=0", "--xla_gpu_enable_triton_gemm=false"),
}


def flags_for(cfg) -> tuple[str, ...]:
    """The family's measured flags plus DeepSpeed's bucket sizes as XLA combine thresholds (``jzero.mesh``) and
    ``overlap_comm`` as XLA's scheduler flags (``jzero.overlap``)."""
    from jzero.mesh import xla_flags_for
    from jzero.overlap import overlap_flags

    family = getattr(getattr(cfg, "model", None), "family", None)
    zero = getattr(cfg, "zero_optimization", None)
    if zero is None:
        return FLAGS.get(family, ())
    tensor = getattr(getattr(cfg, "mesh", None), "tensor", 1)
    return FLAGS.get(family, ()) + tuple(xla_flags_for(zero)) + overlap_flags(zero.overlap_comm, tensor)


def apply(cfg, env=os.environ) -> str:
    """Add the family's flags to ``env['XLA_FLAGS']`` (unless there already, or JZERO_XLA_FLAGS=0); return it.

    Under ``offload_optimizer`` it also sets ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` (unless set) to 80% of the
    machine's RAM: the GPU client's pinned-host allocator stops at 64 GB by default, which would cap offload at
    about 5B parameters (12 bytes each on the host). Not more than 80%: the allocator grows by doubling regions
    up to its limit, and a limit near the physical RAM got the process OOM-killed on the lent 125 GiB machine.
    """
    current = env.get("XLA_FLAGS", "")
    if env.get("JZERO_XLA_FLAGS", "1") == "0":
        return current
    zero = getattr(cfg, "zero_optimization", None)
    if zero is not None and zero.offload_optimizer.device != "none" and "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB" not in env:
        from jzero.offload import host_memory_limit_gb

        limit = host_memory_limit_gb()
        if limit:
            env["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = str(limit)
    have = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags_for(cfg) if f.split("=")[0] not in have]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env.get("XLA_FLAGS", "")
