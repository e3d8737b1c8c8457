"""FLOP counting and MFU: the analytic GPT formula, XLA's own count, a scan-aware jaxpr count, peak FLOP/s.

Three counts of one training step, because each is wrong in its own way:

- analytic, `gpt_train_flops_per_token` = 6N + 12 L T d per token (PaLM appendix B; nanoGPT's
  ``estimate_mfu``). 6N: every weight is used in one multiply-add (2 FLOPs) in the forward pass and two in the
  backward pass (input and weight gradients). 12 L T d: per layer the attention scores QK^T and the weighted
  sum AV each cost 2 T d FLOPs per token forward (over the full T; the causal mask is not discounted), times 3
  for forward + backward. N excludes the position embedding (a lookup, no matmul) and includes the token
  embedding once, as the LM head's matmul: tied (GPT-2, Llama-1B) that is the one table; untied (Llama-2-7B) the
  input table is a lookup and only the head counts (`matmul_params`). Softmax, norms, activations and the optimizer update are
  left out. MFU uses this count: it is what the model needs, not what the compiler happens to run (remat).
- XLA, `xla_flops`: ``compiled.cost_analysis()['flops']``, the per-device FLOPs of the partitioned program,
  including remat recomputation and elementwise work. Caveat, checked on jax 0.10.2 CPU: a ``while`` loop
  (``lax.scan``, ``nn.scan`` over layers, a micro-batch loop) has its body counted ONCE, not times its trip
  count, so a scanned model reads low by about the number of layers. `hlo_while_loops` says when that applies.
- jaxpr, `jaxpr_matmul_flops`: the dot_general FLOPs of the traced (global, unpartitioned) program, with scan
  bodies multiplied by their length and ``shard_map`` bodies by the number of shards. Matmuls only.

Peak numbers are NVIDIA's dense (no 2:4 sparsity) datasheet values per GPU; float32 means TF32 tensor cores,
which XLA uses for f32 matmuls at default precision on Ampere and later.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np

# (substring of device.device_kind lowercased, {dtype: dense peak FLOP/s}); first match wins, so the more
# specific names come first. None = a known card whose numbers are not tabulated: MFU is reported as null
# rather than computed against the wrong peak.
_PEAKS: tuple[tuple[str, Optional[dict]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("h100 nvl", None),
    ("h200 nvl", None),   # a lower-clocked PCIe card (NVIDIA lists ~835 dense bf16 TFLOP/s), not the SXM row below
    ("gh200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}),
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
)

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "tf32": "float32"}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    else:
        name = np.dtype(dtype).name
    if name not in ("bfloat16", "float16", "float32"):
        from jzero.errors import ConfigError

        raise ConfigError(f"no peak FLOP/s table for compute dtype {dtype!r}; use bfloat16, float16 or float32")
    return name


def gpt_train_flops_per_token(n_params_no_pos_emb: int, n_layer: int, seq_len: int, d_model: int) -> float:
    """Training FLOPs per token of a GPT: ``6 N + 12 L T d`` (forward + backward; see the module docstring)."""
    return 6.0 * n_params_no_pos_emb + 12.0 * n_layer * seq_len * d_model


def matmul_params(model_config) -> int:
    """N of `gpt_train_flops_per_token`: the parameters a token is multiplied by, ``n_params(include_pos=False)``
    less an untied input embedding (``tie_embeddings=False``: a lookup; the LM head's own table is the matmul).
    Counting both tables put 6 V d FLOPs a token that no matmul runs into MFU (Llama-2-7B: +1.8%)."""
    n = model_config.n_params(include_pos=False)
    if getattr(model_config, "tie_embeddings", True) is False:
        n -= model_config.vocab_size * model_config.d_model
    return n


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int,
        peak_flops_per_device: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation as a fraction (0.4 = 40%); None when the peak is unknown (CPU, untabulated GPU)."""
    if peak_flops_per_device is None or peak_flops_per_device <= 0:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)


def matmul_dtype(cfg) -> str:
    """The dtype a config's matmuls run in, which picks the peak of MFU: bf16 or fp16 when enabled (the model
    computes in it; fp16 is not the fp32 peak just because the masters are fp32), else float32."""
    return "bfloat16" if cfg.bf16.enabled else "float16" if cfg.fp16.enabled else "float32"


