"""ZeRO-Offload: fp32 master weights and optimizer state in pinned host memory, streamed through the device.

DeepSpeed's ``zero_optimization.offload_optimizer: {device: cpu}``. Without it every parameter costs the device
16 bytes under mixed-precision Adam (fp32 master 4 + fp32 gradient 4 + moments 8). With it the device holds
only what the forward/backward needs:

    device, per parameter:  compute-dtype weights (2 B in bf16)  + gradient in that dtype (2 B)
                            [+ the fp32 accumulator (4 B) under gradient accumulation]
    host (pinned), per parameter:  fp32 master (4 B) + optimizer state (Adam: m, v, 8 B)

Host arrays are ordinary ``jax.Array`` s whose sharding has ``memory_kind="pinned_host"`` (ZeRO's ``data``
partitioning is kept: each device's shard sits in its own host's memory). The update runs chunk by chunk, one
chunk being one parameter leaf or one layer of a scanned (``'layers'``-stacked) leaf: a small jitted program
moves the chunk's master and moments to the device, applies the optax update there, writes the new
compute-dtype weights into the device params in place (donated buffer, ``dynamic_update_slice``) and moves the
new master and moments back to pinned host memory. So at most one chunk of optimizer state is on the device at
a time, and no host synchronisation happens anywhere in the step (calls are dispatched asynchronously).

Why the update runs on the device and not on the host CPU (DeepSpeed's CPU Adam): a JAX program cannot
compute on ``pinned_host`` buffers on GPU except through experimental host-compute annotations; the device does
the arithmetic at HBM speed, and the price is the PCIe traffic of the state (24 bytes per parameter per step).

Gradient clipping and fp16 overflow skipping need the *global* gradient, so they are decided on the device in
the gradient program (:func:`offload_grads`, the grads piece of :func:`jzero.step.make_step`) and handed to
every chunk as two scalars (a multiplier and an ``ok`` flag). Only element-wise optimizers (Adam, AdamW) are
exact chunk by chunk; others are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero.optim import clip_coefficient, global_norm
from jzero.precision import all_finite, scale_loss
from jzero.step import StepGrads, TrainState, make_step

HOST = "pinned_host"
OFFLOADABLE_OPTIMIZERS = ("Adam", "AdamW")


def offloaded(cfg) -> bool:
    """Does the (validated) config put the optimizer state in host memory?"""
    return cfg.zero_optimization.offload_optimizer.device == "cpu"


def unsupported(cfg) -> list[tuple[str, str]]:
    """``[(key, why)]`` of the config's combinations optimizer offload does not run (empty when it is off)."""
    out: list[tuple[str, str]] = []
    if cfg.zero_optimization.offload_optimizer.device == "none":
        return out
    key = "zero_optimization.offload_optimizer.device"
    if cfg.zero_optimization.stage == 0:
        out.append((key, "optimizer offload partitions like ZeRO (DeepSpeed: valid with stage 1, 2 and "
                    "3); set zero_optimization.stage to 1, 2 or 3"))
    if cfg.optimizer.type.lower() not in {o.lower() for o in OFFLOADABLE_OPTIMIZERS}:   # as DeepSpeed
        out.append((key, f"offloading {cfg.optimizer.type} is not implemented (the chunked host update "
                    f"is exact only for element-wise optimizers: {', '.join(OFFLOADABLE_OPTIMIZERS)})"))
    if cfg.mesh.pipeline not in (1, -1):
        out.append((key, "optimizer offload with mesh.pipeline > 1 is not implemented; set mesh.pipeline=1"))
    return out


@struct.dataclass
class OffloadedOptState:
    """The train state's ``opt_state`` under offload: one entry per chunk, all in pinned host memory."""

    master: list      # fp32 master weights of each chunk
    inner: list       # the optax state of each chunk (Adam: count, mu, nu)


@dataclass(frozen=True)
class Chunk:
    leaf: int                 # index into the flattened params
    layer: int | None         # index along the stacked 'layers' dim, or None for the whole leaf
    path: str                 # dotted name of the leaf (for checkpoints and export)


