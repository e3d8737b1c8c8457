"""Fine-tune a BERT on labelled text: ``python -m train.finetune [--config FILE] [key=value ...]``.

``finetune.task`` is ``classification`` (one label per text) or ``token_classification`` (IOB2 tags per word,
e.g. NER); data are JSONL files (:mod:`jzero.finetune_data`), tokenised by bytes, by a word vocabulary of the
training set, or by a ``tokenizer.json``. With no arguments it runs the embedded default (``DEFAULT_CONFIG``, also
``configs/finetune_default.yaml``): a tiny BERT from scratch on a generated 4-topic classification set with a word
vocabulary, on whatever devices JAX sees. ``finetune.init_from`` starts from a checkpoint's weights (a jzero
checkpoint directory or an exported safetensors file).

Each epoch ends with an evaluation on the whole validation set: accuracy and macro-F1, or for tagging entity-level
precision/recall/F1 as seqeval computes them (:mod:`jzero.metrics`). Written to ``train.output_dir``:
``config.json``, ``metrics.jsonl`` (train steps and per-epoch evals), ``report.json`` / ``report.md`` (the
scores per epoch against a majority baseline) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

DEFAULT_CONFIG: dict = {
    "train_batch_size": 32,
    "steps_per_print": 20,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupCosineLR",   # total_num_steps is filled in from the epochs when absent
                  "params": {"warmup_num_steps": 20, "warmup_type": "linear", "cos_min_ratio": 0.1}},
    "model": {"family": "bert", "preset": "bert-tiny"},
    "data": {"seq_len": 32},            # words; byte-level needs ~96 for the embedded sentences
    "train": {"seed": 0, "output_dir": "runs/finetune", "log_interval": 5},
    "finetune": {"task": "classification", "epochs": 3, "tokenizer": "words"},
}


def parse_args(argv):
    from jzero.distributed import add_distributed_args

    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="DeepSpeed-style JSON or YAML config (default: the embedded default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.task=token_classification")
    add_distributed_args(p)
    return p.parse_intermixed_args(argv)   # overrides may come before or after the flags


def main(argv=None) -> int:
    from train._main import run_main

    return run_main(parse_args(sys.argv[1:] if argv is None else argv), DEFAULT_CONFIG, run)


# --------------------------------------------------------------------------- pieces


#: pretraining's ``train`` keys that mean nothing here: refused when given, left out of the run's config.json (so
#: the file loads back with --config, and train.plot / sweeps do not show a default that never applied)
NOT_APPLICABLE = {"steps": "the run length is finetune.epochs over the training set",
                  "eval_interval": "evaluation runs after every epoch on the whole validation set",
                  "eval_batches": "evaluation covers the whole validation set"}


def config_dict(cfg) -> dict:
    """The run's config as written to config.json: :func:`jzero.config.to_dict` without :data:`NOT_APPLICABLE`."""
    from jzero.config import to_dict

    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_APPLICABLE}
    return d


def check_config(cfg) -> None:
    """Keys that mean nothing to a fine-tune are errors, not silently ignored."""
    from jzero.errors import ConfigError

    if cfg.model.family != "bert":
        raise ConfigError(f"model.family='{cfg.model.family}': train.finetune fine-tunes BERT encoders "
                          f"(classification heads); use model.family=bert")
    if cfg.data.path is not None:
        raise ConfigError("data.path is pretraining token data; fine-tuning reads finetune.train_file (JSONL)")
    for key, why in NOT_APPLICABLE.items():
        if key in cfg.train.model_fields_set:
            raise ConfigError(f"train.{key} does not apply to train.finetune ({why}); remove it")
    ft = cfg.finetune
    if cfg.model.head is not None and cfg.model.head != ft.task:
        raise ConfigError(f"model.head='{cfg.model.head}' but finetune.task='{ft.task}'; drop model.head "
                          f"(the task picks the head)")


