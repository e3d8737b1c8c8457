"""The parts of ``python -m train.finetune``'s run around its loop: what it saves beside the train state and
continuing from it (``--resume``), and the report files.

Each checkpoint's ``client_state`` holds the run's position and what its report needs from the steps before it:
``epoch`` and ``epoch_step`` (the steps of that epoch done; ``steps_per_epoch`` once the epoch's evaluation ran,
which a checkpoint at an epoch's last step is saved after), ``per_epoch`` (the evaluations so far), ``loss_sum`` (the
epoch's train losses summed so far, the float32 the loop adds to), ``losses`` (the last 10 logged train losses, for
``final_loss``), ``init_from`` (the report's entry), and what the data must match: ``labels`` (their order is the
head's rows), ``vocab`` (``tokenizer=words``: the word ids of the embedding rows), ``n_train`` and
``steps_per_epoch`` (each epoch's shuffle order is fixed by the seed and the training set, so skipping the steps
done gives the resumed run exactly the batches the uninterrupted one had).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

#: the client_state keys a checkpoint needs to be resumed (train.finetune before --resume saved only some)
POSITION_KEYS = ("epoch", "epoch_step", "steps_per_epoch", "n_train", "labels", "per_epoch", "loss_sum", "losses")


@dataclasses.dataclass
class Position:
    """Where a fine-tune stands: ``step`` optimizer steps done, ``epoch_step`` of them in ``epoch``."""
    step: int = 0
    epoch: int = 1
    epoch_step: int = 0
    per_epoch: list = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    init_from: dict | None = None


def client_state(pos: Position, steps_per_epoch: int, n_train: int, labels, vocab) -> dict:
    """The ``client_state`` a checkpoint at ``pos`` is saved with."""
    return {"step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step, "steps_per_epoch": steps_per_epoch,
            "n_train": n_train, "labels": list(labels), "per_epoch": pos.per_epoch, "loss_sum": float(pos.loss_sum),
            "losses": [float(x) for x in pos.losses[-10:]], "init_from": pos.init_from,
            **({"vocab": vocab} if vocab else {})}


def _short(xs) -> str:
    return "[" + ", ".join(map(str, xs[:6])) + (", ..." if len(xs) > 6 else "") + "]"


def latest_client(ckpt_dir) -> tuple[int, dict] | None:
    """``(step, client_state)`` of the newest step in ``ckpt_dir`` whose client_state reads (an unreadable step is
    left to :func:`jzero.checkpoint.restore_latest`), read before the model exists: the run's labels and word
    vocabulary size it. None when there is no step (or none reads)."""
    from jzero import checkpoint

    for step in reversed(checkpoint.steps(ckpt_dir)):
        try:
            client = checkpoint.read_client(ckpt_dir, step)
        except Exception:   # noqa: BLE001 -- partial or corrupted: restore_latest reports it and falls back
            continue
        if isinstance(client, dict):
            return step, client
    return None


def check_client(client: dict, ckpt_dir, step: int, labels, n_train: int, steps_per_epoch: int | None = None
                 ) -> None:
    """A CheckpointError (one line) when step ``step`` of ``ckpt_dir`` cannot be continued with this run's data."""
    from jzero.errors import CheckpointError

    where = f"checkpoint {ckpt_dir}/{step}"
    missing = [k for k in POSITION_KEYS if k not in client]
    if missing:
        raise CheckpointError(f"--resume: {where} holds no fine-tune position (its client_state lacks "
                              f"{', '.join(missing)}; not written by train.finetune with --resume support); start a "
                              f"new train.output_dir with finetune.init_from={ckpt_dir}")
    if list(client["labels"]) != list(labels):
        raise CheckpointError(f"--resume: {where} was trained on labels {_short(client['labels'])} but this run's "
                              f"data gives {_short(list(labels))}; resume with that run's data, or start a new "
                              f"train.output_dir with finetune.init_from")
    if client["n_train"] != n_train or (steps_per_epoch is not None and client["steps_per_epoch"] != steps_per_epoch):
        raise CheckpointError(f"--resume: {where} was trained on {client['n_train']} training examples in "
                              f"{client['steps_per_epoch']} batches an epoch, this run has {n_train}"
                              + (f" in {steps_per_epoch}" if steps_per_epoch is not None else "")
                              + "; resume with that run's data and train_batch_size, or start a new train.output_dir")