def peak_flops(device, dtype="bfloat16") -> Optional[float]:
    """Dense peak FLOP/s of one device for matmuls in ``dtype``; None on CPU or for an untabulated card."""
    name = _dtype_name(dtype)
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, table in _PEAKS:
        if key in kind:
            return None if table is None else table[name]
    return None


def xla_flops(compiled) -> Optional[float]:
    """``flops`` from ``compiled.cost_analysis()`` (per device), or None where the backend gives none.

    Older jax returned a list with one dict per HLO module, newer a dict; both are handled (a list is summed).
    Loop bodies are counted once: see the module docstring and `hlo_while_loops`.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends raise "not implemented"
        return None
    if cost is None:
        return None
    entries = [cost] if isinstance(cost, dict) else list(cost)
    values = [float(e["flops"]) for e in entries if e and "flops" in e]
    if not values or any(v < 0 for v in values):
        return None
    return sum(values)


def hlo_while_loops(compiled) -> int:
    """How many ``while`` ops the compiled program has (each makes `xla_flops` count its body only once)."""
    text = compiled.as_text()
    return sum(1 for line in text.splitlines() if " while(" in line)


def hlo_library_calls(compiled) -> int:
    """How many ``custom-call`` ops the compiled program has: on GPU the cuBLAS GEMMs, cuDNN attention and jzero's
    kernels are custom calls, whose FLOPs `xla_flops` does not count (GPT-2 124M on an H200: 6.5 GFLOP of 14 TFLOP)."""
    return sum(1 for line in compiled.as_text().splitlines() if " custom-call(" in line)


# ------------------------------------------------------------------------------------------------------------
# jaxpr matmul count
# ------------------------------------------------------------------------------------------------------------
def _subjaxprs(params: dict):
    for v in params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for item in items:
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _shard_count(params: dict) -> int:
    mesh = params.get("mesh")
    if mesh is None:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)
    manual = params.get("newly_manual_axes", params.get("manual_axes", params.get("axis_names")))
    if manual is None:
        manual = set(sizes) - set(params.get("auto", ()))
    return math.prod(sizes[a] for a in manual)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_shape = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)
            continue
        subs = list(_subjaxprs(eqn.params))
        if not subs:
            continue
        if name == "cond":
            total += max(_jaxpr_flops(j) for j in subs)
            continue
        inner = sum(_jaxpr_flops(j) for j in subs)
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "shard_map":
            inner *= _shard_count(eqn.params)
        total += inner  # while: trip count unknown, body counted once
    return total


def jaxpr_matmul_flops(fn: Callable, *args, **kwargs) -> float:
    """Global matmul FLOPs of ``fn(*args, **kwargs)`` from its jaxpr; scan bodies times their length.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s (nothing is computed). Counts dot_general only.
    """
    import jax

    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


# ------------------------------------------------------------------------------------------------------------
# the one-time printed profile
# ------------------------------------------------------------------------------------------------------------
def format_flops(x: Optional[float], unit: str = "FLOP") -> str:
    """1.5e12 -> '1.50 TFLOP'; None -> 'n/a'."""
    if x is None:
        return "n/a"
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _ms(s: Optional[float]) -> str:
    return "n/a" if s is None else f"{1000 * s:.1f} ms"


@dataclass
class FlopsProfile:
    """One step's FLOPs three ways and where its time goes; `format` is printed once after the first steps.

    ``xla_flops_per_device`` comes from `xla_flops` (per device); ``jaxpr_flops`` from `jaxpr_matmul_flops`
    (global). Times are seconds (`jzero.step_timer`): compile once; ``step_time_s`` the training loop's wall time
    per step; ``device_step_s`` a real step run synchronised (dispatch to ready); ``host_time_s`` the host's own
    work per step, split in ``host_split`` (data wait, placement, dispatch, logging); ``queue_wait_s`` the time
    the dispatch call blocked waiting for the device. MFU is of the loop's step.
    """

    tokens_per_step: int
    flops_per_token: float
    n_devices: int
    xla_flops_per_device: Optional[float] = None
    xla_while_loops: int = 0
    xla_library_calls: int = 0
    jaxpr_flops: Optional[float] = None
    compile_time_s: Optional[float] = None
    step_time_s: Optional[float] = None
    device_step_s: Optional[float] = None
    host_time_s: Optional[float] = None
    host_split: Optional[dict] = None
    queue_wait_s: Optional[float] = None
    peak_flops_per_device: Optional[float] = None
    dtype: str = "bfloat16"
    window_steps: Optional[tuple[int, int]] = None   # the logged window the times come from (first, last step)

    @property
    def analytic_flops_per_step(self) -> float:
        return self.tokens_per_step * self.flops_per_token

    @property
    def xla_flops_per_step(self) -> Optional[float]:
        return None if self.xla_flops_per_device is None else self.xla_flops_per_device * self.n_devices

    @property
    def xla_ratio(self) -> Optional[float]:
        x = self.xla_flops_per_step
        return None if x is None else x / self.analytic_flops_per_step

    @property
    def mfu(self) -> Optional[float]:
        if not self.step_time_s:
            return None
        return mfu(self.tokens_per_step / self.step_time_s, self.flops_per_token, self.n_devices,
                   self.peak_flops_per_device)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(analytic_flops_per_step=self.analytic_flops_per_step, xla_flops_per_step=self.xla_flops_per_step,
                 xla_ratio=self.xla_ratio, mfu=self.mfu)
        return d

    def format(self) -> str:
        a = self.analytic_flops_per_step
        lines = [f"flops profile: one step = {self.tokens_per_step:,} tokens on {self.n_devices} device(s)",
                 f"  analytic 6N+12LTd : {format_flops(a)} ({format_flops(self.flops_per_token)} per token)"]
        if self.xla_flops_per_step is not None:
            notes = []
            if self.xla_while_loops:
                notes.append(f"the program has {self.xla_while_loops} while loop(s) whose bodies XLA counts once")
            if self.xla_library_calls:
                notes.append(f"its {self.xla_library_calls} library calls (custom calls: cuBLAS/cuDNN, jzero's "
                             "kernels) are not counted")
            note = f"; {' and '.join(notes)}, so this reads low" if notes else ""
            lines.append(f"  XLA cost analysis : {format_flops(self.xla_flops_per_step)} "
                         f"({format_flops(self.xla_flops_per_device)} per device), "
                         f"XLA / analytic = {self.xla_ratio:.3f}{note}")
        else:
            lines.append("  XLA cost analysis : n/a (backend reports no flops)")
        if self.jaxpr_flops is not None:
            lines.append(f"  jaxpr matmuls     : {format_flops(self.jaxpr_flops)}, "
                         f"jaxpr / analytic = {self.jaxpr_flops / a:.3f}")
        compile_s = "n/a" if self.compile_time_s is None else f"{self.compile_time_s:.1f} s"
        steps = "" if self.window_steps is None else f" (steps {self.window_steps[0]}-{self.window_steps[1]})"
        lines.append(f"  time              : compile {compile_s} (once) | loop step {_ms(self.step_time_s)}{steps} | "
                     f"device step {_ms(self.device_step_s)} (synchronised) | host overhead "
                     f"{_ms(self.host_time_s)} per step")
        if self.host_split:
            lines.append("  host overhead     : " + " | ".join(
                f"{k.replace('_time_s', '').replace('_s', '').replace('_', ' ')} {_ms(v)}"
                for k, v in self.host_split.items())
                + ("" if self.queue_wait_s is None else f" (+ {_ms(self.queue_wait_s)} waiting for the device)"))
        if self.step_time_s:
            achieved = a / self.step_time_s / self.n_devices
            tail = ("MFU n/a (no peak for this device)" if self.mfu is None else
                    f"MFU {100 * self.mfu:.1f}% of {format_flops(self.peak_flops_per_device, 'FLOP/s')} "
                    f"({self.dtype})")
            lines.append(f"  achieved          : {format_flops(achieved, 'FLOP/s')} per device, {tail}")
        return "\n".join(lines)
