"""A validated config made concrete for a device count: a -1 mesh axis filled, DeepSpeed's batch triple
(``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * data``: any two give the
third) and the optimizer parameters the run trains with. Re-exported by :mod:`jzero.config`.

    cfg = resolve(load_config("ds_config.json"), n_devices=jax.device_count())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jzero.errors import ConfigError

if TYPE_CHECKING:
    from jzero.config import JzeroConfig, MeshConfig


def check_hpz(hpz: int, data: int) -> None:
    """``zero_hpz_partition_size`` must split the data-parallel ranks into whole nodes."""
    if hpz > 1 and data % hpz:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz} does not divide mesh.data={data}; "
                          f"choose a partition size (ranks per node) that divides {data}")


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Fill a -1 axis and check that data*tensor*pipeline equals the device count."""
    sizes = {"data": mesh.data, "tensor": mesh.tensor, "pipeline": mesh.pipeline}
    known = 1
    for v in sizes.values():
        if v != -1:
            known *= v
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh: fixed axes multiply to {known}, which does not divide the {n_devices} devices; "
                              f"choose sizes whose product divides {n_devices}")
        sizes[free[0]] = n_devices // known
    elif known != n_devices:
        raise ConfigError(f"mesh: data*tensor*pipeline = {sizes['data']}*{sizes['tensor']}*{sizes['pipeline']} = {known} "
                          f"but there are {n_devices} devices; make the product {n_devices} or set one axis to -1")
    return sizes


def resolve_batch(cfg: JzeroConfig, dp: int) -> tuple[int, int, int]:
    """DeepSpeed's batch rule: train_batch_size = micro * accum * dp; any two determine the third."""
    tbs, micro, gas = cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    if tbs is not None and micro is not None and gas is not None:
        if tbs != micro * gas * dp:
            raise ConfigError(f"train_batch_size={tbs} != train_micro_batch_size_per_gpu ({micro}) * "
                              f"gradient_accumulation_steps ({gas}) * data-parallel size ({dp}) = {micro * gas * dp}; "
                              f"fix one of the three or drop one and let jzero derive it")
    elif tbs is not None and micro is not None:
        if tbs % (micro * dp):
            raise ConfigError(f"train_batch_size={tbs} is not divisible by train_micro_batch_size_per_gpu ({micro}) * "
                              f"data-parallel size ({dp}); make it a multiple of {micro * dp}")
        gas = tbs // (micro * dp)
    elif tbs is not None and gas is not None:
        if tbs % (gas * dp):
            raise ConfigError(f"train_batch_size={tbs} is not divisible by gradient_accumulation_steps ({gas}) * "
                              f"data-parallel size ({dp}); make it a multiple of {gas * dp}")
        micro = tbs // (gas * dp)
    elif micro is not None:
        gas = gas or 1
        tbs = micro * gas * dp
    elif tbs is not None:
        gas = 1
        if tbs % dp:
            raise ConfigError(f"train_batch_size={tbs} is not divisible by the data-parallel size ({dp}); "
                              f"make it a multiple of {dp}")
        micro = tbs // dp
    else:
        raise ConfigError("no batch size: set train_batch_size or train_micro_batch_size_per_gpu")
    return tbs, micro, gas


def resolve(cfg: JzeroConfig, n_devices: int) -> JzeroConfig:
    """Return a copy with the mesh sizes, the batch triple and every optimizer parameter the run trains with
    (:func:`jzero.optim.resolved_params`) filled in (what ``config.json`` records)."""
    from jzero.optim import resolved_params

    sizes = resolve_mesh_shape(cfg.mesh, n_devices)
    check_hpz(cfg.zero_optimization.zero_hpz_partition_size, sizes["data"])
    tbs, micro, gas = resolve_batch(cfg, sizes["data"])
    out = cfg.model_copy(deep=True)
    out.mesh = type(cfg.mesh)(**{**cfg.mesh.model_dump(), **sizes})
    out.train_batch_size, out.train_micro_batch_size_per_gpu, out.gradient_accumulation_steps = tbs, micro, gas
    out.optimizer.params = resolved_params(cfg.optimizer)
    return out
