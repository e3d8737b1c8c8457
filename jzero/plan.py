"""Scaling predictor: a config's step time, tokens/s and efficiency on N nodes x G GPUs, per candidate (ZeRO
stages, ZeRO++ hpZ / qwZ / qgZ, 1-bit Adam).

The model (one page, docs/plan.md): compile each candidate's train step on the local (fake) devices, read every
collective of the compiled HLO, attribute its bytes to the mesh axes its replica groups span, and scale them to
the target mesh with the ring conventions of :func:`jzero.optim.comm.collective_ops`:

    t(N) = t_compute + t_comm(N) - min(overlap * t_compute, t_comm(N))
    t_comm(N) = sum over collectives c: trips_c * (factor(kind_c, n_c) * S_c / bw(c) + alpha(c) * ceil(log2 n_c))

S_c is the collective's full buffer (all-reduce / all-gather / all-to-all: result bytes; reduce-scatter: result x
group), which does not depend on the data size for data-axis collectives (a ZeRO-3 layer gather is the whole layer
at any N). n_c is the group at the target (:func:`target_sizes`): without hpZ the data axis grows to
N / (tensor x pipeline); with hpZ (a ``node`` axis) node = N / G and data = G / (tensor x pipeline), and a
collective over ``node`` alone moves ZeRO storage sharded over ``data`` (hpZ's gradient shard), so its S_c scales
by compiled data / target data. bw(c) is NVLink when the group stays in one node and InfiniBand (per GPU) when it
spans nodes; trips_c is the trip count of the while loops around it (a scanned layer's gather runs once per
layer). t_compute is the measured single-GPU step t_1 (the whole model, the config's micro-batch) shared by the
T x P GPUs of one tensor x pipeline group, idle for the pipeline's bubble: t_1 / (T P (1 - bubble)); weak scaling:
each data rank's micro-batch stays, tokens/s = data ranks x tokens per data rank's step / t. Memory per device at
N: XLA's temporaries at the compiled size plus every state leaf's bytes divided by its shard count at N.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from jzero.optim.comm import _type_bytes, loop_trips
from jzero.topology import NODE, replica_groups  # noqa: F401  (replica_groups: the one HLO group parser)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration the planner compares: overrides on the user's config, and the config key it needs.

    ``{per_node}`` in an override is the compiled data ranks / 2, so hpZ compiles as 2 nodes (8 fake devices:
    2 x 4) and is scaled to partition = GPUs per node at the target. A candidate whose key the schema lacks is
    not built in this tree: the planner prints so and leaves it out of the table."""
    overrides: tuple[str, ...]
    needs: str | None = None

    def built(self) -> bool:
        from jzero.config import JzeroConfig

        model = JzeroConfig
        for part in self.needs.split(".") if self.needs else ():
            field = getattr(model, "model_fields", {}).get(part)
            if field is None:
                return False
            model = field.annotation
        return True

    def resolved(self, data_ranks: int) -> list[str]:
        if any("{per_node}" in o for o in self.overrides) and (data_ranks < 2 or data_ranks % 2):
            from jzero.errors import ConfigError

            raise ConfigError(f"{self.needs}: compiling hpZ as 2 nodes needs an even number of data ranks on the "
                              f"fake devices, got {data_ranks}; change --fake-devices or mesh.tensor/pipeline")
        return [o.format(per_node=data_ranks // 2) for o in self.overrides]


_Z3 = "zero_optimization.stage=3"
#: The configurations the planner compares, as data: a new one (qgZ once its key exists) is one entry.
CANDIDATES: dict[str, Candidate] = {
    "zero0": Candidate(("zero_optimization.stage=0",)),
    "zero1": Candidate(("zero_optimization.stage=1",)),
    "zero2": Candidate(("zero_optimization.stage=2",)),
    "zero3": Candidate((_Z3,)),
    "hpz": Candidate((_Z3, "zero_optimization.zero_hpz_partition_size={per_node}"),
                     "zero_optimization.zero_hpz_partition_size"),
    "qwz": Candidate((_Z3, "zero_optimization.zero_quantized_weights=true"),
                     "zero_optimization.zero_quantized_weights"),
    "qgz": Candidate((_Z3, "zero_optimization.zero_quantized_gradients=true"),
                     "zero_optimization.zero_quantized_gradients"),
    "onebit_adam": Candidate(("zero_optimization.stage=0", "optimizer.type=OneBitAdam")),
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
def collectives(hlo_text: str, mesh) -> list[Collective]:
    """Every collective of a compiled SPMD program, attributed to the axes of ``mesh`` its groups span.

    Partition id k is device ``mesh.devices.flat[k]``'s position, so its mesh coordinates are
    ``np.unravel_index(k, mesh.devices.shape)``; an axis is spanned when the coordinates along it differ within a
    group. Async pairs count once (the ``-start``, which carries the groups)."""
    shape, names = mesh.devices.shape, mesh.axis_names
    n_devices = int(np.prod(shape))
    trips = loop_trips(hlo_text)   # computation -> executions per step (a scanned layer: n_layer)
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
#: Mesh axes outermost first (jzero.topology.HPZ_AXES; without hpZ there is no ``node``): a group spans the
#: devices of its outermost axis and every axis inside it.
ORDER = (NODE, "pipeline", "data", "tensor")


def target_sizes(compiled: dict[str, int], gpus: int, gpus_per_node: int) -> dict[str, int]:
    """The mesh at ``gpus`` GPUs: tensor and pipeline as compiled; without a ``node`` axis data = gpus / (tensor x
    pipeline); with one (hpZ, partition = GPUs per node) node = gpus / G (1 inside one node) and data = the rest."""
    other = compiled.get("tensor", 1) * compiled.get("pipeline", 1)
    if gpus % other:
        raise ValueError(f"{gpus} GPUs do not divide into tensor x pipeline = {other}")
    if NODE not in compiled:
        return {**compiled, "data": gpus // other}
    nodes = gpus // gpus_per_node if gpus > gpus_per_node else 1
    if (gpus > gpus_per_node and gpus % gpus_per_node) or gpus % (nodes * other):
        raise ValueError(f"hpZ: {gpus} GPUs are not whole nodes of {gpus_per_node} x tensor x pipeline = {other}")
    return {**compiled, NODE: nodes, "data": gpus // nodes // other}


def full_bytes_at(c: Collective, sizes: dict[str, int], compiled: dict[str, int] | None) -> float:
    """S_c at the target: as compiled, except a collective over ``node`` but not ``data`` (hpZ's all-reduce of a
    gradient shard stored over ``data``), whose buffer is 1/data of the leaf: x compiled data / target data."""
    if compiled and NODE in c.axes and "data" not in c.axes and "data" in compiled:
        return c.full_bytes * compiled["data"] / sizes["data"]
    return c.full_bytes


def _group(c: Collective, sizes: dict[str, int]) -> int:
    return math.prod(sizes.get(a, 1) for a in c.axes) if c.axes else 1


def bytes_per_device(cols: list[Collective], sizes: dict[str, int], compiled: dict[str, int] | None = None,
                     trips: bool = True) -> dict[str, float]:
    """Bytes one device sends per step with the mesh axes at ``sizes`` (``compiled``: the sizes the program was
    compiled at, None when they are ``sizes``), per axis-set key ('data', 'node', 'data+tensor', ...).
    ``trips=False`` counts a loop body once, as :func:`jzero.optim.comm.collective_bytes` does."""
    out: dict[str, float] = {}
    for c in cols:
        key = "+".join(c.axes) or "none"
        out[key] = out.get(key, 0.0) + ((c.trips if trips else 1) * _FACTOR[c.op](max(_group(c, sizes), 1))
                                        * full_bytes_at(c, sizes, compiled))
    return out


def crosses_nodes(c: Collective, sizes: dict[str, int], gpus_per_node: int) -> bool:
    """Whether ``c``'s group spans more than one node: the devices of its outermost axis and those inside it."""
    outer = min(ORDER.index(a) for a in c.axes)
    return math.prod(sizes.get(a, 1) for a in ORDER[outer:]) > gpus_per_node


def comm_seconds(cols: list[Collective], sizes: dict[str, int], gpus_per_node: int, links: Links,
                 compiled: dict[str, int] | None = None) -> float:
    """t_comm at the target mesh ``sizes`` (NVLink inside a node, InfiniBand across, :func:`crosses_nodes`)."""
    total = 0.0
    for c in cols:
        n = _group(c, sizes)
        if n <= 1:
            continue
        cross = crosses_nodes(c, sizes, gpus_per_node)
        bw = (links.ib_GBps if cross else links.nvlink_GBps) * 1e9
        alpha = links.ib_alpha if cross else links.nvlink_alpha
        total += c.trips * (_FACTOR[c.op](n) * full_bytes_at(c, sizes, compiled) / bw
                            + alpha * math.ceil(math.log2(n)))
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
    tokens_per_rank_step: int    # tokens one data rank (one tensor x pipeline group) trains on per step
    bubble: float = 0.0          # the pipeline's idle share (S-1)/(R*M+S-1); 0 without a pipeline


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


def compile_step(cfg, mesh=None):
    """``(engine, compiled train step)`` of ``cfg`` on the local devices (1-bit: its compression stage). The engine
    is abstract: nothing is allocated, so a model too big for this host's memory plans as well as a small one."""
    import jzero
    from jzero.optim.onebit import is_onebit

    engine = jzero.initialize(cfg, mesh=mesh, abstract=True)
    lowered = engine.lower_train_step()
    if is_onebit(engine.config.optimizer.type):   # the step holds warm-up and compression; plan the compression
        lowered = _onebit_compressed(engine)
    return engine, lowered.compile()


def profile_of(engine, compiled, name: str) -> Profile:
    """What the planner keeps of a compiled step: its collectives, temporaries and the state's layout."""
    import jax

    from jzero.optim.onebit import is_onebit

    rc, mesh = engine.config, engine.mesh
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
    bubble = engine.pipeline.spec.bubble if engine.pipeline is not None else 0.0
    return Profile(name, cols, int(compiled.memory_analysis().temp_size_in_bytes), leaves, sizes, tokens, bubble)


def profile(cfg, name: str, mesh=None) -> Profile:
    """Compile ``cfg``'s train step on the local devices and keep its collectives, memory and state layout."""
    return profile_of(*compile_step(cfg, mesh), name)


def _onebit_compressed(engine):
    """The 1-bit train step with the optimizer built for its compression stage only (``phase='compressed'``)."""
    import jax

    from jzero.optim import layer_stacked_axes
    from jzero.optim.onebit import OneBit, build_onebit

    rc = engine.config
    tx = build_onebit(rc.optimizer.type, rc.optimizer.params, engine.schedule, data_size=engine.mesh.shape["data"],
                      gradient_clipping=rc.gradient_clipping, phase="compressed",
                      stacked_axes=layer_stacked_axes(engine.plan.param_names))
    strategy = OneBit.build(tx, engine.state.opt_state, engine.mesh, jax.numpy.float32, fp16=False)
    loss_fn = lambda p, b: engine.task.loss(engine.model.apply, p, b)  # noqa: E731
    fn = strategy.train_fn(loss_fn, None, engine.schedule, skip_nonfinite=False, context=None)
    return jax.jit(fn).lower(engine.state, engine.batch_spec())


def predict(prof: Profile, gpus: int, gpus_per_node: int, t_compute: float, links: Links,
            overlap: float = 0.0) -> dict[str, Any]:
    """Predicted step (s), tokens/s, weak-scaling efficiency, per-device memory and bytes of a candidate on ``gpus``.

    ``t_compute`` is the single-GPU step t_1; the T x P GPUs of a tensor x pipeline group share it and idle for the
    bubble, and only the data ranks (gpus / (T P)) train on batches of their own. Efficiency is tokens/s over
    ``gpus`` x the single GPU's (tokens per rank's step / t_1): t_1 / (T P t), 1 for perfect linear scaling."""
    sizes = target_sizes(prof.compiled_sizes, gpus, gpus_per_node)
    group = sizes.get("tensor", 1) * sizes.get("pipeline", 1)
    t_comm = comm_seconds(prof.cols, sizes, gpus_per_node, links, prof.compiled_sizes)
    t = step_seconds(t_compute / group / (1.0 - prof.bubble), t_comm, overlap)
    return {"gpus": gpus, "sizes": sizes, "step_s": t, "comm_s": t_comm,
            "tokens_per_s": gpus // group * prof.tokens_per_rank_step / t, "efficiency": t_compute / (group * t),
            "memory_bytes": memory_bytes(prof, sizes),
            "bytes": bytes_per_device(prof.cols, sizes, prof.compiled_sizes)}


def gpu_counts(nodes: int, gpus_per_node: int) -> list[int]:
    """1, 2, 4, ... up to G on one node, then whole nodes 2, 4, ... up to ``nodes`` (and ``nodes`` itself)."""
    counts = [g for g in (2 ** i for i in range(11)) if g <= gpus_per_node] + [gpus_per_node]
    counts += [n * gpus_per_node for n in (2 ** i for i in range(1, 11)) if n <= nodes]
    if nodes * gpus_per_node not in counts:
        counts.append(nodes * gpus_per_node)
    return sorted(set(c for c in counts if c <= 1024))


# ------------------------------------------------------------------------------------------------ output
def _batch(path, overrides: list[str], default: dict) -> tuple[int, int, int]:
    """(micro-batch per GPU, accumulation steps, tensor x pipeline) of the user's config."""
    from jzero.config import load_config

    raw = load_config(path, overrides, base=None if path else default)
    other = raw.mesh.tensor * raw.mesh.pipeline if raw.mesh.tensor > 0 and raw.mesh.pipeline > 0 else 1
    return raw.train_micro_batch_size_per_gpu or raw.train_batch_size, raw.gradient_accumulation_steps or 1, other


def batch_overrides(path, overrides: list[str], default: dict, n_devices: int) -> list[str]:
    """The config's per-GPU micro-batch and accumulation, with train_batch_size set for ``n_devices`` data ranks
    (a single-GPU config such as gpt2_124m.yaml names a global batch equal to its micro-batch)."""
    micro, accum, other = _batch(path, overrides, default)
    return list(overrides) + [f"train_batch_size={micro * accum * (n_devices // other)}",
                              f"train_micro_batch_size_per_gpu={micro}", f"gradient_accumulation_steps={accum}"]


def candidate_overrides(path, overrides: list[str], default: dict, n_devices: int, cand: Candidate) -> list[str]:
    """:func:`batch_overrides` + the candidate's overrides for the ``n_devices`` / (tensor x pipeline) data ranks."""
    return batch_overrides(path, overrides, default, n_devices) + cand.resolved(n_devices // _batch(
        path, overrides, default)[2])


def describe(prof: Profile) -> str:
    """One line: the collectives, bytes per device per step by axis (loop trips counted), and the loop-free total
    (each loop body once: what :func:`jzero.optim.comm.collective_bytes` counts on the same program)."""
    per_axis = bytes_per_device(prof.cols, prof.compiled_sizes)
    once = sum(bytes_per_device(prof.cols, prof.compiled_sizes, trips=False).values())
    parts = [f"{k} {v / 1e6:.2f} MB" for k, v in sorted(per_axis.items()) if v]
    return (f"{len(prof.cols)} collectives, per device per step {', '.join(parts) or 'none'} "
            f"(loop bodies once: {once:,.0f} bytes; mesh {prof.compiled_sizes})")


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