def load_examples(ft, seed: int):
    """``(train, val, source)`` examples: the JSONL files, or the embedded synthetic set."""
    from jzero import finetune_data as fd

    if ft.train_file is None:
        make = fd.SYNTHETIC[ft.task]
        source = f"embedded synthetic {ft.task} set (seed {seed})"
        return make(ft.synthetic_train_examples, seed), make(ft.synthetic_val_examples, seed + 10_000), source
    train = fd.read_jsonl(ft.train_file, ft.task)
    if ft.val_file is not None:
        return train, fd.read_jsonl(ft.val_file, ft.task, "finetune.val_file"), f"{ft.train_file} + {ft.val_file}"
    train, val = fd.split(train, ft.val_fraction, seed)
    return train, val, f"{ft.train_file} (val: held-out {ft.val_fraction:.0%})"


def truncation_note(cfg, train_arr: dict, val_arr: dict) -> str | None:
    """The line a run prints at start (and puts in report.md) when ``data.seq_len`` cuts examples short: how many
    train/val examples, the longest one's length and the fix; None when none is cut.

    Truncation is silent damage: a cut text may lose the words that decide its class, and cut-off words are
    predicted 'O' in tagging, so the scores fall toward the baseline with nothing else to show why. A cut long
    tail is a normal trade of length for speed, so a few truncated examples only get this line. More than half
    of the training set cut is a DataError instead: then the model mostly learns from text it never sees whole,
    which is a config mistake (e.g. ``finetune.tokenizer=bytes`` with the word-sized default ``data.seq_len``),
    and the one-line error before compiling beats a finished run with a baseline score. The error needs a fix to
    exist, though: when ``data.seq_len`` is already the model's number of positions (``model.max_len``, from the
    preset or set; a model without one grows with ``data.seq_len``), no seq_len keeps the examples whole, so it
    stays a warning rather than refusing data this model cannot take whole. A ``data.seq_len`` above
    ``model.max_len`` is left to ``jzero.initialize``'s ConfigError."""
    from jzero.errors import DataError
    from models import PRESETS

    T = cfg.data.seq_len
    n_tr, n_va = int(train_arr["truncated"].sum()), int(val_arr["truncated"].sum())
    limit = cfg.model.max_len or PRESETS.get(cfg.model.preset or "", {}).get("max_len")
    if not (n_tr or n_va) or (limit is not None and T > limit):
        return None
    N, M = len(train_arr["truncated"]), len(val_arr["truncated"])
    longest = int(max(train_arr["length"].max(), val_arr["length"].max()))
    fit = longest if limit is None else min(longest, limit)
    cap = f" (model.max_len={limit} is the most this model takes)" if fit < longest else ""
    counts = (f"data.seq_len={T} truncates {n_tr} of {N} training and {n_va} of {M} validation examples "
              f"(the longest needs {longest} tokens with [CLS]/[SEP])")
    if fit > T and 2 * n_tr > N:
        raise DataError(f"{counts}: more than half of the training set is cut; raise data.seq_len to {fit}{cap}")
    if fit > T:
        return f"warning: {counts}; raise data.seq_len up to {fit}{cap} to keep them whole"
    return (f"warning: {counts}; data.seq_len is already the model's max_len={limit}, so the cut tokens are lost "
            f"(shorten the examples to keep them)")


def load_pretrained(engine, path) -> dict:
    """Put the params of ``path`` (checkpoint dir or exported safetensors) with the same path and shape into
    ``engine.state``, in the engine's layout; the rest (the task's head) keep their fresh init."""
    import jax
    import numpy as np

    from jzero import export
    from jzero.errors import CheckpointError

    path = Path(path)
    tree = export.load_params(path)[1] if path.is_dir() else export.load_safetensors(path)[0]
    source = export.flatten(tree)
    loaded, fresh = [], []

    def one(key_path, cur):
        name = ".".join(str(getattr(k, "key", k)) for k in key_path)
        if name not in source:
            fresh.append(name)
            return cur
        src = np.asarray(source[name])
        if src.shape != cur.shape:
            raise CheckpointError(f"finetune.init_from {path}: param {name} has shape {list(src.shape)} there but "
                                  f"{list(cur.shape)} in this model; use the same model sizes as the checkpoint")
        loaded.append(name)
        return jax.make_array_from_callback(cur.shape, cur.sharding, lambda idx: src[idx].astype(cur.dtype))

    params = jax.tree_util.tree_map_with_path(one, engine.master_params())   # fp32 (the host masters if offloaded)
    if not loaded:
        raise CheckpointError(f"finetune.init_from {path}: none of its {len(source)} params matches this model's "
                              f"names (e.g. {sorted(source)[:2]}); is it a model.family=bert checkpoint?")
    engine.set_params(params)
    return {"path": str(path), "loaded": len(loaded), "fresh": sorted(fresh),
            "unused": sorted(set(source) - set(loaded))}


