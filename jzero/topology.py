"""Topology-aware data parallelism: ZeRO++ hpZ / PyTorch HSDP as a split of the ``data`` mesh axis.

With ``zero_optimization.zero_hpz_partition_size = k > 1`` the D data-parallel ranks form D/k "nodes" of k ranks.
The mesh gets an outer ``node`` axis (size D/k, the slow inter-node links) and the ``data`` axis shrinks to the
k ranks of one node (NVLink). Stated as data, nothing else changes:

    compute rules: ``batch`` -> ``("node", "data")`` (every rank still reads its own rows)
    storage rules: ZeRO adds ``data`` only (jzero.sharding.zero_spec), so ZeRO-3's params, gradients and
                   optimizer state are sharded within the node and replicated across nodes.

So a layer's weight gather is an all-gather inside the node, and a gradient reaches its storage layout as a
reduce over ``data`` inside the node plus an all-reduce of the 1/k shard over ``node`` (DeepSpeed ZeRO++'s hpZ
secondary partition, here used as the only partition: HSDP). Per step and device the inter-node traffic falls from
ZeRO-3's three full-model passes (two gathers, one reduce-scatter) to one all-reduce of a 1/k shard; the price is
per-device memory of 16 Psi / k instead of 16 Psi / D. :func:`inter_node_bytes` counts it from compiled HLO.

Device order: nodes are contiguous blocks of the device list. With several processes (or TPU slices) the mesh
comes from ``mesh_utils.create_hybrid_device_mesh`` with the process (slice) as the granule, so a node never spans
two processes; on one process (fake CPU devices) node i is devices ``[i*k*T*S, (i+1)*k*T*S)``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils

from jzero.errors import ConfigError
from jzero.optim import comm
from jzero.optim.comm import replica_groups  # noqa: F401  (re-exported: parsed with the other HLO forms)
from jzero.sharding import LogicalRules

NODE = "node"
#: Mesh axes with hpZ: ``node`` outermost so that one node is a contiguous block of devices.
HPZ_AXES = (NODE, "pipeline", "data", "tensor")


def hierarchical_rules(rules: LogicalRules) -> LogicalRules:
    """The compute rule table with the batch over ``node`` x ``data`` (the storage rule stays ``data``)."""
    return tuple((n, (NODE, "data")) if n == "batch" else (n, ax) for n, ax in rules)


def _granules(devices) -> list[int]:
    """Slice index (TPU multislice) or process index of each device: the units a node must not span."""
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        return [d.slice_index for d in devices]
    return [d.process_index for d in devices]


def hybrid_device_array(devices, nodes: int, pipeline: int, intra: int, tensor: int) -> np.ndarray:
    """Devices arranged ``[node, pipeline, data, tensor]``, nodes aligned with process/slice boundaries."""
    devices = list(devices)
    n_granules = len(set(_granules(devices)))
    if n_granules == 1:   # one process: fake or real single host; nodes are contiguous blocks
        return np.asarray(devices).reshape(nodes, pipeline, intra, tensor)
    if nodes % n_granules:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size: {nodes} nodes do not split over "
                          f"{n_granules} processes; choose a partition size whose node count is a multiple of "
                          f"{n_granules} (a node must not span processes)")
    return mesh_utils.create_hybrid_device_mesh(
        (nodes // n_granules, pipeline, intra, tensor), (n_granules, 1, 1, 1), devices,
        process_is_granule=not all(getattr(d, "slice_index", None) is not None for d in devices))


# --------------------------------------------------------------------------- HLO: which bytes cross nodes


def inter_node_bytes(hlo_text: str, devices_per_node: int, per_step: bool = False) -> dict[str, int]:
    """Bytes one device sends in collectives whose groups span nodes, by op kind, plus 'total'.

    A node is ``devices_per_node`` consecutive partition ids (the mesh's device order, node outermost). Bytes
    follow :func:`jzero.optim.comm.collective_ops` (ring conventions); a collective within nodes counts 0.
    ``per_step``: an op inside a loop body (a scanned layer's) counts once per trip; else once per HLO op.
    """
    header = re.search(r"num_partitions=([0-9]+)", hlo_text)
    n_devices = int(header[1]) if header else 1
    groups_of = {}
    for line in hlo_text.splitlines():
        m = comm._OP_RE.match(line) or re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?-start\(", line)
        if m:
            name = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)", line)[1]
            groups_of[name] = replica_groups(line, n_devices)
    out = {op: 0 for op in comm._COLLECTIVES}
    ops = iter(comm.collective_ops(hlo_text))
    for line in hlo_text.splitlines():
        m = comm._OP_RE.match(line)
        if not m:
            continue
        op = next(ops)
        if m["done"]:
            start = re.search(r"-done\(\s*%?([\w.\-]+)", line)
            groups = groups_of.get(start[1], [list(range(n_devices))]) if start else [list(range(n_devices))]
        else:
            groups = replica_groups(line, n_devices)
        if any(len({d // devices_per_node for d in g}) > 1 for g in groups):
            out[op["op"]] += op["bytes_sent"] * (op["trips"] if per_step else 1)
    out["total"] = sum(out[k] for k in comm._COLLECTIVES)
    return out


# --------------------------------------------------------------------------- the hierarchical gradient


def hierarchical_value_and_grad(loss_fn, mesh, flat_rules: LogicalRules, grad_shardings, weight_fn=None):
    """``(params, micro_batch) -> (loss, grads)`` whose gradient reduces intra-node first, then across nodes.

    The micro-batch rows (over ``node`` x ``data``) are viewed as ``[nodes, rows/nodes, ...]`` and the loss is
    ``vmap``-ed over nodes with ``spmd_axis_name='node'``: each node's gradient is a separate ``[nodes, ...]``
    slice, put in the storage layout plus ``node`` on the leading dim, so XLA reduces it over ``data`` only
    (inside the node). The mean over the leading dim is then an all-reduce over ``node`` of a 1/k shard. Without
    this XLA all-reduces the whole gradient over all D ranks (measured: group of 8 on 2 x 4) before slicing.
    Inside the vmap the model's ``constrain`` uses ``flat_rules`` (batch over ``data``): ``node`` is the vmap's.
    ``weight_fn`` (the task's ``weight``: the entries each node's loss averages over) weights the nodes' losses and
    gradients by their share, so a masked loss is the micro-batch's mean as under flat ZeRO-3 (the plain mean of
    node means weighted a node with few labelled tokens as much as one with many); None: equal weights.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jzero import sharding as shd

    nodes = mesh.shape[NODE]
    per_node = jax.tree.map(lambda s: NamedSharding(mesh, P(NODE, *s.spec)), grad_shardings)

    def one_node(params, rows):
        with shd.activate(mesh, flat_rules):
            return loss_fn(params, rows)

    vg = jax.vmap(jax.value_and_grad(one_node), in_axes=(None, 0), spmd_axis_name=NODE)

    def value_and_grad(params, micro_batch):
        def split(x):
            x = x.reshape((nodes, x.shape[0] // nodes) + x.shape[1:])
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(NODE, "data")))
        rows = jax.tree.map(split, micro_batch)
        loss_N, grads_N = vg(params, rows)
        grads_N = jax.tree.map(jax.lax.with_sharding_constraint, grads_N, per_node)
        if weight_fn is None:
            return loss_N.mean(), jax.tree.map(lambda g: g.mean(0), grads_N)
        w_N = jax.vmap(weight_fn)(rows).astype(jnp.float32)
        w_N = w_N / jnp.maximum(w_N.sum(), 1.0)     # no labelled entry anywhere: every node's loss is 0 already
        combine = lambda x: jnp.tensordot(w_N.astype(x.dtype), x, axes=1)  # noqa: E731
        return combine(loss_N), jax.tree.map(combine, grads_N)

    return value_and_grad