def plan_chunks(abstract_params, param_names) -> list[Chunk]:
    """One chunk per leaf; leaves stacked on a leading ``'layers'`` dim split into one chunk per layer."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    names = jax.tree.leaves(param_names, is_leaf=is_names)
    paths = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    chunks = []
    for i, (leaf, nm) in enumerate(zip(jax.tree.leaves(abstract_params), names)):
        if nm and nm[0] == "layers" and len(leaf.shape) > 1:
            chunks += [Chunk(i, l, paths[i]) for l in range(leaf.shape[0])]
        else:
            chunks.append(Chunk(i, None, paths[i]))
    return chunks


def _drop_first(sharding: NamedSharding) -> NamedSharding:
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
        raise ValueError(f"a 'layers'-stacked leaf is split over {spec[0]} on its layer dim; offload needs the layer "
                         "dim unsplit (no pipeline axis)")
    return NamedSharding(sharding.mesh, P(*spec[1:]))


@dataclass
class OptimizerOffload:
    """The chunked host-offloaded optimizer of one engine: shardings per chunk and the jitted chunk updates."""

    tx: optax.GradientTransformation
    chunks: list[Chunk]
    treedef: Any
    dev_shardings: list            # per leaf: the device params' layout (the plan's storage layout)
    state_shardings: list          # per chunk: the master's layout on the device (ZeRO layout, layer dim dropped)
    dtype: Any                     # device params' dtype (the compute dtype)
    leaf_shapes: list              # per leaf: the full shape
    where: list                    # per chunk: "pinned_host", or "device" for the part a ratio < 1 keeps
    max_norm: float = 0.0          # gradient_clipping (applied through every chunk's multiplier; 0 = off)
    _fns: dict = field(default_factory=dict, repr=False)
    _layers: list = field(default_factory=list, repr=False)   # per chunk: its layer index, on the device once

    @classmethod
    def build(cls, tx, plan, abstract_params, dtype, ratio: float = 1.0, max_norm: float = 0.0) -> "OptimizerOffload":
        chunks = plan_chunks(abstract_params, plan.param_names)
        dev = jax.tree.leaves(plan.param_storage)
        target = plan.zero if plan.zero_stage >= 1 else plan.param_compute
        zero = jax.tree.leaves(target)
        state = [zero[c.leaf] if c.layer is None else _drop_first(zero[c.leaf]) for c in chunks]
        shapes = [x.shape for x in jax.tree.leaves(abstract_params)]
        sizes = [math.prod(shapes[c.leaf][0 if c.layer is None else 1:]) for c in chunks]
        return cls(tx=tx, chunks=chunks, treedef=jax.tree.structure(abstract_params), dev_shardings=dev,
                   state_shardings=state, dtype=dtype, leaf_shapes=shapes, where=split_by_ratio(sizes, ratio),
                   max_norm=max_norm)

    # ---- layouts
    def _inner_shardings(self, c: int, abstract_inner, where: str):
        """Param-shaped leaves of chunk ``c``'s optax state follow its master; counts etc. are replicated."""
        s = self.state_shardings[c]
        shape = self._chunk_shape(c)
        rep = NamedSharding(s.mesh, P())
        return jax.tree.map(lambda a: (s if a.shape == shape else rep).with_memory_kind(where), abstract_inner)

    def _chunk_shape(self, c: int):
        ch = self.chunks[c]
        return self.leaf_shapes[ch.leaf] if ch.layer is None else self.leaf_shapes[ch.leaf][1:]

    # ---- init
    def init(self, params_fp32) -> tuple[Any, OffloadedOptState, OffloadedOptState]:
        """From fp32 params on the device: (device params in the compute dtype, host state, its shardings)."""
        leaves = jax.tree.leaves(params_fp32)
        masters, inners, inner_shardings = [], [], []
        jits: dict = {}   # one compiled init per distinct (chunk shape, layout)
        for c, ch in enumerate(self.chunks):
            x = leaves[ch.leaf] if ch.layer is None else leaves[ch.leaf][ch.layer]
            x = jax.device_put(x, self.state_shardings[c])
            abstract = jax.eval_shape(self.tx.init, x)
            inner_sh = self._inner_shardings(c, abstract, self.where[c])
            masters.append(jax.device_put(x, self.state_shardings[c].with_memory_kind(self.where[c])))
            key = ("init", x.shape, self.state_shardings[c], self.where[c])
            if key not in jits:
                jits[key] = jax.jit(self.tx.init, out_shardings=inner_sh)
            inners.append(jits[key](x))
            inner_shardings.append(inner_sh)
        dev = []
        for x, s in zip(leaves, self.dev_shardings):
            key = ("cast", x.shape, s)
            if key not in jits:
                jits[key] = jax.jit(lambda p: p.astype(self.dtype), out_shardings=s)
            dev.append(jits[key](x))
        state = OffloadedOptState(master=masters, inner=inners)
        shardings = OffloadedOptState(master=[s.with_memory_kind(w) for s, w in zip(self.state_shardings, self.where)],
                                      inner=inner_shardings)
        return jax.tree.unflatten(self.treedef, dev), state, shardings

    # ---- the update
    def _fn(self, c: int, inner) -> Callable:
        ch = self.chunks[c]
        dev_s, st_s = self.dev_shardings[ch.leaf], self.state_shardings[c]
        home = self.where[c]
        key = (self.leaf_shapes[ch.leaf], ch.layer is None, dev_s, st_s, home)
        if key in self._fns:
            return self._fns[key]
        tx, dtype = self.tx, self.dtype
        inner_dev = self._inner_shardings(c, inner, "device")
        inner_host = self._inner_shardings(c, inner, home)

        def update(dev_leaf, grad_leaf, layer, master, inner, mult, ok):
            g = grad_leaf if ch.layer is None else jax.lax.dynamic_index_in_dim(grad_leaf, layer, keepdims=False)
            g = g.astype(jnp.float32) * mult
            m = jax.device_put(master, st_s)
            st = jax.device_put(inner, inner_dev)
            upd, st2 = tx.update(g, st, m)
            m2 = optax.apply_updates(m, upd)
            m2, st2 = jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), (m2, st2), (m, st))
            w = m2.astype(dtype)
            dev_leaf = w if ch.layer is None else jax.lax.dynamic_update_index_in_dim(dev_leaf, w, layer, 0)
            return dev_leaf, jax.device_put(m2, st_s.with_memory_kind(home)), jax.device_put(st2, inner_host)

        fn = jax.jit(update, donate_argnums=(0, 3, 4),
                     out_shardings=(dev_s, st_s.with_memory_kind(home), inner_host))
        self._fns[key] = fn
        return fn

    def apply(self, params, grads, state: OffloadedOptState, mult, ok) -> tuple[Any, OffloadedOptState]:
        """All chunks' updates, in order; the device params are updated in place (donated)."""
        dev = jax.tree.leaves(params)
        g = jax.tree.leaves(grads)
        last = {ch.leaf: c for c, ch in enumerate(self.chunks)}
        masters, inners = list(state.master), list(state.inner)
        if not self._layers:
            self._layers = [jnp.int32(0 if ch.layer is None else ch.layer) for ch in self.chunks]
        # XLA:CPU's in-process collectives can deadlock with many multi-device chunk programs in flight on a small
        # thread pool (seen on 2 cores with 8 fake devices: an all-gather's rendezvous stuck until XLA aborted the
        # process); there, run the chunks one at a time. GPUs keep the whole loop asynchronous.
        one_at_a_time = jax.default_backend() == "cpu" and jax.device_count() > 1
        for c, ch in enumerate(self.chunks):
            fn = self._fn(c, inners[c])
            dev[ch.leaf], masters[c], inners[c] = fn(dev[ch.leaf], g[ch.leaf], self._layers[c], masters[c], inners[c],
                                                     mult, ok)
            if one_at_a_time:
                jax.block_until_ready(masters[c])
            if last[ch.leaf] == c:
                g[ch.leaf] = None      # this leaf's gradient can be freed
        return jax.tree.unflatten(self.treedef, dev), OffloadedOptState(master=masters, inner=inners)

    # ---- the strategy interface the engine calls (jzero.step.OnDevice is the on-device one)
    offloaded = True
    params_are_masters = False   # the device params are compute-dtype copies; the fp32 masters are host chunks

    def train_fn(self, loss_fn: Callable, grads_of: Callable, schedule: Callable, *, skip_nonfinite: bool,
                 context) -> Callable:
        """The device half of a step: ``(state, batch) -> (grads, mult, ok, loss_scale, step, metrics)``;
        :meth:`run` applies the update after it."""
        step = make_step(offload_grads(loss_fn, grads_of, self.max_norm, skip_nonfinite), None, schedule,
                         skip_nonfinite=skip_nonfinite, context=context, with_grads=True)

        def device(state, batch):
            new, metrics, (grads, mult, ok) = step(state, batch)
            return grads, mult, ok, new.loss_scale, new.step, metrics

        return device

    def jit(self, train_fn: Callable, state_shardings, plan):
        rep = plan.replicated
        return jax.jit(train_fn, out_shardings=(plan.grad, rep, rep, state_shardings.loss_scale, rep, rep))

    def run(self, compiled, state, batch):
        """One step: the device program, then every chunk's update (no host synchronisation)."""
        grads, mult, ok, loss_scale, step, metrics = compiled(state, batch)
        params, opt_state = self.apply(state.params, grads, state.opt_state, mult, ok)
        return TrainState(step=step, params=params, opt_state=opt_state, loss_scale=loss_scale), metrics

    def masters(self, state, param_storage):
        """The fp32 masters re-stacked and placed like the device params (``param_storage``)."""
        return jax.tree.map(lambda x, s: jax.device_put(x, s), self.master_params(state.opt_state), param_storage)

    def with_params(self, state, params_fp32):
        """``state`` with masters and device copies rebuilt from fp32 ``params`` (moments start fresh, as
        DeepSpeed's load_module_only)."""
        dev, opt_state, _ = self.init(params_fp32)
        return state.replace(params=dev, opt_state=opt_state)

    def copies(self, params):
        """No separate weight copies: the device params are already the compute-dtype copies."""
        return None

    def refresh(self, state):
        """``state`` as restored (nothing is derived from the masters outside the optimizer state)."""
        return state

    def checkpoint_meta(self) -> dict:
        """Which (param path, layer) each host master chunk holds: what :func:`restack_masters` needs to rebuild
        the params from a checkpoint (export, load_module_only)."""
        return {"chunks": [[c.path, c.layer] for c in self.chunks]}

    def master_params(self, state: OffloadedOptState):
        """The fp32 master weights as one params pytree of host numpy arrays (stacked leaves re-stacked)."""
        flat = restack_masters([[c.path, c.layer] for c in self.chunks], jax.device_get(list(state.master)))
        path_of = {c.leaf: c.path for c in self.chunks}
        return jax.tree.unflatten(self.treedef, [flat[path_of[i]] for i in range(len(self.leaf_shapes))])


