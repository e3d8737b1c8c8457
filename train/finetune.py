"""Fine-tune a BERT on labelled text: ``python -m train.finetune [--config FILE] [key=value ...]``.

``finetune.task`` is ``classification`` (one label per text) or ``token_classification`` (IOB2 tags per word,
e.g. NER); data are JSONL files (:mod:`jzero.finetune_data`), tokenised by bytes, by a word vocabulary of the
training set, or by a ``tokenizer.json``. With no arguments it runs the embedded default (``DEFAULT_CONFIG``, also
``configs/finetune_default.yaml``): a tiny BERT from scratch on a generated 4-topic classification set with a word
vocabulary, on whatever devices JAX sees. ``finetune.init_from`` starts from a checkpoint's weights (a jzero
checkpoint directory or an exported safetensors file): the encoder's params are loaded, the classification head only
when the checkpoint's run had the same labels in the same order (else it starts fresh), and with
``finetune.tokenizer=words`` the word vocabulary is the checkpoint's run's (its ``vocab.json``), not rebuilt.

Each epoch goes over the training set in ``train_batch_size`` batches, reshuffled per epoch (``data.shuffle=false``:
in file order); the rows that do not fill a last batch are left out of that epoch (counted at start and in the
report). Each epoch ends with an evaluation on the whole validation set: accuracy and macro-F1, or for tagging entity-level
precision/recall/F1 as seqeval computes them (:mod:`jzero.metrics`). Written to ``train.output_dir``:
``config.json``, ``metrics.jsonl`` (train steps and per-epoch evals, with the epoch's mean train loss),
``report.json`` / ``report.md`` (the scores per epoch against a baseline: the training set's majority class, or all
'O' for tagging) and ``summary.json``. With ``train.checkpoint_interval`` set, ``--resume`` continues an
interrupted run from the latest loadable checkpoint in its checkpoint directory: engine state, epoch and step within
it (the steps done are skipped, so it sees the batches the uninterrupted run would), the checkpointed run's labels
(other labels are refused) and word vocabulary, and its logs without duplicates (:mod:`train.finetune_run`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from train.finetune_run import scores  # noqa: F401 -- re-exported: it was defined here
from train._main import ArgumentParser

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

    p = ArgumentParser(prog="python -m train.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--config", "--deepspeed_config", dest="config",   # (DeepSpeed scripts pass --deepspeed_config)
                   help="DeepSpeed-style JSON or YAML config (default: the embedded default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.task=token_classification")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest loadable checkpoint in checkpoint.dir (default "
                        "OUTPUT_DIR/checkpoints): its epoch and step, optimizer state, labels and word vocabulary")
    add_distributed_args(p)
    return p.parse_intermixed_args(argv)   # overrides may come before or after the flags


def main(argv=None) -> int:
    from train._main import run_main

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(args, DEFAULT_CONFIG, lambda cfg: run(cfg, resume=args.resume))


# --------------------------------------------------------------------------- pieces


#: pretraining's ``train`` keys that mean nothing here: refused when given, left out of the run's config.json (so
#: the file loads back with --config, and train.plot / sweeps do not show a default that never applied)
NOT_APPLICABLE = {"steps": "the run length is finetune.epochs over the training set",
                  "eval_interval": "evaluation runs after every epoch on the whole validation set",
                  "eval_batches": "evaluation covers the whole validation set",
                  "profile_steps": "train.finetune does not trace steps (python -m train.pretrain does)",
                  "profile_start": "train.finetune does not trace steps (python -m train.pretrain does)"}
#: the same for ``data`` keys (``data.path`` has its own message in :func:`check_config`)
DATA_NOT_APPLICABLE = {"default_corpus_bytes": "it sizes pretraining's embedded corpus; fine-tuning reads "
                                               "finetune.train_file or its embedded synthetic set"}


def config_dict(cfg) -> dict:
    """The run's config as written to config.json: :func:`jzero.config.to_dict` without :data:`NOT_APPLICABLE`."""
    from jzero.config import to_dict

    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_APPLICABLE}
    d["data"] = {k: v for k, v in d["data"].items() if k not in DATA_NOT_APPLICABLE}
    return d


