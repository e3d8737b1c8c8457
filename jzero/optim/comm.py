"""Compressed (1-bit, error-feedback) all-reduce over a data-parallel axis, and HLO byte counting.

This is the communication half of DeepSpeed's 1-bit Adam / 0/1 Adam / 1-bit LAMB
(`deepspeed/runtime/comm/nccl.py: compressed_allreduce`), rebuilt on `jax.lax` collectives so that it
runs inside `jax.shard_map` (manual over the data axis) and XLA sees every byte it moves:

  worker: x += worker_error; scale = ||x||_2 / sqrt(numel); bits = x >= 0 (sign(0) = +1);
          worker_error = x - scale * sign(x); sign bits packed 8 per byte (uint8).
  phase 1: `all_to_all` of the packed bits (rank r receives chunk r from every rank) + `all_gather` of
          the worker scales; the server (each rank, for its chunk) averages sign_i * scale_i over ranks.
  server: y = avg + server_error; same compression of y (server scale over the chunk);
          server_error = y - scale * sign(y).
  phase 2: `all_gather` of the packed server bits and server scales; every rank unpacks the same result.

No collective ever adds packed bits (a psum of uint8 would be meaningless). Per rank the bytes sent are
~2 * numel / 8 (+ a few scales) against 2 * 4 * numel for a ring all-reduce of fp32: ~1/32.

Segments: a flat buffer may hold several tensors, each with its own worker/server scale, as DeepSpeed's
1-bit Adam compresses each parameter separately; here all segments travel in the same four collectives
(one all-to-all, three all-gathers) instead of four per tensor. Every segment's size is a multiple of
8 * n_ranks so that each rank's chunk of each segment is whole bytes. `FlatLayout` builds such buffers
from a pytree (one segment per tensor, or one fused segment as 1-bit LAMB does). A leaf stacked over layers
(``stacked``: its leading stacked dims) holds one tensor per layer, as DeepSpeed's per-layer params: each layer
is padded, scaled and chunked over the ranks on its own (a group of equal segments, ``(count, size)``, computed
batched: no per-layer ops or collectives). DeepSpeed pads each tensor
to a multiple of n * lcm(8, n); we pad to the smallest multiple of 8 * n, which is the same for n in
{1, 2, 4, 8} and smaller otherwise (the scale counts padded zeros in numel, so numbers differ slightly
from DeepSpeed's for other n).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------- layout
def padded_size(numel: int, n_ranks: int) -> int:
    """Smallest multiple of 8 * n_ranks that is >= numel (0 stays 0): every rank's chunk is whole bytes."""
    unit = 8 * n_ranks
    return -(-numel // unit) * unit


Segments = Sequence["int | tuple[int, int]"]


def segment_groups(segments: Segments) -> tuple[tuple[int, int], ...]:
    """Segments as ``(count, size)`` groups: an int is one segment, ``(count, size)`` count consecutive ones."""
    return tuple((1, int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1])) for s in segments)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of a pytree sits in one flat f32 buffer that `compressed_allreduce` can carry.

    fused=False: each non-empty tensor is padded to `padded_size` on its own and is its own segment (its own
    scale), as DeepSpeed's 1-bit Adam / 0/1 Adam. A leaf with ``stacked`` k > 0 leading dims (layers) is
    prod(shape[:k]) tensors of prod(shape[k:]) each, laid out one after another, each padded on its own (one
    ``(count, size)`` group of segments). fused=True: all leaves are concatenated, then padded once; one segment,
    as DeepSpeed's 1-bit LAMB (which first equalises the tensors' magnitudes; ``stacked`` is then ignored).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    n_ranks: int
    fused: bool
    stacked: tuple[int, ...] | None = None

    @classmethod
    def of(cls, tree, n_ranks: int, fused: bool = False, stacked_axes: Any = None) -> "FlatLayout":
        """stacked_axes: a pytree like ``tree`` of each leaf's leading stacked dims (None: all 0)."""
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        stacked = None
        if stacked_axes is not None and not fused:
            ks = tuple(int(k) for k in treedef.flatten_up_to(stacked_axes))
            for k, shape in zip(ks, shapes):
                if not 0 <= k <= len(shape):
                    raise ValueError(f"FlatLayout: {k} leading stacked axes for a leaf of shape {shape}")
            stacked = ks if any(ks) else None
        return cls(treedef, shapes, n_ranks, fused, stacked)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> tuple[tuple[int, int], ...]:
        """Per leaf (count, numel): how many tensors it holds (its layers) and the size of each."""
        ks = self.stacked or (0,) * len(self.shapes)
        return tuple((math.prod(s[:k]), math.prod(s[k:])) for s, k in zip(self.shapes, ks))

    @property
    def segments(self) -> tuple:
        """The compression segments in buffer order (empty tensors have none): the padded size of each unstacked
        leaf, ``(layers, padded size of one layer)`` for a stacked one (what `compressed_allreduce` takes)."""
        if self.fused:
            total = padded_size(sum(self.sizes), self.n_ranks)
            return (total,) if total else ()
        return tuple(padded_size(m, self.n_ranks) if c == 1 else (c, padded_size(m, self.n_ranks))
                     for c, m in self.tensors if c * m)

    @property
    def total(self) -> int:
        """Length of the flat buffer (and of worker_error)."""
        return sum(c * s for c, s in segment_groups(self.segments))

    @property
    def chunk(self) -> int:
        """Length of one rank's chunk (and of server_error)."""
        return self.total // self.n_ranks

    def flatten(self, tree) -> jax.Array:
        """Leaves -> f32[total], zero padded."""
        leaves = [jnp.ravel(x).astype(jnp.float32) for x in self.treedef.flatten_up_to(tree)]
        if self.fused:
            flat = jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)
            return jnp.pad(flat, (0, self.total - flat.shape[0]))
        parts = []
        for x, (c, m) in zip(leaves, self.tensors):
            if not c * m:
                continue
            pad = padded_size(m, self.n_ranks) - m
            parts.append(jnp.pad(x, (0, pad)) if c == 1 else jnp.pad(x.reshape(c, m), ((0, 0), (0, pad))).ravel())
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)

    def unflatten(self, flat: jax.Array) -> Any:
        """f32[total] -> leaves (f32, padding dropped)."""
        leaves, offset = [], 0
        for shape, size, (c, m) in zip(self.shapes, self.sizes, self.tensors):
            if self.fused or c == 1 or not size:
                leaves.append(flat[offset:offset + size].reshape(shape))
                offset += size if self.fused else padded_size(size, self.n_ranks)
            else:
                padded = padded_size(m, self.n_ranks)
                leaves.append(flat[offset:offset + c * padded].reshape(c, padded)[:, :m].reshape(shape))
                offset += c * padded
        return self.treedef.unflatten(leaves)


