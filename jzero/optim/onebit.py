"""DeepSpeed's communication-compressed optimizers, OneBitAdam / ZeroOneAdam / OneBitLamb (and jzero's SignSGD,
the same compressed all-reduce from the first step), from config, and
what the engine needs to run them: the state's shardings, the params to differentiate at, and their step
(:class:`OneBit`: :func:`jzero.step.make_step` with :func:`onebit_grads`, all inside one ``shard_map``).

The transforms (onebit_adam.py, zero_one_adam.py, onebit_lamb.py) run their `update` inside a
`jax.shard_map` that is manual over the data axis and take each rank's LOCAL gradients; they average
gradients or momenta themselves (exactly during warm-up, 1-bit compressed after). The engine's train step:

    def step(params, opt_state, batch):             # inside jax.shard_map(..., axis_names={'data'})
        p_local = local_params(params, opt_state)    # varying over data: grads come back local, no psum
        grads = jax.grad(loss_fn)(p_local, batch)    # batch: this rank's rows
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

with in/out specs P() for params and `onebit_state_specs(opt_state)` for the state (per-rank buffers have a
leading data dimension, sharded over data; everything else replicated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero.errors import ConfigError
from jzero.precision import all_finite, unscale_grads
from jzero.step import OnDevice, StepGrads, TrainState, accumulate_grads, make_step, optax_update, scaled
from jzero.optim.comm import local_row
from jzero.optim.onebit_adam import OneBitAdamState, onebit_adam
from jzero.optim.onebit_lamb import OneBitLambState, onebit_lamb
from jzero.optim.schedules import ONE_CYCLE_BETA2
from jzero.optim.signsgd import SignSGDState, signsgd
from jzero.optim.zero_one_adam import ZeroOneAdamState, zero_one_adam

ONEBIT_TYPES = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb",
                "signsgd": "SignSGD"}
_STATES = (OneBitAdamState, ZeroOneAdamState, OneBitLambState, SignSGDState)

# DeepSpeed's config keys per optimizer (beyond lr, betas, eps, weight_decay, bias_correction and the
# compatibility keys below), mapped to our keyword names; defaults are DeepSpeed's.
_OWN_KEYS = {
    "OneBitAdam": {"freeze_step": 100000},
    "ZeroOneAdam": {"var_freeze_step": 100000, "var_update_scaler": 16, "local_step_scaler": 32678,
                    "local_step_clipper": 16},
    "OneBitLamb": {"freeze_step": 100000, "max_coeff": 10.0, "min_coeff": 0.01, "coeff_beta": 0.9,
                   "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1},
    "SignSGD": {"momentum": 0.9},
}
_COMMON_KEYS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True}
# SignSGD has no Adam moments: no betas / eps / bias_correction (jzero.optim.signsgd).
_SIGNSGD_COMMON = {"lr": 1e-3, "weight_decay": 0.0}
# Keys DeepSpeed accepts that have only one meaning here: the value that means it is allowed, anything else
# is an error naming why.
_FIXED_KEYS = {
    "comm_backend_name": ("nccl", "jzero's collectives are XLA's, which use NCCL on GPU; there is no MPI/HCCL "
                                  "backend"),
    "amsgrad": (False, "the 1-bit optimizers have no AMSGrad variant (neither has DeepSpeed)"),
    "eps_inside_sqrt": (False, "eps is added outside the square root"),
    "max_grad_norm": (0.0, "clip with the top-level gradient_clipping key instead"),
}


#: Keys DeepSpeed reads only for a backend jzero does not have: any true/false is accepted and changes nothing
#: (jzero.ds_keys names them in the no-effect line a run prints at start).
NO_EFFECT_KEYS = {"cuda_aware": "DeepSpeed reads it only for its MPI backend (CUDA-aware MPI); jzero's collectives "
                                "are XLA's (NCCL on GPU)"}


def is_onebit(optimizer_type: str) -> bool:
    """True for DeepSpeed's compressed-communication optimizer names (case-insensitive, as DeepSpeed)."""
    return optimizer_type.lower() in ONEBIT_TYPES


def unsupported(cfg) -> list[tuple[str, str]]:
    """``[(key, why)]`` of the config's combinations the 1-bit optimizers do not run (empty for other optimizers)."""
    if not is_onebit(cfg.optimizer.type):
        return []
    out: list[tuple[str, str]] = []
    if cfg.zero_optimization.stage >= 1:
        out.append(("zero_optimization.stage", f"{cfg.optimizer.type} needs every rank's whole momentum "
                    "(as DeepSpeed, it refuses ZeRO); use zero_optimization.stage=0"))
    if cfg.mesh.tensor not in (1, -1) or cfg.mesh.pipeline not in (1, -1):
        out.append(("mesh", f"{cfg.optimizer.type} runs data parallel only; set mesh.tensor=1 mesh.pipeline=1"))
    return out