def _given(section, key) -> bool:
    """``key`` set in ``section`` to a value other than its default (set to the default, it changes nothing)."""
    return key in section.model_fields_set and getattr(section, key) != type(section).model_fields[key].default


def check_config(cfg) -> None:
    """Keys that mean nothing to a fine-tune are errors, not silently ignored."""
    from jzero.errors import ConfigError

    if cfg.model.family != "bert":
        raise ConfigError(f"model.family='{cfg.model.family}': train.finetune fine-tunes BERT encoders "
                          f"(classification heads); use model.family=bert")
    if cfg.data.path is not None:
        raise ConfigError("data.path is pretraining token data; fine-tuning reads finetune.train_file (JSONL)")
    for key, why in NOT_APPLICABLE.items():
        if key in cfg.train.model_fields_set and (key in ("steps", "eval_interval", "eval_batches")
                                                  or _given(cfg.train, key)):
            raise ConfigError(f"train.{key} does not apply to train.finetune ({why}); remove it")
    for key, why in DATA_NOT_APPLICABLE.items():
        if _given(cfg.data, key):
            raise ConfigError(f"data.{key} does not apply to train.finetune ({why}); remove it")
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


def saved_state(path) -> dict:
    """What the run that wrote ``path`` saved beside the weights: a checkpoint directory's latest ``client_state``
    (``train.finetune`` saves ``labels``, and with ``tokenizer=words`` its ``vocab``), or an exported file's
    metadata (with ``source``: the checkpoint it came from); ``{}`` when there is none."""
    from jzero import checkpoint, export

    path = Path(path)
    if not path.is_dir():
        return export.load_safetensors(path)[1]
    step, _ = checkpoint.read_meta(path)
    try:
        client = checkpoint.read_client(path, step)
    except Exception:   # noqa: BLE001 -- a checkpoint without a client item saved nothing beside its weights
        return {}
    return client if isinstance(client, dict) else {}


def init_vocab(path) -> tuple[list[str], str]:
    """``(vocab, where)``: the word vocabulary the run that wrote checkpoint ``path`` trained with, so that ids mean
    the same words as in its embedding rows: its ``client_state["vocab"]``, else the ``vocab.json`` of its run
    directory (the checkpoint directory itself or the one above it, for an exported file also those of the
    checkpoint it came from, or the file's own directory). Not found: a CheckpointError naming the fix."""
    from jzero import finetune_data as fd
    from jzero.errors import CheckpointError

    path = Path(path)
    saved = saved_state(path)
    if isinstance(saved.get("vocab"), list):
        return saved["vocab"], f"{path} (its client_state)"
    dirs = [path, path.parent] if path.is_dir() else [path.parent]
    if not path.is_dir() and saved.get("source"):
        dirs += [Path(saved["source"]), Path(saved["source"]).parent]
    for d in dirs:
        if (d / "vocab.json").is_file():
            return fd.read_word_vocab(d / "vocab.json"), str(d / "vocab.json")
    raise CheckpointError(f"finetune.tokenizer=words with finetune.init_from={path}: the word vocabulary its "
                          f"embedding rows were trained with (vocab.json) is in none of "
                          f"{', '.join(str(d) for d in dict.fromkeys(dirs))}; copy the vocab.json of the run that "
                          f"wrote it into {dirs[0]}, or set finetune.tokenizer to that run's tokenizer")


