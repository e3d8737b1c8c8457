"""Scaling predictor: a config's step time, tokens/s and efficiency on N nodes x G GPUs, per ZeRO stage / 1-bit.

The model (one page, docs/plan.md): compile the config's train step on the local (fake) devices, read every
collective of the compiled HLO, attribute its bytes to the mesh axes its replica groups span, and scale them to
the target data-parallel size with the ring conventions of :func:`jzero.optim.comm.collective_ops`:

    t(N) = t_compute + t_comm(N) - min(overlap * t_compute, t_comm(N))
    t_comm(N) = sum over collectives c: trips_c * (factor(kind_c, n_c) * S_c / bw(c) + alpha(c) * ceil(log2 n_c))

S_c is the collective's full buffer (all-reduce / all-gather / all-to-all: result bytes; reduce-scatter: result x
group), which does not depend on the data size for data-axis collectives (a ZeRO-3 layer gather is the whole layer
at any N). n_c is the group at the target: the data axis grows to N / (tensor x pipeline), the other axes keep their
size. bw(c) is NVLink when the group stays in one node and InfiniBand (per GPU) when it spans nodes; trips_c is the
trip count of the while loops around it (a scanned layer's gather runs once per layer). t_compute is the measured
single-GPU step (weak scaling: the per-GPU micro-batch stays, tokens/s = N x tokens per GPU step / t).
Memory per device at N: XLA's temporaries at the compiled size plus every state leaf's bytes divided by its
shard count at N (sharded over data: divided by the target data size).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from jzero.optim.comm import _type_bytes

#: The configurations the planner compares: name -> overrides on the user's config. Data, so that new ones (the
#: hybrid-mesh hpZ / ZeRO++ qwZ / qgZ keys of the other half of issue 21) are one line each.
CANDIDATES: dict[str, list[str]] = {
    "zero0": ["zero_optimization.stage=0"],
    "zero1": ["zero_optimization.stage=1"],
    "zero2": ["zero_optimization.stage=2"],
    "zero3": ["zero_optimization.stage=3"],
    "onebit_adam": ["zero_optimization.stage=0", "optimizer.type=OneBitAdam"],
}

#: Measured single-GPU step (ms) of the shipped configs at their own batch (BENCHMARKS.md, session 5, one H200).
STEP_MS_1GPU: dict[str, float] = {"gpt2_124m": 30.56, "llama_1b": 240.14}

_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>all-reduce|all-gather|all-to-all|"
                         r"reduce-scatter|collective-permute)(?P<suffix>-start|-done)?\(")
_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
           "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
           "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the compiled step: kind, full buffer bytes S, the mesh axes its groups span, trips."""
    op: str
    full_bytes: float
    axes: tuple[str, ...]
    group: int
    trips: int


@dataclasses.dataclass(frozen=True)
class Links:
    """The link model: per-GPU bandwidths (GB/s, 1e9 bytes) and per-hop latencies (s)."""
    nvlink_GBps: float = 450.0
    ib_GBps: float = 50.0
    nvlink_alpha: float = 5e-6
    ib_alpha: float = 10e-6


# ------------------------------------------------------------------------------------------- HLO reading
def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of one collective line: explicit ``{{0,1},{2,3}}`` or iota ``[G,S]<=[dims]T(perm)``."""
    m = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", m[1])]
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if m:
        shape = [int(x) for x in m[1].split(",")]
        dims = [int(x) for x in m[2].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"source_target_pairs=\{([0-9,{} ]*)\}", line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m[1])]
    return [list(range(n_devices))]


def _trips(hlo_text: str) -> dict[str, int]:
    """Computation name -> how many times it runs per step (while bodies x their known trip counts, nested)."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            current = m[1]
            comps[current] = {"entry": line.startswith("ENTRY"), "whiles": []}
            continue
        if current and " while(" in line:
            body = re.search(r"body=%?([\w.\-]+)", line)
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if body:
                comps[current]["whiles"].append((body[1], int(n[1]) if n else 1))
    trips = {name: 1 for name in comps}
    order = [n for n, c in comps.items() if c["entry"]]
    seen = set()
    while order:
        name = order.pop()
        if name in seen:
            continue
        seen.add(name)
        for body, n in comps.get(name, {}).get("whiles", ()):
            trips[body] = trips[name] * n
            order.append(body)
    return trips