def offload_grads(loss_fn: Callable, grads_of: Callable, max_norm: float, skip_nonfinite: bool) -> Callable:
    """The grads piece of an offloaded step (:func:`jzero.step.make_step` with no update piece: the update is
    :meth:`OptimizerOffload.apply`'s chunk programs after the device program). Its ``grads`` are
    ``(grads, mult, ok)``: the gradient in the params' (compute) dtype, still loss-scaled under fp16;
    ``mult`` = clip coefficient / loss scale and ``ok`` (no inf/nan, or always true without skipping), what every
    chunk update applies: clipping and overflow need the global gradient, so they are decided here, once.
    """
    def grads_fn(state, batch) -> StepGrads:
        ls = state.loss_scale
        loss, grads = grads_of(lambda p, b: scale_loss(loss_fn(p, b), ls), state.params, batch)
        norm = global_norm(grads) / ls.scale
        ok = all_finite(grads) if skip_nonfinite else jnp.asarray(True)
        mult = clip_coefficient(norm, max_norm) / ls.scale
        return StepGrads(loss=loss / ls.scale, grads=(grads, mult, ok), finite=ok, metrics={"grad_norm": norm})

    return grads_fn


def split_by_ratio(sizes: list[int], ratio: float) -> list[str]:
    """Home of each chunk: the first chunks, up to ``ratio`` of all parameters, to pinned host; the rest stay on
    the device (DeepSpeed's ``offload_optimizer.ratio``). A chunk goes to host if the host share before it is
    still under the target, so ratio 1.0 offloads everything and any ratio > 0 offloads at least one chunk."""
    total, done, out = sum(sizes), 0, []
    for n in sizes:
        out.append(HOST if done < ratio * total else "device")
        done += n if out[-1] == HOST else 0
    return out


def host_memory_limit_gb(fraction: float = 0.8) -> int | None:
    """``fraction`` of this machine's RAM in GB (for XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB), or None if unknown."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction / 1e9)
    except (ValueError, OSError, AttributeError):
        return None


def restack_masters(chunk_paths: list, masters: list) -> dict[str, Any]:
    """``{dotted leaf path: fp32 array}`` from a checkpoint's chunk list (``[[path, layer|None], ...]``) and its
    master arrays in the same order: how export rebuilds the params of an offloaded run."""
    import numpy as np

    parts: dict[str, list] = {}
    for (path, layer), arr in zip(chunk_paths, masters):
        parts.setdefault(path, []).append((layer, np.asarray(arr)))
    out = {}
    for path, p in parts.items():
        out[path] = p[0][1] if p[0][0] is None else np.stack([a for _, a in sorted(p, key=lambda t: t[0])])
    return out