# ------------------------------------------------------------------------ compressed all-reduce
# Segments are (count, size) groups; a group of one segment takes the exact ops it always took (bit-identical
# results for unstacked layouts), a group of `count` equal segments (a stacked leaf's layers) the batched ones.
def _segment_scales(x: jax.Array, groups: Sequence[tuple[int, int]]) -> jax.Array:
    """f32[number of segments]: ||x_seg||_2 / sqrt(numel_seg) for consecutive segments of the flat x."""
    out, offset = [], 0
    for count, size in groups:
        if count == 1:
            seg = x[offset:offset + size]
            out.append(jnp.sqrt(jnp.sum(seg * seg))[None] / np.float32(math.sqrt(size)))
        else:
            seg = x[offset:offset + count * size].reshape(count, size)
            out.append(jnp.sqrt(jnp.sum(seg * seg, axis=1)) / np.float32(math.sqrt(size)))
        offset += count * size
    return jnp.concatenate(out)


def _expand(per_segment: jax.Array, groups: Sequence[tuple[int, int]]) -> jax.Array:
    """Repeat value j of the last axis (segment j) over its segment's size (static sizes, no index constants)."""
    lead = per_segment.shape[:-1]
    parts, j = [], 0
    for count, size in groups:
        if count == 1:
            parts.append(jnp.broadcast_to(per_segment[..., j:j + 1], lead + (size,)))
        else:
            parts.append(jnp.broadcast_to(per_segment[..., j:j + count, None], lead + (count, size))
                         .reshape(lead + (count * size,)))
        j += count
    return jnp.concatenate(parts, axis=-1)