def _local_rows(x, axis: int):
    """This process's rows of a global batch (rows are split evenly over processes in order)."""
    import jax

    n = x.shape[axis] // jax.process_count()
    return x.take(range(jax.process_index() * n, (jax.process_index() + 1) * n), axis=axis)


def make_evaluator(engine):
    """``evaluate(arrays) -> (pred, loss)`` over a whole encoded split, in batches of the global micro-batch rows."""
    import jax
    import numpy as np

    from jzero import sharding as shd
    from jzero.tasks import IGNORE

    task, rows = engine.task, engine.global_batch_rows // engine.accum_steps

    def fwd(params, batch):
        with shd.activate(engine.mesh, engine.plan.rules):
            return (task.predict(engine.model.apply, params, batch),
                    task.loss(engine.model.apply, params, batch), (batch["labels"] != IGNORE).sum())

    step = jax.jit(fwd, out_shardings=(engine.plan.replicated,) * 3)

    def evaluate(arrays):
        N = len(arrays["labels"])
        preds, loss_sum, n_sum = [], 0.0, 0
        for start in range(0, N, rows):
            idx = np.arange(start, start + rows)
            real = idx < N
            idx = np.where(real, idx, 0)          # pad the last batch with copies of row 0 ...
            batch = {k: arrays[k][idx] for k in ("tokens", "mask", "labels")}
            lab = batch["labels"]                 # ... whose labels are ignored
            batch["labels"] = np.where(real.reshape((-1,) + (1,) * (lab.ndim - 1)), lab, IGNORE).astype(np.int32)
            pred, loss, n = step(engine.state.params, engine.put_eval_batch({k: _local_rows(v, 0)
                                                                              for k, v in batch.items()}))
            preds.append(np.asarray(pred)[real])
            loss_sum += float(loss) * int(n)
            n_sum += int(n)
        return np.concatenate(preds), loss_sum / max(n_sum, 1)

    return evaluate


