"""Build the device mesh with named axes ``pipeline``, ``data``, ``tensor``.

Axis order puts ``tensor`` innermost (neighbouring devices, the fastest links) and ``pipeline`` outermost
(it tolerates the slowest links, e.g. across hosts), as Megatron and MaxText do. Axes are ``Auto`` so that
``with_sharding_constraint`` and ``shard_map`` over a subset of axes work (``jax.make_mesh`` defaults to
Explicit axes, which reject both).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jzero.config import MeshConfig, resolve_mesh_shape

AXES = ("pipeline", "data", "tensor")


def make_mesh(mesh_cfg: MeshConfig | dict | None = None, devices=None, hpz: int = 1) -> Mesh:
    """Mesh over ``devices`` (default: all, across processes) with sizes from the config (-1 = the rest).

    ``hpz`` > 1 (``zero_optimization.zero_hpz_partition_size``): the data axis is split into ``node`` x ``data``
    with ``hpz`` data ranks per node (:mod:`jzero.topology`; nodes honour process/slice boundaries).
    """
    if mesh_cfg is None:
        mesh_cfg = MeshConfig()
    elif isinstance(mesh_cfg, dict):
        from jzero.config import validate_section

        mesh_cfg = validate_section(MeshConfig, mesh_cfg, "mesh")
    elif not isinstance(mesh_cfg, MeshConfig):   # e.g. jax.make_mesh's shape tuple: an AttributeError deep inside
        from jzero.errors import ConfigError

        raise ConfigError(f"make_mesh: mesh_cfg={mesh_cfg!r} has type {type(mesh_cfg).__name__}; pass sizes by axis "
                          "name, e.g. {'data': 4, 'tensor': 2} (one may be -1), a config's .mesh, or None for all "
                          "devices on data")
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    if hpz > 1:
        from jzero.config import check_hpz
        from jzero.topology import HPZ_AXES, hybrid_device_array

        check_hpz(hpz, sizes["data"])
        arr = hybrid_device_array(devices, sizes["data"] // hpz, sizes["pipeline"], hpz, sizes["tensor"])
        return Mesh(arr, HPZ_AXES, axis_types=(AxisType.Auto,) * len(HPZ_AXES))
    shape = tuple(sizes[a] for a in AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def xla_flags_for(zero_cfg) -> list[str]:
    """XLA flags that carry DeepSpeed's bucket sizes: combine collectives up to that many bytes (GPU).

    DeepSpeed's ``reduce_bucket_size`` / ``allgather_bucket_size`` count elements (fp32 gradients: 4 bytes).
    XLA:CPU accepts and ignores the GPU flags, so they are safe to set everywhere.
    """
    flags = []
    if zero_cfg.reduce_bucket_size is not None:   # 0 (DeepSpeed: each gradient alone) = threshold 0, no combining
        b = int(zero_cfg.reduce_bucket_size) * 4
        flags += [f"--xla_gpu_all_reduce_combine_threshold_bytes={b}",
                  f"--xla_gpu_reduce_scatter_combine_threshold_bytes={b}"]
    if zero_cfg.allgather_bucket_size is not None:
        flags.append(f"--xla_gpu_all_gather_combine_threshold_bytes={int(zero_cfg.allgather_bucket_size) * 4}")
    return flags