def collectives(hlo_text: str, mesh) -> list[Collective]:
    """Every collective of a compiled SPMD program, attributed to the axes of ``mesh`` its groups span.

    Partition id k is device ``mesh.devices.flat[k]``'s position, so its mesh coordinates are
    ``np.unravel_index(k, mesh.devices.shape)``; an axis is spanned when the coordinates along it differ within a
    group. Async pairs count once (the ``-start``, which carries the groups)."""
    shape, names = mesh.devices.shape, mesh.axis_names
    n_devices = int(np.prod(shape))
    trips = _trips(hlo_text)
    out, current = [], None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head[1]
            continue
        m = _COLLECTIVE.match(line)
        if not m or m["suffix"] == "-done":
            continue
        groups = replica_groups(line, n_devices)
        coords = np.array(np.unravel_index(np.asarray(groups[0]), shape))   # [axes, group]
        axes = tuple(a for a, c in zip(names, coords) if len(set(c.tolist())) > 1)
        n = len(groups[0])
        result = _type_bytes(m["type"])
        if m["suffix"] == "-start" and m["op"] == "all-gather":   # (operand, result): drop the 1/n operand
            result = result * n / (n + 1)
        full = result * n if m["op"] == "reduce-scatter" else result
        out.append(Collective(m["op"], full, axes, n, trips.get(current, 1)))
    return out


# ------------------------------------------------------------------------------------------------ model
def bytes_per_device(cols: list[Collective], sizes: dict[str, int]) -> dict[str, float]:
    """Bytes one device sends per step with the mesh axes at ``sizes``, per axis-set key ('data', 'tensor', ...)."""
    out: dict[str, float] = {}
    for c in cols:
        n = math.prod(sizes.get(a, 1) for a in c.axes) if c.axes else 1
        key = "+".join(c.axes) or "none"
        out[key] = out.get(key, 0.0) + c.trips * _FACTOR[c.op](max(n, 1)) * c.full_bytes
    return out


def comm_seconds(cols: list[Collective], sizes: dict[str, int], gpus_per_node: int, links: Links) -> float:
    """t_comm at the target mesh ``sizes`` (axis order pipeline, data, tensor; tensor innermost)."""
    order = ("pipeline", "data", "tensor")
    total = 0.0
    for c in cols:
        if not c.axes:
            continue
        n = math.prod(sizes.get(a, 1) for a in c.axes)
        if n <= 1:
            continue
        outer = min(order.index(a) for a in c.axes)   # a group spans the product of its axis and those inside it
        span = math.prod(sizes.get(a, 1) for a in order[outer:])
        cross = span > gpus_per_node
        bw = (links.ib_GBps if cross else links.nvlink_GBps) * 1e9
        alpha = links.ib_alpha if cross else links.nvlink_alpha
        total += c.trips * (_FACTOR[c.op](n) * c.full_bytes / bw + alpha * math.ceil(math.log2(n)))
    return total


def step_seconds(t_compute: float, t_comm: float, overlap: float) -> float:
    """Serial compute + communication, minus what overlaps (overlap 0: none, 1: all that compute can hide)."""
    return t_compute + t_comm - min(overlap * t_compute, t_comm)


@dataclasses.dataclass
class Profile:
    """What the planner keeps of one compiled candidate."""
    name: str
    cols: list[Collective]
    temp_bytes: int
    leaves: list[tuple[int, tuple[str, ...], bool]]   # (bytes at the compiled size, spec axes, per-rank leaf)
    compiled_sizes: dict[str, int]
    tokens_per_gpu_step: int


def memory_bytes(prof: Profile, sizes: dict[str, int]) -> float:
    """Per-device bytes at the target mesh: temporaries (as compiled) + each state leaf / its shard count."""
    total = float(prof.temp_bytes)
    for nbytes, axes, per_rank in prof.leaves:
        if per_rank:   # [data, ...] per-rank buffers (1-bit errors): one row per device at any data size
            total += nbytes / prof.compiled_sizes["data"]
            continue
        shards = math.prod(sizes.get(a, 1) for a in axes)
        total += nbytes / shards
    return total


def profile(cfg, name: str, mesh=None) -> Profile:
    """Compile ``cfg``'s train step on the local devices and keep its collectives, memory and state layout."""
    import jax

    import jzero
    from jzero.optim.onebit import is_onebit

    engine = jzero.initialize(cfg, mesh=mesh)
    rc, mesh = engine.config, engine.mesh
    lowered = engine.lower_train_step()
    if is_onebit(rc.optimizer.type):   # the step holds warm-up and compression; plan the compression stage
        lowered = _onebit_compressed(engine)
    compiled = lowered.compile()
    cols = collectives(compiled.as_text(), mesh)
    sizes = {a: int(s) for a, s in mesh.shape.items()}
    leaves = []
    for x in jax.tree.leaves(engine.state):
        spec = getattr(x.sharding, "spec", ())
        axes = tuple(a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part))
        per_rank = bool(is_onebit(rc.optimizer.type) and x.ndim and axes[:1] == ("data",)
                        and x.shape[0] == sizes["data"])
        leaves.append((int(x.size * x.dtype.itemsize), axes, per_rank))
    tokens = rc.train_micro_batch_size_per_gpu * rc.gradient_accumulation_steps * rc.data.seq_len
    return Profile(name, cols, int(compiled.memory_analysis().temp_size_in_bytes), leaves, sizes, tokens)