def load_pretrained(engine, path, labels: list[str] | None = None, log=print) -> dict:
    """Put the params of ``path`` (checkpoint dir or exported safetensors) with the same path and shape into
    ``engine.state``, in the engine's layout; the rest keep their fresh init. The task's head (``classifier_*``)
    is loaded only when the checkpoint's run saved its label names (``client_state["labels"]``) and they are
    ``labels``, in the same order: otherwise its rows would mean other classes (or it has another shape), so it
    starts fresh, in ``fresh``, with a line through ``log`` saying why."""
    import jax
    import numpy as np

    from jzero import export
    from jzero.errors import CheckpointError

    path = Path(path)
    tree = export.load_params(path)[1] if path.is_dir() else export.load_safetensors(path)[0]
    source = export.flatten(tree)
    saved = saved_state(path).get("labels")
    if isinstance(saved, str):   # an exported file's metadata holds JSON strings
        try:
            saved = json.loads(saved)
        except ValueError:
            saved = None
    head_ok = labels is not None and saved == list(labels)
    loaded, fresh = [], []

    def one(key_path, cur):
        name = ".".join(str(getattr(k, "key", k)) for k in key_path)
        if name not in source or (name.startswith("classifier_") and not head_ok):
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
    head = "loaded"
    if any(k.startswith("classifier_") for k in source) and not head_ok:
        def short(xs):
            return "[" + ", ".join(map(str, xs[:6])) + (", ..." if len(xs) > 6 else "") + "]"
        head = ("fresh: the checkpoint saved no label names" if not isinstance(saved, list) else
                f"fresh: the checkpoint's labels {short(saved)} are not this run's {short(list(labels or []))}"
                if sorted(map(str, saved)) != sorted(labels or []) else
                f"fresh: the checkpoint's labels {short(saved)} are this run's in another order {short(labels)}")
        if jax.process_index() == 0:
            log(f"finetune.init_from: the classification head (classifier_*) starts {head}")
    elif not any(k.startswith("classifier_") for k in source):
        head = "fresh: the checkpoint has none"
    return {"path": str(path), "loaded": len(loaded), "fresh": sorted(fresh),
            "unused": sorted(set(source) - set(loaded)), "head": head}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True):
    """The training rows of ``epoch`` in the order they are batched: a seeded permutation per epoch, or with
    ``data.shuffle=false`` the file order every epoch."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def _local_rows(x, axis: int, engine):
    """This process's rows of a global batch: its block of them (``engine.row_block()``; processes of one pipeline
    stage or tensor group hold the same rows)."""
    block, blocks = engine.row_block()
    n = x.shape[axis] // blocks
    return x.take(range(block * n, (block + 1) * n), axis=axis)


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
            pred, loss, n = step(engine.state.params, engine.put_eval_batch({k: _local_rows(v, 0, engine)
                                                                              for k, v in batch.items()}))
            preds.append(np.asarray(pred)[real])
            loss_sum += float(loss) * int(n)
            n_sum += int(n)
        return np.concatenate(preds), loss_sum / max(n_sum, 1)

    return evaluate


# --------------------------------------------------------------------------- the run


#: a fine-tuning run's own result files besides config/metrics/summary (moved aside with them for a fresh run)
FINETUNE_RESULTS = ("vocab.json", "report.json", "report.md")


def run(cfg, resume: bool = False) -> dict:
    """Fine-tune per ``cfg``; return the report (also written to ``report.json``). ``resume`` continues from the
    latest loadable checkpoint in the run's checkpoint directory (:mod:`train.finetune_run`)."""
    import jax
    import numpy as np

    import jzero
    from jzero import checkpoint, rundir
    from jzero import finetune_data as fd
    from jzero.config import checkpoint_dir, resolve
    from jzero.errors import ConfigError, DataError
    from jzero.monitor import Monitor
    from jzero.tasks import TASKS
    from train import finetune_run as fr

    t_start = time.perf_counter()
    check_config(cfg)
    ft, T = cfg.finetune, cfg.data.seq_len
    train_ex, val_ex, source = load_examples(ft, cfg.train.seed)
    names = fd.label_names(train_ex, val_ex, ft.task, source=ft.train_file or source)
    ckpt_dir = checkpoint_dir(cfg)
    if cfg.train.checkpoint_interval and not resume:   # before anything compiles
        checkpoint.require_no_steps(ckpt_dir, "pass --resume to continue that run, set train.output_dir (or "
                                    "checkpoint.dir) to a new directory, or fine-tune from them with "
                                    "finetune.init_from")
    prior = fr.latest_client(ckpt_dir) if resume else None   # its labels and vocabulary size the model
    if prior is not None:
        fr.check_client(prior[1], ckpt_dir, prior[0], names, len(train_ex))
    vocab = None
    if ft.tokenizer == "words":
        if prior is not None and isinstance(prior[1].get("vocab"), list):
            vocab = prior[1]["vocab"]   # the checkpointed run's word ids (built from the same data, or init_from's)
        elif ft.init_from:   # the checkpoint's ids: a vocabulary rebuilt from this training set would renumber them
            vocab, where = init_vocab(ft.init_from)
            known = set(vocab)
            words = {w for ex in train_ex for w in fd.words_of(ex)}
            if jax.process_index() == 0:
                print(f"finetune.init_from: the word vocabulary of the checkpoint's run ({len(vocab)} entries, "
                      f"{where}); {len(words - known)} of the training set's {len(words)} distinct words are not "
                      f"in it and map to [UNK]", flush=True)
        else:
            vocab = fd.build_word_vocab(train_ex)
    enc = fd.make_encoder(ft.tokenizer, train_ex, vocab)
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
    left_out = len(train_ex) - steps_per_epoch * G
    if left_out and jax.process_index() == 0:
        which = ("a different random set each epoch" if cfg.data.shuffle else
                 "the last ones in file order, every epoch (data.shuffle=false)")
        print(f"note: {len(train_ex)} training examples fill {steps_per_epoch} batches of train_batch_size={G}; "
              f"each epoch leaves out {left_out} ({which})", flush=True)
    total = ft.epochs * steps_per_epoch
    cfg = cfg.model_copy(deep=True)
    cfg.model.head, cfg.model.num_labels = ft.task, len(names)
    if cfg.scheduler is not None and cfg.scheduler.type in ("WarmupDecayLR", "WarmupCosineLR"):
        cfg.scheduler.params.setdefault("total_num_steps", total)

    engine = jzero.initialize(cfg, vocab_size=fd.padded_vocab(enc.n_ids), task=TASKS[ft.task](T))
    rc, pi = engine.config, jax.process_index()
    out = Path(rc.train.output_dir)
    if pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        earlier = None if resume else rundir.keep_earlier_results(out, rundir.RESULT_FILES + FINETUNE_RESULTS)
        if earlier is not None:
            print(f"{out} held an earlier run's results: moved to {earlier}", flush=True)
        (out / "config.json").write_text(json.dumps(config_dict(rc), indent=2))
        if ft.tokenizer == "words":
            (out / "vocab.json").write_text(json.dumps(vocab))
    if rc.train.checkpoint_interval:   # open the writer now: an unwritable checkpoint.dir fails before training
        checkpoint.writer(ckpt_dir, rc.checkpoint.max_to_keep, rc.checkpoint.async_save)
    pos = fr.restore(engine, ckpt_dir, names, len(train_ex), steps_per_epoch, total, pi) if resume else None
    if pos is None:   # a fresh run (the checkpoint's weights replace init_from's when resuming)
        pos = fr.Position(init_from=load_pretrained(engine, ft.init_from, names) if ft.init_from else None)
    evaluate = make_evaluator(engine)
    A = rc.gradient_accumulation_steps
    from jzero.guard import TrainingGuard
    guard = TrainingGuard(rc, ckpt_dir)   # divergence and a stuck fp16 loss scale stop the run (jzero.guard)

    def saving(at: int) -> bool:
        return bool(rc.train.checkpoint_interval) and (at % rc.train.checkpoint_interval == 0 or at == total)

    def save(epoch_step):
        pos.step, pos.epoch_step = step, epoch_step
        engine.save_checkpoint(ckpt_dir, client_state=fr.client_state(pos, steps_per_epoch, len(train_ex), names,
                                                                       vocab))

    step, per_epoch, losses, first = pos.step, pos.per_epoch, pos.losses, pos.epoch_step
    resumed_from = step   # 0 = a fresh run
    with Monitor(out, total, tensorboard=rc.tensorboard.model_dump(), csv_monitor=rc.csv_monitor.model_dump(),
                 steps_per_print=rc.steps_per_print, wall_clock_breakdown=rc.wall_clock_breakdown,
                 train_batch_size=rc.train_batch_size, fp16=rc.fp16.enabled, append=step > 0,
                 resume_step=step) as monitor:
        for epoch in range(pos.epoch, ft.epochs + 1):
            order = epoch_order(len(train_ex), rc.train.seed, epoch, rc.data.shuffle)
            t_mark, since = time.perf_counter(), 0
            # the epoch's summed train loss (float32, as the loop adds it on the device), from the checkpoint's
            loss_sum, pos.epoch = np.float32(pos.loss_sum) if first else 0.0, epoch
            for s in range(first, steps_per_epoch):   # a resumed epoch skips the steps it had done
                idx = order[s * G:(s + 1) * G]
                batch = {k: _local_rows(train_arr[k][idx].reshape((A, G // A) + train_arr[k].shape[1:]), 1, engine)
                         for k in ("tokens", "mask", "labels")}
                metrics = guard.watch(engine, engine.train_step(batch))
                loss_sum = loss_sum + metrics["loss"]   # on the device: no host sync per step
                step, since = step + 1, since + 1
                if step % rc.train.log_interval == 0 or s == steps_per_epoch - 1:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}   # the one host sync per log
                    guard.check(step, m)
                    m.update(epoch=epoch, step_time_s=(time.perf_counter() - t_mark) / since)
                    losses.append(m["loss"])
                    monitor.log(step, m)
                    t_mark, since = time.perf_counter(), 0
                if saving(step) and s < steps_per_epoch - 1:   # (an epoch's last step: saved after its evaluation)
                    pos.loss_sum = float(loss_sum)
                    save(s + 1)
            first = 0
            pred, val_loss = evaluate(val_arr)
            ev = {"epoch": epoch, "step": step, "train_loss_mean": float(loss_sum) / steps_per_epoch,
                  "val_loss": val_loss, **fr.scores(ft.task, pred, val_arr, val_ex, names, train_arr["labels"])}
            per_epoch.append(ev)
            monitor.log_eval(step, {k: v for k, v in ev.items() if k not in ("per_type", "step")})
            if saving(step):
                pos.loss_sum = float(loss_sum)
                save(steps_per_epoch)
        if rc.train.checkpoint_interval:
            checkpoint.wait_until_finished(ckpt_dir)
        mc = engine.model_config
        report = {
            "task": ft.task, "data": source, "n_train": len(train_ex), "n_val": len(val_ex), "labels": names,
            "tokenizer": enc.name, "seq_len": T,
            "truncated": {"train": int(train_arr["truncated"].sum()), "val": int(val_arr["truncated"].sum())},
            "longest": {"train": int(train_arr["length"].max()), "val": int(val_arr["length"].max())},
            "truncation_note": truncation, "left_out_per_epoch": left_out, "shuffle": rc.data.shuffle,
            "model": {"family": rc.model.family, "preset": rc.model.preset, "n_layer": mc.n_layer,
                      "d_model": mc.d_model, "n_head": mc.n_head, "vocab_size": mc.vocab_size,
                      "n_params": engine.n_params()},
            "init_from": pos.init_from, "resumed_from": resumed_from,   # 0 = a fresh run, else the step resumed at
            "epochs": ft.epochs, "steps": total, "train_batch_size": rc.train_batch_size,
            "mesh": {"data": rc.mesh.data, "tensor": rc.mesh.tensor, "pipeline": rc.mesh.pipeline},
            "zero_stage": rc.zero_optimization.stage, "per_epoch": per_epoch, "final": per_epoch[-1],
            "final_loss": statistics.fmean(losses[-10:]),   # as pretrain's: the last 10 logged train losses
            "time_s": time.perf_counter() - t_start,
        }
        if pi == 0:
            fr.write_report(out, report)
        monitor.summary(report)
    return report


if __name__ == "__main__":
    sys.exit(main())
