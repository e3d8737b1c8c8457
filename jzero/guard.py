"""Training must never go wrong silently: divergence and a stuck fp16 loss scale stop the run with one line.

    guard = TrainingGuard(engine.config, checkpoint_dir)   # checkpoint_dir: where the run saves, or None
    for step in ...:
        metrics = guard.watch(engine, engine.train_step(batch))   # device-side, no host sync
        if logging_this_step:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}   # the loop's one sync per log
            guard.check(step, m)    # pops the guard's keys from m; raises TrainingError

Two failures are caught, both from values the loop already fetches at each log interval (the guard adds two
scalars to the metrics dict; the count itself is one tiny jitted op per step on the device):

* **divergence**: ``train.max_nonfinite_steps`` consecutive steps whose loss or gradient norm is inf/nan. Under
  fp32 (or bf16 without ``check_grad_overflow``) one such step already made the weights nan, every later step
  is wasted; under skipping precisions a diverged model overflows every step. Dynamic fp16 loss scaling is
  left out: there an overflow is the scaler's business, and its failure is the next case.
* **fp16 stuck at ``min_loss_scale``**: an overflow at the minimum scale with no hysteresis left. DeepSpeed's
  ``DynamicLossScaler`` raises "Current loss scale already at minimum"; the compiled step cannot raise, so
  :class:`jzero.precision.LossScaleState` keeps the flag and the guard raises here.

The error names the last checkpoint on disk: :func:`jzero.checkpoint.save` refuses to write a state holding
inf/nan (:func:`jzero.checkpoint.state_is_finite`), so that checkpoint is a good one and rotation never deleted it
for a diverged state.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jzero import checkpoint
from jzero.errors import TrainingError

RUN_KEY = "guard_nonfinite_run"      # consecutive non-finite steps up to this one (device int32)
STALLED_KEY = "guard_loss_scale_stalled"   # the fp16 scaler hit min_loss_scale with an overflow (device bool)


@jax.jit
def _count(run, loss, grad_norm, stalled):
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_run = jnp.where(ok, 0, run + 1).astype(jnp.int32)
    # `& (new_run >= 0)` makes the flag a computed output (a fresh buffer), never the loss-scale leaf itself,
    # which the next train step donates
    return new_run, jnp.asarray(stalled, jnp.bool_) & (new_run >= 0)


def last_good_checkpoint(checkpoint_dir) -> str:
    """``'DIR/STEP'`` of the newest complete checkpoint, or a phrase saying there is none (for error messages)."""
    if checkpoint_dir is None:
        return "none (no checkpoint directory)"
    try:
        steps = checkpoint.steps(checkpoint_dir)
    except Exception:  # noqa: BLE001  (a failed async save is reported by its own error; here we only name one)
        steps = []
    if not steps:
        return f"none in {checkpoint_dir} yet"
    return f"{Path(checkpoint_dir)}/{steps[-1]}"


class TrainingGuard:
    """Counts consecutive non-finite steps on the device and raises :class:`TrainingError` at a log step."""

    def __init__(self, config, checkpoint_dir=None):
        self.max_nonfinite = int(config.train.max_nonfinite_steps)
        fp16 = config.fp16
        self.count_nonfinite = not (fp16.enabled and fp16.loss_scale == 0)   # dynamic fp16: the scaler's job
        self.min_loss_scale = fp16.min_loss_scale
        self.checkpoint_dir = checkpoint_dir
        self._run = None

    def watch(self, engine, metrics: dict) -> dict:
        """``metrics`` plus the guard's two device scalars; call it after every train step (no host sync)."""
        loss = metrics["loss"]
        if self._run is None:   # device constants placed once, not every step
            self._run = jax.device_put(np.int32(0), loss.sharding)
            self._false = jax.device_put(np.bool_(False), loss.sharding)
            self._zero = jax.device_put(np.float32(0), loss.sharding)
        stalled = getattr(getattr(engine.state, "loss_scale", None), "stalled_at_min_scale", None)
        if stalled is None:
            stalled = self._false
        if self.count_nonfinite:
            run, stalled = _count(self._run, loss, metrics.get("grad_norm", loss), stalled)
            self._run = run
        else:
            run, stalled = _count(self._run, self._zero, self._zero, stalled)
        return {**metrics, RUN_KEY: run, STALLED_KEY: stalled}

    def check(self, step: int, m: dict) -> None:
        """Pop the guard's keys from the fetched metrics ``m``; raise if the run diverged or the scale stalled."""
        run = int(m.pop(RUN_KEY, 0))
        stalled = bool(m.pop(STALLED_KEY, False))
        if stalled:
            raise TrainingError(
                f"step {step}: the fp16 loss scale is stuck at fp16.min_loss_scale={self.min_loss_scale:g} and the "
                f"gradients still overflow (DeepSpeed: 'Current loss scale already at minimum'; "
                f"{int(m.get('skipped_steps', 0))} of {step} steps skipped); last good checkpoint: "
                f"{last_good_checkpoint(self.checkpoint_dir)}; lower optimizer.params.lr, use bf16.enabled=true, "
                "or lower fp16.min_loss_scale")
        if run >= self.max_nonfinite:
            raise TrainingError(
                f"step {step}: training diverged: loss {m.get('loss')}, grad_norm {m.get('grad_norm')} "
                f"({run} consecutive non-finite steps >= train.max_nonfinite_steps={self.max_nonfinite}); "
                f"last good checkpoint: {last_good_checkpoint(self.checkpoint_dir)}; restart (from it, if any) with "
                "a lower optimizer.params.lr or a gradient_clipping")