def scores(task: str, pred, arrays, examples, names) -> dict:
    """The task's metrics plus the majority baseline's."""
    import numpy as np

    from jzero import finetune_data as fd
    from jzero import metrics

    labels = arrays["labels"]
    if task == "classification":
        majority = np.bincount(labels, minlength=len(names)).argmax()
        return {"accuracy": metrics.accuracy(pred, labels), "macro_f1": metrics.macro_f1(pred, labels, len(names)),
                "baseline_accuracy": metrics.accuracy(np.full_like(labels, majority), labels)}
    true_tags = [ex["tags"] for ex in examples]
    ent = metrics.entity_scores(true_tags, fd.word_tags(pred, arrays["word_pos"], examples, names))
    return {"entity_f1": ent["f1"], "entity_precision": ent["precision"], "entity_recall": ent["recall"],
            "token_accuracy": metrics.accuracy(pred, labels),
            "baseline_token_accuracy": metrics.accuracy(np.zeros_like(labels), labels),   # all 'O'
            "baseline_entity_f1": 0.0,                                                    # all 'O' finds none
            "per_type": {k: round(v["f1"], 4) for k, v in ent["per_type"].items()}}


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    main_key = "accuracy" if report["task"] == "classification" else "entity_f1"
    base_key = "baseline_accuracy" if main_key == "accuracy" else "baseline_entity_f1"
    lines = [f"# Fine-tune report: {report['task']}", "",
             f"- data: {report['data']} ({report['n_train']} train / {report['n_val']} val examples, "
             f"{len(report['labels'])} labels)",
             f"- model: {report['model']['preset'] or report['model']['family']}, {report['model']['n_params']:,} "
             f"params; init: {report['init_from']['path'] if report['init_from'] else 'from scratch'}",
             f"- {report['epochs']} epochs, {report['steps']} steps, batch {report['train_batch_size']}, "
             f"mesh {report['mesh']}, ZeRO-{report['zero_stage']}, {report['time_s']:.0f} s",
             f"- seq_len {report['seq_len']}: {report['truncated']['train']} train / {report['truncated']['val']} "
             f"val examples truncated (longest {max(report['longest'].values())} tokens with [CLS]/[SEP])"]
    if report["truncation_note"]:
        lines.append(f"- **{report['truncation_note']}**")
    lines += ["", f"| epoch | step | train loss | val loss | {main_key} |", "|---|---|---|---|---|"]
    for e in report["per_epoch"]:
        lines.append(f"| {e['epoch']} | {e['step']} | {e['train_loss']:.4f} | {e['val_loss']:.4f} | "
                     f"{e[main_key]:.4f} |")
    final = report["final"]
    lines += ["", f"Final {main_key}: **{final[main_key]:.4f}** (majority baseline {final[base_key]:.4f})."]
    if "per_type" in final:
        lines.append("Per-type entity F1: " + ", ".join(f"{k} {v:.3f}" for k, v in final["per_type"].items()) + ".")
    (out / "report.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the run


def run(cfg) -> dict:
    """Fine-tune per ``cfg``; return the report (also written to ``report.json``)."""
    import jax
    import numpy as np

    import jzero
    from jzero import checkpoint
    from jzero import finetune_data as fd
    from jzero.config import checkpoint_dir, resolve
    from jzero.errors import ConfigError, DataError
    from jzero.monitor import Monitor
    from jzero.tasks import TASKS

    t_start = time.perf_counter()
    check_config(cfg)
    ft, T = cfg.finetune, cfg.data.seq_len
    train_ex, val_ex, source = load_examples(ft, cfg.train.seed)
    enc = fd.make_encoder(ft.tokenizer, train_ex)
    names = fd.label_names(train_ex, val_ex, ft.task, source=ft.train_file or source)
    if cfg.model.num_labels is not None and cfg.model.num_labels != len(names):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} but the data has {len(names)} labels "
                          f"({', '.join(names[:8])}); drop model.num_labels (the data sets it)")
    train_arr = fd.encode(train_ex, ft.task, enc, T, names)
    val_arr = fd.encode(val_ex, ft.task, enc, T, names)
    truncation = truncation_note(cfg, train_arr, val_arr)
    if truncation and jax.process_index() == 0:
        print(truncation, flush=True)

    G = resolve(cfg, jax.device_count()).train_batch_size
    steps_per_epoch = len(train_ex) // G
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_ex)} training examples are fewer than train_batch_size={G}; lower the batch")
    total = ft.epochs * steps_per_epoch
    cfg = cfg.model_copy(deep=True)
    cfg.model.head, cfg.model.num_labels = ft.task, len(names)
    if cfg.scheduler is not None and cfg.scheduler.type in ("WarmupDecayLR", "WarmupCosineLR"):
        cfg.scheduler.params.setdefault("total_num_steps", total)

    engine = jzero.initialize(cfg, vocab_size=fd.padded_vocab(enc.n_ids), task=TASKS[ft.task](T))
    rc, pi = engine.config, jax.process_index()
    init = load_pretrained(engine, ft.init_from) if ft.init_from else None
    out = Path(rc.train.output_dir)
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict(rc), indent=2))
        if ft.tokenizer == "words":
            (out / "vocab.json").write_text(json.dumps(fd.build_word_vocab(train_ex)))
    ckpt_dir = checkpoint_dir(rc)
    if rc.train.checkpoint_interval:
        checkpoint.require_no_steps(ckpt_dir, "set train.output_dir (or checkpoint.dir) to a new directory, or "
                                    "fine-tune from them with finetune.init_from")
        checkpoint.writer(ckpt_dir, rc.checkpoint.max_to_keep, rc.checkpoint.async_save)
    evaluate = make_evaluator(engine)
    A = rc.gradient_accumulation_steps
    from jzero.guard import TrainingGuard

    guard = TrainingGuard(rc, ckpt_dir)   # divergence and a stuck fp16 loss scale stop the run (jzero.guard)

    per_epoch, step = [], 0
    with Monitor(out, total, tensorboard=rc.tensorboard.model_dump(), csv_monitor=rc.csv_monitor.model_dump(),
                 steps_per_print=rc.steps_per_print, wall_clock_breakdown=rc.wall_clock_breakdown,
                 train_batch_size=rc.train_batch_size, fp16=rc.fp16.enabled) as monitor:
        for epoch in range(1, ft.epochs + 1):
            order = np.random.default_rng([rc.train.seed, epoch]).permutation(len(train_ex))
            losses, t_mark, since = [], time.perf_counter(), 0
            for s in range(steps_per_epoch):
                idx = order[s * G:(s + 1) * G]
                batch = {k: _local_rows(train_arr[k][idx].reshape((A, G // A) + train_arr[k].shape[1:]), 1)
                         for k in ("tokens", "mask", "labels")}
                metrics = guard.watch(engine, engine.train_step(batch))
                step, since = step + 1, since + 1
                if step % rc.train.log_interval == 0 or s == steps_per_epoch - 1:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}   # the one host sync per log
                    guard.check(step, m)
                    m.update(epoch=epoch, step_time_s=(time.perf_counter() - t_mark) / since)
                    losses.append(m["loss"])
                    monitor.log(step, m)
                    t_mark, since = time.perf_counter(), 0
                if rc.train.checkpoint_interval and (step % rc.train.checkpoint_interval == 0 or step == total):
                    engine.save_checkpoint(ckpt_dir, client_state={"epoch": epoch, "labels": names})
            pred, val_loss = evaluate(val_arr)
            ev = {"epoch": epoch, "step": step, "train_loss": losses[-1], "val_loss": val_loss,
                  **scores(ft.task, pred, val_arr, val_ex, names)}
            per_epoch.append(ev)
            monitor.log_eval(step, {k: v for k, v in ev.items() if k not in ("per_type", "step")})
        if rc.train.checkpoint_interval:
            checkpoint.wait_until_finished(ckpt_dir)
        mc = engine.model_config
        report = {
            "task": ft.task, "data": source, "n_train": len(train_ex), "n_val": len(val_ex), "labels": names,
            "tokenizer": enc.name, "seq_len": T,
            "truncated": {"train": int(train_arr["truncated"].sum()), "val": int(val_arr["truncated"].sum())},
            "longest": {"train": int(train_arr["length"].max()), "val": int(val_arr["length"].max())},
            "truncation_note": truncation,
            "model": {"family": rc.model.family, "preset": rc.model.preset, "n_layer": mc.n_layer,
                      "d_model": mc.d_model, "n_head": mc.n_head, "vocab_size": mc.vocab_size,
                      "n_params": engine.n_params()},
            "init_from": init, "epochs": ft.epochs, "steps": total, "train_batch_size": rc.train_batch_size,
            "mesh": {"data": rc.mesh.data, "tensor": rc.mesh.tensor, "pipeline": rc.mesh.pipeline},
            "zero_stage": rc.zero_optimization.stage, "per_epoch": per_epoch, "final": per_epoch[-1],
            "final_loss": statistics.fmean(losses[-10:]),   # as pretrain's: the last 10 logged train losses
            "time_s": time.perf_counter() - t_start,
        }
        if pi == 0:
            write_report(out, report)
        monitor.summary(report)
    return report


if __name__ == "__main__":
    sys.exit(main())