def restore(engine, ckpt_dir: Path, labels, n_train: int, steps_per_epoch: int, total: int, pi: int
            ) -> Position | None:
    """Load the latest loadable checkpoint of ``ckpt_dir`` into ``engine`` (falling back past unreadable steps,
    logged) and return its position, or None (with a line) when there is none: the run starts fresh."""
    from jzero import checkpoint
    from jzero.errors import CheckpointError

    log = (lambda msg: print(msg, flush=True)) if pi == 0 else (lambda msg: None)
    found = checkpoint.restore_latest(engine, ckpt_dir, log=log)
    if found is None:
        log(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
        return None
    where = f"checkpoint {ckpt_dir}/{found[0]}"
    client = found[1] if isinstance(found[1], dict) else {}
    check_client(client, ckpt_dir, found[0], labels, n_train, steps_per_epoch)
    start = int(engine.state.step)
    if start >= total:
        raise CheckpointError(f"{where} is at step {start} >= {total} (finetune.epochs x {steps_per_epoch} steps); "
                              f"raise finetune.epochs to train further")
    pos = Position(step=start, epoch=int(client["epoch"]), epoch_step=int(client["epoch_step"]),
                   per_epoch=list(client["per_epoch"]), loss_sum=float(client["loss_sum"]),
                   losses=[float(x) for x in client["losses"]], init_from=client.get("init_from"))
    if pos.epoch_step == steps_per_epoch:   # saved after the epoch's evaluation: the next epoch starts
        pos.epoch, pos.epoch_step, pos.loss_sum = pos.epoch + 1, 0, 0.0
    log(f"resume: continuing from step {start} (epoch {pos.epoch}, step {pos.epoch_step} of {steps_per_epoch}) "
        f"({ckpt_dir}/{found[0]})")
    changes = checkpoint.config_changes_line(ckpt_dir, found[0], engine.config)
    if changes:
        log(changes)
    return pos   # the Monitor drops what the interrupted run logged after this step (resume_step)


def scores(task: str, pred, arrays, examples, names, train_labels) -> dict:
    """The task's metrics plus the baseline's: for classification always predicting the training set's majority
    class (``train_labels``; what a model that learnt only the class frequencies does), for tagging all 'O'."""
    import numpy as np

    from jzero import finetune_data as fd
    from jzero import metrics

    labels = arrays["labels"]
    if task == "classification":
        majority = np.bincount(train_labels, minlength=len(names)).argmax()
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
    if report["left_out_per_epoch"]:
        lines.append(f"- {report['left_out_per_epoch']} of {report['n_train']} training examples left out of each "
                     f"epoch (they do not fill a batch of {report['train_batch_size']})")
    if report["truncation_note"]:
        lines.append(f"- **{report['truncation_note']}**")
    lines += ["", f"| epoch | step | train loss (epoch mean) | val loss | {main_key} |", "|---|---|---|---|---|"]
    for e in report["per_epoch"]:
        lines.append(f"| {e['epoch']} | {e['step']} | {e['train_loss_mean']:.4f} | {e['val_loss']:.4f} | "
                     f"{e[main_key]:.4f} |")
    final = report["final"]
    base = "training-set majority class" if main_key == "accuracy" else "all 'O'"
    lines += ["", f"Final {main_key}: **{final[main_key]:.4f}** (baseline, {base}: {final[base_key]:.4f})."]
    if "per_type" in final:
        lines.append("Per-type entity F1: " + ", ".join(f"{k} {v:.3f}" for k, v in final["per_type"].items()) + ".")
    (out / "report.md").write_text("\n".join(lines) + "\n")