def _onebit_compressed(engine):
    """The 1-bit train step with the optimizer built for its compression stage only (``phase='compressed'``)."""
    import jax

    from jzero.optim.onebit import OneBit, build_onebit

    rc = engine.config
    tx = build_onebit(rc.optimizer.type, rc.optimizer.params, engine.schedule, data_size=engine.mesh.shape["data"],
                      gradient_clipping=rc.gradient_clipping, phase="compressed")
    strategy = OneBit.build(tx, engine.state.opt_state, engine.mesh, jax.numpy.float32, fp16=False)
    loss_fn = lambda p, b: engine.task.loss(engine.model.apply, p, b)  # noqa: E731
    fn = strategy.train_fn(loss_fn, None, engine.schedule, skip_nonfinite=False, context=None)
    return jax.jit(fn).lower(engine.state, engine.batch_spec())


def predict(prof: Profile, gpus: int, gpus_per_node: int, t_compute: float, links: Links,
            overlap: float = 0.0) -> dict[str, Any]:
    """Predicted step (s), tokens/s, weak-scaling efficiency and per-device memory of one candidate on ``gpus``."""
    other = prof.compiled_sizes.get("tensor", 1) * prof.compiled_sizes.get("pipeline", 1)
    if gpus % other:
        raise ValueError(f"{gpus} GPUs do not divide into tensor x pipeline = {other}")
    sizes = {**prof.compiled_sizes, "data": gpus // other}
    t_comm = comm_seconds(prof.cols, sizes, gpus_per_node, links)
    t = step_seconds(t_compute, t_comm, overlap)
    return {"gpus": gpus, "step_s": t, "comm_s": t_comm, "tokens_per_s": gpus * prof.tokens_per_gpu_step / t,
            "efficiency": t_compute / t, "memory_bytes": memory_bytes(prof, sizes)}


def gpu_counts(nodes: int, gpus_per_node: int) -> list[int]:
    """1, 2, 4, ... up to G on one node, then whole nodes 2, 4, ... up to ``nodes`` (and ``nodes`` itself)."""
    counts = [g for g in (2 ** i for i in range(11)) if g <= gpus_per_node]
    counts += [n * gpus_per_node for n in (2 ** i for i in range(1, 11)) if n <= nodes]
    if nodes * gpus_per_node not in counts:
        counts.append(nodes * gpus_per_node)
    return sorted(set(c for c in counts if c <= 1024))


# ------------------------------------------------------------------------------------------------ output
def batch_overrides(path, overrides: list[str], default: dict, n_devices: int) -> list[str]:
    """The config's per-GPU micro-batch and accumulation, with train_batch_size set for ``n_devices`` data ranks
    (a single-GPU config such as gpt2_124m.yaml names a global batch equal to its micro-batch)."""
    from jzero.config import load_config

    raw = load_config(path, overrides, base=None if path else default)
    other = raw.mesh.tensor * raw.mesh.pipeline if raw.mesh.tensor > 0 and raw.mesh.pipeline > 0 else 1
    micro = raw.train_micro_batch_size_per_gpu or raw.train_batch_size
    accum = raw.gradient_accumulation_steps or 1
    return list(overrides) + [f"train_batch_size={micro * accum * (n_devices // other)}",
                              f"train_micro_batch_size_per_gpu={micro}", f"gradient_accumulation_steps={accum}"]


def describe(prof: Profile) -> str:
    per_axis = bytes_per_device(prof.cols, prof.compiled_sizes)
    parts = [f"{k} {v / 1e6:.2f} MB" for k, v in sorted(per_axis.items()) if v]
    return (f"{len(prof.cols)} collectives, per device per step {', '.join(parts) or 'none'} "
            f"(mesh {prof.compiled_sizes})")


def table(profiles: dict[str, Profile], counts: list[int], gpus_per_node: int, t_compute: float, links: Links,
          overlap: float, mem_limit: float) -> str:
    """Markdown: one row per GPU count, step ms / tokens/s / efficiency per candidate, and the fastest that fits."""
    names = list(profiles)
    head = "| GPUs | " + " | ".join(f"{n}: step ms, tok/s, eff" for n in names) + " | fastest that fits |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for g in counts:
        cells, best = [], None
        for n in names:
            try:
                r = predict(profiles[n], g, gpus_per_node, t_compute, links, overlap)
            except ValueError:
                cells.append("n/a")
                continue
            fits = r["memory_bytes"] <= mem_limit
            cells.append(f"{r['step_s'] * 1e3:.1f}, {r['tokens_per_s']:,.0f}, {r['efficiency']:.0%}"
                         + ("" if fits else f" (OOM {r['memory_bytes'] / 2**30:.0f} GiB)"))
            if fits and (best is None or r["step_s"] < best[1]):
                best = (n, r["step_s"])
        lines.append(f"| {g} | " + " | ".join(cells) + f" | {best[0] if best else 'none fits'} |")
    return "\n".join(lines)
