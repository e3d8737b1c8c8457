"""Pretrain a GPT: ``python -m train.pretrain [--config FILE] [key=value ...]``.

With no arguments it runs the embedded default (``DEFAULT_CONFIG``, also shipped as ``configs/default.yaml``):
a small byte-level GPT on the Python standard library's own sources, on whatever devices JAX sees.
Writes ``config.json``, ``metrics.jsonl`` and ``summary.json`` into ``train.output_dir``.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

from train._main import ArgumentParser

DEFAULT_CONFIG: dict = {
    "train_batch_size": 32,
    "steps_per_print": 25,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": 300, "warmup_num_steps": 20, "warmup_min_ratio": 0.0,
                             "cos_min_ratio": 0.1}},
    "model": {"family": "gpt2", "preset": "gpt2-tiny"},
    "data": {"path": None, "seq_len": 64},
    "train": {"steps": 300, "seed": 0, "output_dir": "runs/default", "log_interval": 1, "eval_interval": 100,
              "eval_batches": 4},
}


#: real training steps run synchronised once per run to measure the device step time (jzero.step_timer)
N_PROBES = 3


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", "--deepspeed_config", dest="config",   # (DeepSpeed scripts pass --deepspeed_config)
                   help="DeepSpeed-style JSON or YAML config (default: the embedded default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. zero_optimization.stage=3")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest loadable checkpoint in checkpoint.dir "
                        "(default OUTPUT_DIR/checkpoints)")
    from jzero.distributed import add_distributed_args

    add_distributed_args(p)
    return p.parse_intermixed_args(argv)   # overrides may come before or after --resume


def main(argv=None) -> int:
    from train._main import run_main

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(args, DEFAULT_CONFIG, lambda cfg: run(cfg, resume=args.resume))


def _data_dir(cfg) -> Path:
    from jzero.data import default_corpus_dir
    from jzero.errors import DataError

    if cfg.data.path is None:
        return default_corpus_dir(max_bytes=cfg.data.default_corpus_bytes)
    path = Path(cfg.data.path)
    if not (path / "meta.json").is_file():
        raise DataError(f"data.path='{path}' has no meta.json; prepare it with "
                        f"python -m train.prepare_data --input TEXT_FILES --output-dir {path}")
    return path


def _resume(engine, ckpt_dir: Path, batches, pi: int) -> int:
    """Load the latest loadable checkpoint (falling back past unreadable ones, logged); return its step."""
    from jzero import checkpoint
    from jzero.errors import CheckpointError

    log = (lambda msg: print(msg, flush=True)) if pi == 0 else (lambda msg: None)
    found = checkpoint.restore_latest(engine, ckpt_dir, data_iterator=batches, log=log)
    if found is None:
        log(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
        return 0
    start = int(engine.state.step)
    if start >= engine.config.train.steps:
        raise CheckpointError(f"checkpoint {ckpt_dir}/{found[0]} is at step {start} >= train.steps="
                              f"{engine.config.train.steps}; raise train.steps to train further")
    log(f"resume: continuing from step {start} ({ckpt_dir}/{found[0]})")
    changes = checkpoint.config_changes_line(ckpt_dir, found[0], engine.config)
    if changes:
        log(changes)
    return start   # the Monitor drops what the interrupted run logged after this step (resume_step)


def _static_profile(engine, tokens_per_step, flops_per_token, peak, rc):
    """DeepSpeed's flops profiler, the part known before the first step: XLA-counted and jaxpr-counted FLOPs of the
    compiled step next to the analytic 6N + 12LTd (counted here, so the tracing is no window's host time)."""
    import jax

    from jzero import flops

    compiled = engine.compile()
    return flops.FlopsProfile(
        tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, n_devices=jax.device_count(),
        xla_flops_per_device=flops.xla_flops(compiled), xla_while_loops=flops.hlo_while_loops(compiled),
        xla_library_calls=flops.hlo_library_calls(compiled),
        jaxpr_flops=flops.jaxpr_matmul_flops(engine._train, engine.state, engine.batch_spec()),
        compile_time_s=engine.compile_seconds, peak_flops_per_device=peak,
        dtype=flops.matmul_dtype(rc))


def _flops_profile(static, window, steps, device_step_s):
    """The profile with one logged window's time split (jzero.step_timer): loop step, synchronised device step and
    the host's overhead per step, for steps ``steps`` = (first, last); printed once by process 0."""
    import dataclasses

    import jax

    from jzero.step_timer import PHASES

    prof = dataclasses.replace(static, step_time_s=window["step_time_s"], device_step_s=device_step_s,
                               host_time_s=window["host_time_s"], host_split={k: window[k] for k in PHASES},
                               queue_wait_s=window["queue_wait_s"], window_steps=steps)
    if jax.process_index() == 0:
        print(prof.format(), flush=True)
    return prof


def _communication(engine):
    """1-bit optimizers: bytes per step each device sends, warm-up vs compression stage vs an fp32 all-reduce,
    counted from compiled HLO (printed once, kept in summary.json); None for other optimizers."""
    import jax

    from jzero.optim.onebit import communication_report, is_onebit

    rc = engine.config
    if not is_onebit(rc.optimizer.type):
        return None
    from jzero.optim import layer_stacked_axes

    report = communication_report(rc.optimizer.type, rc.optimizer.params, engine.state.params, engine.mesh,
                                  rc.gradient_clipping, stacked_axes=layer_stacked_axes(engine.plan.param_names))
    if jax.process_index() == 0:
        if "compression" in report:
            warm = f"warm-up {report['warmup']:,} B, " if "warmup" in report else "no warm-up, "
            print(f"communication per step and device (HLO-counted): {warm}compression "
                  f"{report['compression']:,} B = {report['compression_vs_fp32']:.4f} x the fp32 gradient "
                  f"all-reduce ({report['fp32_allreduce']:,} B)", flush=True)
        else:
            print(f"communication per step and device (HLO-counted): one program for all stages "
                  f"{report['one_program']:,} B; fp32 gradient all-reduce {report['fp32_allreduce']:,} B", flush=True)
    return report


def run(cfg, resume: bool = False) -> dict:
    """Train per ``cfg``; return the summary dict (also written to ``summary.json``).

    Every ``train.checkpoint_interval`` steps (and at the last step) the train state, data position and config
    are saved asynchronously to ``checkpoint.dir``; ``resume`` continues from the latest loadable one there.
    """
    import jax

    import jzero
    from jzero import checkpoint, flops, rundir
    from jzero.config import checkpoint_dir, resolve, to_dict
    from jzero.data import BatchIterator, eval_batches, read_meta
    from jzero.guard import TrainingGuard
    from jzero.profiler import LoopProfile, describe
    from jzero.monitor import Monitor, device_memory_bytes
    from jzero.step_timer import StepTimer

    resolved = resolve(cfg, jax.device_count())
    data_dir = _data_dir(resolved)
    meta = read_meta(data_dir)
    pi = jax.process_index()
    ckpt_dir, start = checkpoint_dir(cfg), 0
    if cfg.train.checkpoint_interval and not resume:   # before anything compiles
        checkpoint.require_no_steps(ckpt_dir, "pass --resume to continue that run, or set train.output_dir (or "
                                    "checkpoint.dir) to a new directory")
    engine = jzero.initialize(cfg, vocab_size=meta["vocab_size"])
    rc = engine.config
    block, blocks = engine.row_block()   # this process's rows (processes of one pipeline stage share them)
    batches = BatchIterator(data_dir / "train.bin", rc.data.seq_len, rc.train_batch_size,
                            rc.gradient_accumulation_steps, rc.train.seed, block, blocks, shuffle=rc.data.shuffle)
    out = Path(rc.train.output_dir)
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        earlier = None if resume else rundir.keep_earlier_results(out)
        if earlier is not None:
            print(f"{out} held an earlier run's results: moved to {earlier}", flush=True)
        (out / "config.json").write_text(json.dumps(to_dict(rc), indent=2))
    if rc.train.checkpoint_interval:   # open the writer now: an unwritable checkpoint.dir fails before training
        checkpoint.writer(ckpt_dir, rc.checkpoint.max_to_keep, rc.checkpoint.async_save)
    if resume:
        start = _resume(engine, ckpt_dir, batches, pi)
    guard = TrainingGuard(rc, ckpt_dir)   # divergence and a stuck fp16 loss scale stop the run (jzero.guard)

    engine.compile()
    comm = _communication(engine)
    mc = engine.model_config
    flops_per_token = flops.gpt_train_flops_per_token(flops.matmul_params(mc), mc.n_layer, rc.data.seq_len,
                                                      mc.d_model)
    dev = jax.local_devices()[0]
    peak = flops.peak_flops(dev, flops.matmul_dtype(rc))
    tokens_per_step = rc.train_batch_size * rc.data.seq_len
    monitor = Monitor(out, rc.train.steps, tensorboard=rc.tensorboard.model_dump(),
                      csv_monitor=rc.csv_monitor.model_dump(), steps_per_print=rc.steps_per_print,
                      wall_clock_breakdown=rc.wall_clock_breakdown, train_batch_size=rc.train_batch_size,
                      fp16=rc.fp16.enabled, device=dev, append=start > 0, resume_step=start)
    eval_rows = rc.train_batch_size // rc.gradient_accumulation_steps
    if rc.train.eval_interval:   # a val split too short for one eval batch fails now, not after training
        next(iter(eval_batches(data_dir / "val.bin", rc.data.seq_len, eval_rows, 1, block, blocks)))

    static = _static_profile(engine, tokens_per_step, flops_per_token, peak, rc)
    rates, host, losses, last_eval, profile = [], [], [], None, None
    timer, pending, done_through, last_window = StepTimer(), [], start, None
    window_first = start + 1   # the first step in the open window (an inexact close keeps it open: StepTimer.window)
    # this run's per-step train losses: the first, and the last 10 (whatever train.log_interval logs)
    step_losses = collections.deque(maxlen=10)
    first_loss = None
    probe_steps = set(range(start + 2, start + 2 + N_PROBES))   # after the first (warm-up) dispatch
    # a device trace of some steps of this loop (jzero.profiler), left out of the timed windows
    tracing = LoopProfile.from_config(rc.train, start, start + 2 + N_PROBES, out)
    trace_summary, traced_rates, traced_host = None, [], []

    def log_pending(next_metrics=None):
        """Log the queued steps' metrics: they are fetched one step late, so the device has the next step queued
        while the host waits here and formats/writes the line (no bubble from the sync).

        The window closed here spans the time since the last close and counts the steps that *finished* in it:
        the queued ones, plus the step dispatched after them (``next_metrics``) if it is already done, as it is
        whenever dispatch blocks (CPU, optimizer offload, a host-bound loop). Counting logged steps instead would
        give that step's time to the window before and leave the next one almost empty (a tokens/s in the
        millions). A close that finds no step finished since the last one keeps the window open, and its lines
        show the last closed window's figures."""
        nonlocal pending, done_through, profile, last_window, window_first
        waited = not pending[-1][1]["loss"].is_ready()   # the fetch below waits for the logged step to finish
        fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]   # the one sync
        pending = []
        step = fetched[-1][0]
        for s, m in fetched:
            guard.check(s, m)   # diverged / fp16 scale stuck at its minimum: one line, exit 2
        ahead = next_metrics is not None and next_metrics["loss"].is_ready()   # (the step's own program's output)
        finished = step + 1 if ahead else step
        # the close falls on a step boundary unless the next step was already running before the fetch (a
        # host-bound loop) and is still running now: then StepTimer.window merges the next window into this one
        exact = next_metrics is None or ahead or waited
        with timer.phase("log_time_s"):
            if finished > done_through:
                window = timer.window(finished - done_through, exact)
                done_through, last_window = finished, window
                tps = tokens_per_step / window["step_time_s"]
                timed = not tracing.covers(step)   # a window of traced steps has the profiler's overhead: logged only
                (rates if timed else traced_rates).append(tps)
                (host if timed else traced_host).append((window["host_time_s"], window["queue_wait_s"]))
                # once, from the first exact window clear of the warm-up and probe steps (else the last window):
                # an inexact close's figures are off by up to a step (a host-bound loop's first such window read
                # twice its step time), and steps window_first..finished are the ones whose time it holds
                if timed and profile is None and (exact and window_first >= start + 2 + N_PROBES
                                                  or step == rc.train.steps):
                    profile = _flops_profile(static, window, (window_first, finished), timer.device_step_s)
                if exact:
                    window_first = finished + 1
            window = last_window
            tps = tokens_per_step / window["step_time_s"]
            mfu = flops.mfu(tps, flops_per_token, jax.device_count(), peak) if peak else None
            for s, m in fetched:
                m.update(window, tokens_per_s=tps, mfu=mfu)
                monitor.log(s, m)
                losses.append(m["loss"])

    with monitor:
        for step in range(start + 1, rc.train.steps + 1):
            if tracing.starts_at(step) and pi == 0:
                tracing.start()   # (the timed window was closed at the end of the step before)
            with timer.phase("data_wait_s"):
                local = next(batches)
            with timer.phase("place_time_s"):
                batch = engine.put_batch(local)
            if step in probe_steps:   # a real step, synchronised: device step time and the dispatch's own cost
                with timer.probe(lambda: jax.block_until_ready(engine.state),
                                 lambda: guard.watch(engine, engine.train_step(batch))) as metrics:
                    jax.block_until_ready((metrics, engine.state))
            else:
                with timer.phase("dispatch_call_s"):
                    metrics = guard.watch(engine, engine.train_step(batch))   # + device-side non-finite count
            timer.step()
            evaluating = rc.train.eval_interval and (step % rc.train.eval_interval == 0 or step == rc.train.steps)
            saving = rc.train.checkpoint_interval and (step % rc.train.checkpoint_interval == 0
                                                        or step == rc.train.steps)
            # a trace starts next step, or ends with this one: its steps form windows of their own
            trace_edge = tracing.starts_at(step + 1) or tracing.ends_at(step)
            # a probe ran synchronised: its step is done and nothing is queued behind it, so close there too
            closing = evaluating or saving or trace_edge or step in probe_steps
            step_losses.append(metrics["loss"])   # device scalars, fetched once at the end (no sync here)
            first_loss = metrics["loss"] if first_loss is None else first_loss
            if pending and not closing:   # (a closing step logs what is queued with itself, in one window)
                log_pending(next_metrics=metrics)
            if step % rc.train.log_interval == 0 or step == rc.train.steps:
                pending.append((step, metrics))
            if closing and pending:
                log_pending()   # evaluation, the save's sync and a trace are not step time: close the window first
            if tracing.ends_at(step) and pi == 0:
                trace_summary = tracing.stop(lambda: jax.block_until_ready(engine.state),
                                             tokens_per_step / statistics.median(rates) if rates else None)
                print(describe(trace_summary), flush=True)
            if evaluating:
                eval_losses = [float(engine.eval_step(b)) for b in
                          eval_batches(data_dir / "val.bin", rc.data.seq_len, eval_rows, rc.train.eval_batches, block,
                                        blocks)]
                ev = statistics.fmean(eval_losses)
                last_eval = ev
                monitor.log_eval(step, {"eval_loss": ev, "eval_ppl": float(jax.numpy.exp(ev))})
            if saving:
                engine.save_checkpoint(ckpt_dir, data_iterator=batches)   # async: training goes on while it writes
            if evaluating or saving or trace_edge:
                timer.restart()
                done_through = step
                window_first = step + 1
        if pending:
            log_pending()
        checkpoint.wait_until_finished(ckpt_dir)
        if not rates:   # every window held traced steps: report those (with the profiler's overhead in them)
            rates, host = traced_rates, traced_host
        tps_med = statistics.median(rates[1:] or rates)
        mem = device_memory_bytes(dev) or {}
        last10, first_loss = jax.device_get((list(step_losses), first_loss))
        summary = {
            "final_loss": statistics.fmean(map(float, last10)),   # mean train loss of the run's last 10 steps
            "last_loss": losses[-1],
            "initial_loss": float(first_loss),   # the train loss of this invocation's first step
            "final_eval_loss": last_eval,
            "steps": rc.train.steps,   # the step the run ended at
            "resumed_from": start,     # 0 = a fresh run; this invocation ran steps - resumed_from steps
            "skipped_steps": int(engine.state.loss_scale.skipped_steps),   # fp16 overflow / bf16 non-finite
            "tokens_per_s": tps_med,
            "step_time_s": tokens_per_step / tps_med,   # the loop's wall time per step (median window)
            "host_time_s": statistics.median(h for h, _ in host[1:] or host),   # the host's own work per step
            "queue_wait_s": statistics.median(q for _, q in host[1:] or host),   # dispatch blocked on the device
            "mfu": flops.mfu(tps_med, flops_per_token, jax.device_count(), peak) if peak else None,
            "n_devices": jax.device_count(),
            "n_params": engine.n_params(),
            "zero_stage": rc.zero_optimization.stage,
            "mesh": {"data": rc.mesh.data, "tensor": rc.mesh.tensor, "pipeline": rc.mesh.pipeline},
            "memory_per_device_bytes": engine.memory_per_device(),
            "peak_memory_bytes": mem.get("peak_bytes_in_use"),
            "compile_s": engine.compile_seconds,
            "device_step_s": timer.device_step_s,
            "flops_profile": profile.to_dict() if profile else None,
            "trace": trace_summary,
        }
        if comm is not None:
            summary["communication"] = comm
        if engine.pipeline is not None:   # schedule, theoretical and measured bubble (train.bubble.bubble_report)
            from train.bubble import bubble_report

            summary["pipeline"] = bubble_report(engine)
        monitor.summary(summary)
    return summary


if __name__ == "__main__":
    from jzero.distributed import exit_process

    exit_process(main())   # sys.exit, but a failing process of a multi-process run skips JAX's shutdown barrier