def _to_rows(x: jax.Array, groups: Sequence[tuple[int, int]], n: int) -> jax.Array:
    """f32[S] -> [n, S / n]: row r holds chunk r of every segment, segments side by side (in buffer order)."""
    parts, offset = [], 0
    for count, size in groups:
        if count == 1:
            parts.append(x[offset:offset + size].reshape(n, size // n))
        else:
            parts.append(x[offset:offset + count * size].reshape(count, n, size // n).transpose(1, 0, 2)
                         .reshape(n, count * size // n))
        offset += count * size
    return jnp.concatenate(parts, axis=1)


def _from_rows(x_nC: jax.Array, groups: Sequence[tuple[int, int]], n: int) -> jax.Array:
    """Inverse of `_to_rows`."""
    parts, offset = [], 0
    for count, size in groups:
        width = count * size // n
        if count == 1:
            parts.append(x_nC[:, offset:offset + width].reshape(size))
        else:
            parts.append(x_nC[:, offset:offset + width].reshape(n, count, size // n).transpose(1, 0, 2)
                         .reshape(count * size))
        offset += width
    return jnp.concatenate(parts)


def _signs(bits: jax.Array) -> jax.Array:
    """uint8/bool bits -> +1 / -1 as f32."""
    return bits.astype(jnp.float32) * 2.0 - 1.0


def compressed_allreduce(x_flat: jax.Array, worker_error: jax.Array, server_error: jax.Array, axis_name: str,
                         segments: Segments | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """1-bit error-feedback average of x_flat over `axis_name`; call inside shard_map (manual over it).

    Args:
      x_flat: f32[S], this rank's values; S a multiple of 8 * n (see `padded_size` / `FlatLayout`).
      worker_error: f32[S], this rank's worker compression error from the previous call (zeros at first).
      server_error: f32[S / n], this rank's server error for the chunk it serves.
      segments: static, in buffer order: a size (one segment) or ``(count, size)`` (count consecutive segments
        of that size: a stacked leaf's layers); every size a multiple of 8 * n, all summing to S. Each segment
        has its own worker and server scales and is chunked over the ranks on its own (rank r serves chunk r
        of every segment), as DeepSpeed's compressed_allreduce of each tensor. None = one segment.
    Returns (avg f32[S], the same on every rank; new worker_error; new server_error).
    """
    n = jax.lax.axis_size(axis_name)
    size = x_flat.shape[0]
    groups = segment_groups(segments) if segments is not None else (((1, size),) if size else ())
    if x_flat.ndim != 1 or worker_error.shape != x_flat.shape or server_error.shape != (size // n,):
        raise ValueError(f"compressed_allreduce: want x f32[S], worker_error f32[S], server_error f32[S/{n}]; "
                         f"got {x_flat.shape}, {worker_error.shape}, {server_error.shape}")
    if sum(c * s for c, s in groups) != size or any(c <= 0 or s <= 0 or s % (8 * n) for c, s in groups):
        raise ValueError(f"compressed_allreduce: segments {tuple(segments or ())} must be positive multiples of "
                         f"8*{n} summing to {size}; pad with padded_size/FlatLayout")
    if size == 0:
        return x_flat, worker_error, server_error
    chunk_groups = tuple((c, s // n) for c, s in groups)

    # worker side: compress x + error, keep what the 1-bit code lost.
    x = x_flat.astype(jnp.float32) + worker_error
    bits = x >= 0
    worker_scale_L = _segment_scales(x, groups)
    new_worker_error = x - _expand(worker_scale_L, groups) * _signs(bits)
    packed_nB = jnp.packbits(_to_rows(bits, groups, n), axis=1)             # u8[n, S / (8n)]

    # phase 1: rank r gets chunk r of every rank's bits, and every rank's scales.
    recv_nB = jax.lax.all_to_all(packed_nB, axis_name, 0, 0, tiled=True)  # row i: from rank i
    worker_scales_nL = jax.lax.all_gather(worker_scale_L, axis_name)        # [n, L]
    recv_signs_nC = _signs(jnp.unpackbits(recv_nB, axis=1))
    avg_C = jnp.sum(recv_signs_nC * _expand(worker_scales_nL / n, chunk_groups), axis=0)

    # server side: compress this rank's chunk of the average plus its error.
    y = avg_C + server_error
    server_bits = y >= 0
    server_scale_L = _segment_scales(y, chunk_groups)
    new_server_error = y - _expand(server_scale_L, chunk_groups) * _signs(server_bits)

    # phase 2: everyone gets every rank's compressed chunk; the result is the same on every rank.
    all_bits_nB = jax.lax.all_gather(jnp.packbits(server_bits), axis_name, to="invarying")
    server_scales_nL = jax.lax.all_gather(server_scale_L, axis_name, to="invarying")
    out_nC = _signs(jnp.unpackbits(all_bits_nB, axis=1)) * _expand(server_scales_nL, chunk_groups)
    return _from_rows(out_nC, groups, n), new_worker_error, new_server_error


# --------------------------------------------------------------------------- HLO byte counting
_COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
# `%name = TYPE op(` for the synchronous ops and the `-done` half of async ones (whose result is final).
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
                    + "|".join(_COLLECTIVES) + r")(?P<done>-done)?\(")
_ARRAY_RE = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[(?P<dims>[0-9,]*)\]")


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The replica groups of one HLO collective: explicit ``{{0,1},{2,3}}``, iota ``[G,S]<=[dims]T(perm)``, or
    the mesh form ``replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}``."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                  r"\s*\{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'([\w]+)'=([0-9]+)", m[1])
        sizes = [int(v) for _, v in axes]
        ids = np.arange(int(np.prod(sizes)))
        if m[2]:
            dims = [int(x) for x in m[2].split(",")]
            ids = ids.reshape(dims)
            if m[3]:
                ids = ids.transpose([int(x) for x in m[3].split(",")])
        ids = ids.reshape(sizes)
        in_group = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m[4]]
        rest = [i for i in range(len(axes)) if i not in in_group]
        size = int(np.prod([sizes[i] for i in in_group]))
        return ids.transpose(rest + in_group).reshape(-1, size).tolist()
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
        return groups or [list(range(n_devices))]
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if m:
        shape = [int(x) for x in m[1].split(",")]
        dims = [int(x) for x in m[2].split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}", line)
    if m:
        return [[int(x) for x in g.split(",")] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
    return [list(range(n_devices))]


def _type_bytes(type_text: str) -> float:
    total = 0.0
    for m in _ARRAY_RE.finditer(type_text):
        dtype = m["dtype"]
        per = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if per is None:
            raise ValueError(f"collective_bytes: unknown HLO dtype {dtype!r} in {type_text!r}")
        dims = [int(d) for d in m["dims"].split(",") if d]
        total += per * math.prod(dims)
    return total


def _group_size(line: str, n_devices: int) -> int:
    if "replica_groups=mesh[" in line:   # jax 0.10's mesh form: parsed with the other forms in replica_groups
        return len(replica_groups(line, n_devices)[0])
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m[1].split(","))
    m = re.search(r"replica_groups=\[([0-9]+),([0-9]+)\]<=", line)  # iota form [groups, size]<=[...]
    if m:
        return int(m[2])
    return n_devices  # replica_groups={} means all devices


def loop_trips(hlo_text: str) -> dict[str, int]:
    """Computation name -> how many times one run of the program executes it: the product of the
    ``known_trip_count`` of every ``while`` whose body encloses it (1 outside loops; a loop of unknown trip count
    counts 1). A scanned layer's collective is one HLO op executed n_layer times: multiply by this."""
    calls: dict[str, list[tuple[str, int]]] = {}
    comp, entry = None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head:
            comp = head[2]
            entry = comp if head[1] else entry
            calls.setdefault(comp, [])
            continue
        if comp is None:
            continue
        trips = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"([0-9]+)"', line)
        for kind, name in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line):
            calls[comp].append((name, int(trips[1]) if kind == "body" and trips else 1))
        for names in re.findall(r"branch_computations=\{([^}]*)\}", line):
            calls[comp] += [(n.strip().lstrip("%"), 1) for n in names.split(",")[1:]]
    out: dict[str, int] = {}

    def visit(name: str, mult: int) -> None:
        out[name] = out.get(name, 0) + mult
        for child, k in calls.get(name, []):
            visit(child, mult * k)

    if entry is not None:
        visit(entry, 1)
    return out


def collective_ops(hlo_text: str) -> list[dict]:
    """Every collective in compiled HLO text (`jitted.lower(...).compile().as_text()`), one dict each:
    op (kind), result_bytes (sum over a tuple result), group (ranks taking part), dtypes, bytes_sent, and
    trips: how many times a step executes it (:func:`loop_trips`; the byte fields count one execution).

    bytes_sent is what one device sends under the usual algorithms (NCCL-tests' bus conventions):
    all-reduce 2(n-1)/n * B (ring = reduce-scatter + all-gather); all-gather (n-1)/n * result;
    all-to-all (n-1)/n * B; reduce-scatter (n-1) * result; collective-permute B. Async pairs are counted
    once, from the `-done` op (ops wrapped in async computations appear once in their body).
    """
    header = re.search(r"num_partitions=([0-9]+)", hlo_text)
    replicas = re.search(r"replica_count=([0-9]+)", hlo_text)
    n_devices = (int(header[1]) if header else 1) * (int(replicas[1]) if replicas else 1)
    # an async `-done` names its `-start`, which carries the replica groups
    start_groups = {m[1]: _group_size(m[0], n_devices)
                    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?-start\(.*$", hlo_text, re.M)}
    trips = loop_trips(hlo_text)
    ops, comp = [], None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head:
            comp = head[1]
            continue
        m = _OP_RE.match(line)
        if not m:
            continue
        op, type_text = m["op"], m["type"]
        result = _type_bytes(type_text)
        if op == "collective-permute":
            n = 1
        elif m["done"]:
            start = re.search(r"-done\(\s*%?([\w.\-]+)", line)
            n = start_groups.get(start[1], n_devices) if start else n_devices
        else:
            n = _group_size(line, n_devices)
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
                  "reduce-scatter": float(n - 1), "collective-permute": 1.0}[op]
        ops.append({"op": op, "result_bytes": int(result), "group": n, "bytes_sent": int(round(factor * result)),
                    "dtypes": sorted({a["dtype"] for a in _ARRAY_RE.finditer(type_text)}),
                    "trips": trips.get(comp, 1)})
    return ops


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes one device sends per collective kind in compiled HLO text, plus 'total' (see collective_ops)."""
    out = {op: 0 for op in _COLLECTIVES}
    for o in collective_ops(hlo_text):
        out[o["op"]] += o["bytes_sent"]
    out["total"] = sum(out[op] for op in _COLLECTIVES)
    return out


# ------------------------------------------------------------- per-rank state inside shard_map
def axis_size_checked(axis_name: str, data_size: int) -> int:
    """Size of `axis_name` in the enclosing shard_map; it must be the size the state was built for."""
    try:
        n = jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"1-bit optimizers run inside jax.shard_map over {axis_name!r} (manual over it); "
                         f"call update() there") from e
    if n != data_size:
        raise ValueError(f"optimizer state was built for data_size={data_size} but axis {axis_name!r} has {n} ranks")
    return n


def local_row(x: jax.Array) -> jax.Array:
    """A per-rank state leaf stored [D, ...] and sharded over data arrives as [1, ...]; drop that dim."""
    if x.shape[:1] != (1,):
        raise ValueError(f"per-rank optimizer state leaf of shape {x.shape} was not sharded over the data axis; "
                         f"give the state the shardings of jzero.optim.onebit.onebit_state_specs")
    return x[0]


def to_varying(tree, axis_name: str):
    """Mark every leaf as varying over axis_name (a no-op for leaves already varying, or with check_vma off).

    Needed where the two branches of a lax.cond must agree on which values differ per rank.
    """
    def cast(x):
        if axis_name in _varying_axes(x):
            return x
        try:
            return jax.lax.pcast(x, axis_name, to="varying")
        except ValueError:  # already varying, on a jax whose avals keep that elsewhere
            return x
    return jax.tree.map(cast, tree)


def _varying_axes(x) -> frozenset:
    """The manual axes x varies over (jax 0.10 keeps them in aval.mat.varying, earlier ones in aval.vma)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))