def build_onebit(optimizer_type: str, params: Mapping[str, Any] | None, schedule=None, *, data_size: int,
                 gradient_clipping: float = 0.0, axis_name: str = "data", phase: str = "auto",
                 stacked_axes: Any = None, momentum=None) -> optax.GradientTransformation:
    """The optax transform for config `optimizer: {type, params}`; `schedule` (an optax schedule) replaces
    params.lr when given. data_size: the mesh's data axis size. gradient_clipping: the top-level key, applied
    inside the optimizer (to the exact average while there is one, else to local gradients, as DeepSpeed);
    do not chain another clip in front. phase: 'auto' (one program, stages picked by lax.cond), or
    'warmup' / 'compressed' for one stage only (OneBitAdam / OneBitLamb; see onebit_adam.py). stacked_axes: per
    param leaf, its leading layer-stacking dims (jzero.optim.layer_stacked_axes): OneBitAdam and ZeroOneAdam
    compress each layer as its own tensor (per-layer scales, as DeepSpeed's per-parameter compression), OneBitLamb
    keeps per-layer trust ratios (its all-reduce is fused); SignSGD ignores it. momentum: OneCycle's beta1
    schedule (:func:`jzero.optim.schedules.build_momentum_schedule`; None: no momentum cycling): as DeepSpeed's
    OneCycle rewrites the optimizer's ``betas`` to ``(momentum, 0.99)`` every step, it replaces params.betas of
    OneBitAdam / ZeroOneAdam / OneBitLamb (SignSGD has no betas: DeepSpeed's OneCycle then cycles nothing)."""
    key = optimizer_type.lower()
    if key not in ONEBIT_TYPES:
        raise ConfigError(f"optimizer.type: {optimizer_type!r} is not one of {sorted(ONEBIT_TYPES.values())}")
    name = ONEBIT_TYPES[key]
    given = dict(params or {})
    known = {**(_SIGNSGD_COMMON if name == "SignSGD" else _COMMON_KEYS), **_OWN_KEYS[name]}
    for k, v in given.items():
        if k in NO_EFFECT_KEYS:
            if not isinstance(v, bool):
                raise ConfigError(f"optimizer.params.{k}={v!r}: must be true or false")
        elif k in _FIXED_KEYS:
            allowed, why = _FIXED_KEYS[k]
            if v != allowed or isinstance(v, bool) != isinstance(allowed, bool):
                raise ConfigError(f"optimizer.params.{k}: only {allowed!r} is supported for {name}: {why}; "
                                  f"remove the key")
        elif k not in known:
            raise ConfigError(f"optimizer.params.{k}: unknown for {name}; known keys: "
                              f"{sorted(known) + sorted(_FIXED_KEYS) + sorted(NO_EFFECT_KEYS)}")
    cfg = {k: given.get(k, default) for k, default in known.items()}
    betas = cfg.pop("betas", (0.0, 0.0))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.params.betas: want [beta1, beta2] each in [0, 1), got {betas!r}")
    for k, default in known.items():
        if k == "betas" or k not in cfg:
            continue
        want = type(default)
        ok = isinstance(cfg[k], bool) if want is bool else (
            isinstance(cfg[k], int) and not isinstance(cfg[k], bool) and cfg[k] >= 1 if want is int else
            isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool) and cfg[k] >= 0)
        if not ok:
            kind = {bool: "true/false", int: "an integer >= 1"}.get(want, "a number >= 0")
            raise ConfigError(f"optimizer.params.{k}: want {kind}, got {cfg[k]!r}")
    lr = schedule if schedule is not None else float(cfg.pop("lr"))
    cfg.pop("lr", None)
    if isinstance(gradient_clipping, bool) or not isinstance(gradient_clipping, (int, float)) \
            or not gradient_clipping >= 0:
        raise ConfigError(f"gradient_clipping={gradient_clipping!r}: must be a number >= 0 (0 = no clipping)")
    if name == "SignSGD":
        if not cfg["momentum"] < 1:
            raise ConfigError(f"optimizer.params.momentum: want a number in [0, 1), got {cfg['momentum']!r}")
        if phase not in ("auto", "compressed"):
            raise ConfigError(f"SignSGD compresses from the first step (no warm-up): phase={phase!r} does not exist")
        return signsgd(lr, data_size=data_size, axis_name=axis_name, momentum=float(cfg["momentum"]),
                       weight_decay=float(cfg["weight_decay"]), gradient_clipping=float(gradient_clipping),
                       stacked_axes=stacked_axes)
    b1, b2 = (float(betas[0]), float(betas[1])) if momentum is None else (momentum, ONE_CYCLE_BETA2)
    common = dict(data_size=data_size, axis_name=axis_name, b1=b1, b2=b2, gradient_clipping=float(gradient_clipping))
    if name == "ZeroOneAdam":
        if phase != "auto":
            raise ConfigError(f"ZeroOneAdam switches stage every few steps and runs with phase='auto' only, "
                              f"got {phase!r}")
        return zero_one_adam(lr, **common, stacked_axes=stacked_axes, **cfg)
    if name == "OneBitLamb":
        return onebit_lamb(lr, **common, phase=phase, stacked_axes=stacked_axes, **cfg)
    return onebit_adam(lr, **common, phase=phase, stacked_axes=stacked_axes, **cfg)


