"""Multi-process runs on JAX's own distributed runtime (coordination service; NCCL/gloo collectives via XLA)."""

from __future__ import annotations


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when flags are given; return whether it ran.

    (Environment auto-detection for SLURM/Open MPI is added with the multi-process issue.)
    """
    if coordinator is None and num_processes is None and process_id is None:
        return False
    import jax

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
