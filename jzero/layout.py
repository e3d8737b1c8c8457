"""Where a run's arrays live: the device mesh and the logical-axis rules its step traces under.

:func:`build_layout` turns the config's ``mesh`` section (or a mesh and rules a library user passes to
``jzero.initialize``) into a :class:`Layout`, checked against the config: a pipeline (``mesh.pipeline > 1``) stores
the stacked ``layers`` dim over the ``pipeline`` axis, ZeRO++ hpZ shards within the node (a ``node`` axis), and
sequence parallelism shards the residual stream's length over ``tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from jzero import pipeline, topology
from jzero import sharding as shd
from jzero.config import JzeroConfig
from jzero.errors import ConfigError
from jzero.mesh import make_mesh


@dataclass(frozen=True)
class Layout:
    """The mesh and the logical rules the step traces under (the pipeline's and hpZ's rules applied)."""

    mesh: jax.sharding.Mesh
    rules: shd.LogicalRules          # storage/compute rules (hpZ: ZeRO over data within the node)
    flat_rules: shd.LogicalRules     # the rules before hpZ (its node-first gradient reduction needs them)
    run: pipeline.PipelineRun | None
    hpz: int


def build_layout(cfg: JzeroConfig, mesh=None, rules: shd.LogicalRules | None = None) -> Layout:
    """The run's :class:`Layout`: ``mesh`` (default: built from ``cfg.mesh``; a given one must have its sizes) and
    ``rules`` (default: the table ``mesh.sequence_parallel`` picks; given ones must agree with it), with the
    pipeline's and hpZ's rules applied."""
    if rules is not None:   # the table must agree with the config's mesh.sequence_parallel, which it overrides
        sp_rules = dict(rules).get("residual_length") == "tensor"
        if sp_rules != cfg.mesh.sequence_parallel:
            raise ConfigError(f"initialize: rules= map 'residual_length' to {dict(rules).get('residual_length')!r} "
                              f"but mesh.sequence_parallel={str(cfg.mesh.sequence_parallel).lower()}; pass rules "
                              f"that {'shard' if cfg.mesh.sequence_parallel else 'do not shard'} it over 'tensor' "
                              f"(jzero.sharding.rules_for(cfg.mesh) as a base), or leave rules= out")
    rules = rules if rules is not None else shd.rules_for(cfg.mesh)   # mesh.sequence_parallel picks the table
    spec = pipeline.spec_from_config(cfg)
    run = pipeline.PipelineRun(spec) if spec is not None else None
    if run is not None:
        rules = pipeline.pipeline_rules(rules)   # the stacked 'layers' dim stored over the pipeline axis
    hpz = cfg.zero_optimization.zero_hpz_partition_size
    flat_rules = rules
    if hpz > 1:   # ZeRO++ hpZ: batch over node x data, ZeRO over data (within the node)
        rules = topology.hierarchical_rules(rules)
    if mesh is None:
        mesh = make_mesh(cfg.mesh, hpz=hpz)
    else:
        _check_given_mesh(mesh, cfg)
    if hpz > 1 and "node" not in mesh.axis_names:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz}: the given mesh has no 'node' axis; "
                          "build it with jzero.mesh.make_mesh(cfg.mesh, hpz=...) or leave mesh out")
    return Layout(mesh=mesh, rules=rules, flat_rules=flat_rules, run=run, hpz=hpz)


def _check_given_mesh(mesh, cfg: JzeroConfig) -> None:
    """A mesh passed to :func:`initialize` must have the config's axis sizes (``node`` x ``data`` counting as the
    data axis under hpZ): a pipeline or tensor axis the config does not know of would be left unused (every
    device doing the same work) while the config reports another layout."""
    got = dict(mesh.shape)
    have = {"data": got.get("data", 1) * got.get("node", 1), "tensor": got.get("tensor", 1),
            "pipeline": got.get("pipeline", 1)}
    want = {"data": cfg.mesh.data, "tensor": cfg.mesh.tensor, "pipeline": cfg.mesh.pipeline}
    unknown = sorted(set(got) - {"data", "node", "tensor", "pipeline"})
    if unknown or have != want:
        sizes = ", ".join(f"{k}={v}" for k, v in got.items())
        raise ConfigError(f"the mesh given to initialize has {sizes} but the config's mesh is "
                          f"{', '.join(f'{k}={v}' for k, v in want.items())}"
                          f"{f' (jzero knows no axis {unknown[0]!r})' if unknown else ''}; set mesh.data/tensor/"
                          "pipeline to the mesh's sizes, or leave mesh out (jzero.mesh.make_mesh(cfg.mesh) builds it)")