def _find_states(opt_state) -> list:
    is_ours = lambda x: isinstance(x, _STATES)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_ours) if is_ours(x)]


def onebit_state_specs(opt_state, axis_name: str = "data"):
    """PartitionSpecs for every leaf of an optimizer state holding 1-bit states (anywhere, e.g. in a chain):
    per-rank buffers (leading dim = data size) P(axis_name), everything else P(). Use them as shard_map
    in/out specs, and as NamedSharding specs for the stored state."""
    def spec(x):
        if not isinstance(x, _STATES):
            return P()
        fields = {f: jax.tree.map(lambda _: P(axis_name) if f in x.per_rank_fields else P(), getattr(x, f))
                  for f in x._fields}
        return type(x)(**fields)
    return jax.tree.map(spec, opt_state, is_leaf=lambda x: isinstance(x, _STATES))


def local_params(params, opt_state, axis_name: str = "data"):
    """The params this rank differentiates at, inside the shard_map: marked varying over data, so that
    jax.grad returns this rank's local gradient rather than inserting a psum; for ZeroOneAdam, plus this
    rank's un-synced local moves (momentum_accumulator) during its local-step stage."""
    states = _find_states(opt_state)
    if len(states) != 1:
        raise ValueError(f"local_params: expected one 1-bit optimizer state in opt_state, found {len(states)}")
    params = jax.tree.map(lambda p: jax.lax.pcast(p, axis_name, to="varying"), params)
    if isinstance(states[0], ZeroOneAdamState):
        return jax.tree.map(lambda p, u: (p + local_row(u)).astype(p.dtype), params,
                            states[0].momentum_accumulator)
    return params


def onebit_grads(loss_fn, accum_dtype, *, fp16: bool = False, skip_nonfinite: bool = False):
    """The grads piece of the 1-bit step, traced inside a ``shard_map`` manual over ``data``: each rank
    differentiates at its own rows (``gradient_accumulation_steps`` micro-batches scanned, as the other
    optimizers) and keeps its LOCAL gradient, which the optimizer averages exactly in warm-up and by the
    packed-bit compressed all-reduce after ``freeze_step``. Its metrics: the loss averaged over ranks, and
    ``grad_norm_local`` = the root-mean-square over ranks of each rank's local gradient norm (the norm of the
    averaged gradient would need the full all-reduce the compression exists to avoid).

    ``fp16``: the loss is multiplied by the loss scale before the backward pass and the local gradients divided
    by it before the optimizer sees them (DeepSpeed's fp16 wrapper around its 1-bit optimizers).
    ``skip_nonfinite``: the step is skipped on every rank when ANY rank's gradient is not finite (a ``pmin`` of
    the flag over ``data``: the ranks' params, momenta and error buffers must stay identical)."""
    def grads_fn(state, batch) -> StepGrads:
        ls = state.loss_scale
        p_local = local_params(state.params, state.opt_state)
        loss, grads = accumulate_grads(scaled(loss_fn, ls, fp16), p_local, batch, None, accum_dtype)
        if fp16:
            grads, loss = unscale_grads(grads, ls, jnp.float32), loss / ls.scale
        finite = jax.lax.pmin(all_finite(grads).astype(jnp.int32), "data") > 0 if skip_nonfinite else None
        norm2 = jax.lax.pmean(jnp.square(optax.tree.norm(grads)), "data")
        return StepGrads(loss=jax.lax.pmean(loss, "data"), grads=grads, finite=finite,
                         metrics={"grad_norm_local": jnp.sqrt(norm2)})
    return grads_fn


@dataclass
class OneBit(OnDevice):
    """The 1-bit optimizers' strategy: params replicated, per-rank error buffers over ``data``
    (:func:`onebit_state_specs`), and the whole :func:`jzero.step.make_step` step inside one ``shard_map`` manual
    over ``data`` (so the optimizer's compressed all-reduce runs on local gradients)."""

    mesh: Any = None
    opt_specs: Any = None
    accum_dtype: Any = jnp.float32

    @classmethod
    def build(cls, tx, abstract_opt, mesh, accum_dtype, fp16: bool) -> "OneBit":
        specs = onebit_state_specs(abstract_opt)
        shardings = jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs, is_leaf=lambda x: isinstance(x, P))
        return cls(tx=tx, opt_shardings=shardings, fp16=fp16, mesh=mesh, opt_specs=specs, accum_dtype=accum_dtype)

    def train_fn(self, loss_fn, grads_of, schedule, *, skip_nonfinite: bool, context):
        """``grads_of`` is not used: the micro-batch scan runs per rank inside the map (no layouts to put)."""
        step = make_step(onebit_grads(loss_fn, self.accum_dtype, fp16=self.fp16, skip_nonfinite=skip_nonfinite),
                         optax_update(self.tx), schedule, skip_nonfinite=skip_nonfinite)

        specs = TrainState(step=P(), params=P(), opt_state=self.opt_specs, loss_scale=P())   # P(): replicated
        return jax.shard_map(step, mesh=self.mesh, in_specs=(specs, P(None, "data")), out_specs=(specs, P()),
                             axis_names={"data"}, check_vma=True)


def communication_report(optimizer_type: str, opt_params: Mapping[str, Any] | None, abstract_params, mesh,
                         gradient_clipping: float = 0.0, stacked_axes: Any = None) -> dict[str, Any]:
    """Bytes one device sends per optimizer step, counted from compiled HLO (:func:`jzero.optim.comm.collective_bytes`,
    ring conventions), for the model's real parameter shapes on ``mesh``'s ``data`` axis:

    ``fp32_allreduce`` (what an exact fp32 gradient all-reduce moves), ``warmup`` and ``compression`` (the
    optimizer's two stages compiled apart; ZeroOneAdam runs one program holding all its stages, reported as
    ``one_program``), and ``compression_vs_fp32`` (the fraction). What train.pretrain writes to summary.json.
    ``stacked_axes``: as :func:`build_onebit` (per-layer scales of stacked leaves: a few more scale bytes).
    """
    from jzero.optim.comm import collective_bytes

    n = mesh.shape["data"]
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, jnp.float32), shapes)
    rep = jax.tree.map(lambda _: P(), shapes)
    per_rank = jax.tree.map(lambda _: P("data"), shapes)

    def total(fn, in_specs, out_specs, *args) -> int:
        f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={"data"}))
        return collective_bytes(f.lower(*args).compile().as_text())["total"]

    def optimizer_bytes(phase: str) -> int:
        tx = build_onebit(optimizer_type, opt_params, data_size=n, gradient_clipping=gradient_clipping, phase=phase,
                          stacked_axes=stacked_axes)
        state = jax.eval_shape(tx.init, shapes)
        specs = onebit_state_specs(state)

        def body(p, s, g):
            updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
            return optax.apply_updates(p, updates), s

        return total(body, (rep, specs, per_rank), (rep, specs), shapes, state, grads)

    exact = total(lambda g: jax.lax.pmean(jax.tree.map(lambda x: x[0], g), "data"), (per_rank,), rep, grads)
    report: dict[str, Any] = {"data_parallel": n, "fp32_allreduce": exact}
    if optimizer_type.lower() == "zerooneadam":
        report["one_program"] = optimizer_bytes("auto")
    elif optimizer_type.lower() == "signsgd":   # one stage: compressed from the first step
        report["compression"] = optimizer_bytes("compressed")
        report["compression_vs_fp32"] = report["compression"] / exact if exact else None
    else:
        report["warmup"] = optimizer_bytes("warmup")
        report["compression"] = optimizer_bytes("compressed")
        report["compression_vs_fp32"] = report["compression"] / exact if exact else None
    return report
