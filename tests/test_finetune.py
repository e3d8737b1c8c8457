"""train.finetune: the embedded default beats chance and reports it; NER from JSONL files scores entities; weights
load from an exported file; encodings put each word's tag on its first token; bad input is a one-line error."""
import gzip
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

import jzero
from jzero import finetune_data as fd
from jzero.config import load_config
from jzero.errors import CheckpointError, DataError
from jzero.tasks import IGNORE, classification_task
from helpers import assert_config_round_trip
from train.finetune import (DEFAULT_CONFIG, check_config, config_dict, epoch_order, load_pretrained, main, scores,
                            truncation_note)

SMALL = ["steps_per_print=1000", "scheduler.params.warmup_num_steps=4", "finetune.epochs=2", "train_batch_size=16"]


def read(path):
    return json.loads(path.read_text())


def test_embedded_default_beats_chance_and_writes_the_report(tmp_path):
    assert main([f"train.output_dir={tmp_path}", "finetune.synthetic_train_examples=512",
                 "finetune.synthetic_val_examples=128"] + SMALL) == 0
    report = read(tmp_path / "report.json")
    final = report["final"]
    assert report["labels"] == ["food", "music", "sports", "weather"] and report["steps"] == 2 * (512 // 16)
    assert final["accuracy"] >= 0.8 and final["baseline_accuracy"] <= 0.35, final
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals if "accuracy" in e] == [1, 2]
    assert report["truncated"] == {"train": 0, "val": 0} and report["truncation_note"] is None
    assert "Final accuracy: **" in (tmp_path / "report.md").read_text()
    assert "- seq_len 32: 0 train / 0 val examples truncated (longest " in (tmp_path / "report.md").read_text()
    assert read(tmp_path / "summary.json")["final"] == final
    assert read(tmp_path / "config.json")["model"]["head"] == "classification"
    # val_fraction and the synthetic sizes all written out; pretraining's train.steps/eval keys left out, so the
    # file is a valid finetune config (train.plot shows no default step count that never applied)
    assert_config_round_trip(tmp_path / "config.json", written=config_dict)
    assert "steps" not in read(tmp_path / "config.json")["train"]
    check_config(load_config(tmp_path / "config.json"))
    summary = read(tmp_path / "summary.json")
    assert summary["steps"] == 64 and summary["final_loss"] > 0
    print(f"\nembedded default (512 train, 2 epochs): accuracy {final['accuracy']:.4f}, "
          f"baseline {final['baseline_accuracy']:.4f}")


def _mlm_safetensors(path, vocab_size, seed=0):
    """An exported (python -m train.export format) BERT-tiny masked-LM model."""
    from safetensors.numpy import save_file

    from jzero.export import flatten
    from models.bert import Bert, BertConfig

    model = Bert(BertConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=128, d_ff=512, max_len=128,
                            head="mlm"))
    tok = np.zeros((1, 8), np.int32)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(seed), tok, tok))["params"])()
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}
    save_file(flat, str(path), metadata={"format": "jzero"})
    return flat


def test_ner_from_jsonl_files_starting_from_exported_weights(tmp_path):
    train, val = fd.synthetic_ner(480, seed=1), fd.synthetic_ner(96, seed=2)
    for name, exs in (("train.jsonl", train), ("val.jsonl", val)):
        (tmp_path / name).write_text("".join(json.dumps(e) + "\n" for e in exs))
    words = fd.build_word_vocab(train)
    vocab = fd.padded_vocab(len(words))
    flat = _mlm_safetensors(tmp_path / "mlm.safetensors", vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(words))   # the word ids its embedding rows were trained with
    out = tmp_path / "run"
    assert main([f"train.output_dir={out}", "finetune.task=token_classification",
                 f"finetune.train_file={tmp_path / 'train.jsonl'}", f"finetune.val_file={tmp_path / 'val.jsonl'}",
                 f"finetune.init_from={tmp_path / 'mlm.safetensors'}"] + SMALL) == 0
    report = read(out / "report.json")
    init = report["init_from"]
    assert init["fresh"] == ["classifier_bias", "classifier_kernel"] and init["head"] == "fresh: the checkpoint has none"
    assert init["unused"] == sorted(k for k in flat if k.startswith("mlm_"))
    assert init["loaded"] == len(flat) - len(init["unused"])
    final = report["final"]
    assert report["labels"] == ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
    assert final["entity_f1"] >= 0.5 and final["baseline_entity_f1"] == 0.0, final
    assert set(final["per_type"]) == {"LOC", "ORG", "PER"}
    assert_config_round_trip(out / "config.json", written=config_dict)   # train_file + val_file + every other key
    print(f"\nNER (480 train, 2 epochs): entity F1 {final['entity_f1']:.4f} (P {final['entity_precision']:.4f} "
          f"R {final['entity_recall']:.4f}), token accuracy {final['token_accuracy']:.4f} vs all-O "
          f"{final['baseline_token_accuracy']:.4f}")


def test_load_pretrained_puts_the_files_values_in_the_engines_layout(tmp_path):
    flat = _mlm_safetensors(tmp_path / "mlm.safetensors", 320, seed=3)
    cfg = load_config(base=DEFAULT_CONFIG, overrides=["model.head=classification", "model.num_labels=4",
                                                      "zero_optimization.stage=3", "mesh.tensor=2",
                                                      "scheduler.params.total_num_steps=10"])
    engine = jzero.initialize(cfg, vocab_size=320, task=classification_task(32))
    before = jax.device_get(engine.state.params)
    info = load_pretrained(engine, tmp_path / "mlm.safetensors")
    after = jax.device_get(engine.state.params)
    np.testing.assert_array_equal(after["word_embed"], flat["word_embed"])
    np.testing.assert_array_equal(after["blocks"]["attn"]["q_kernel"], flat["blocks.attn.q_kernel"])
    np.testing.assert_array_equal(after["pooler_kernel"], before["pooler_kernel"])     # the head stays fresh
    assert info["fresh"] == ["classifier_bias", "classifier_kernel", "pooler_bias", "pooler_kernel"]
    assert engine.state.params["word_embed"].sharding == engine.plan.param_storage["word_embed"]
    from safetensors.numpy import save_file

    save_file({**flat, "word_embed": flat["word_embed"][:64]}, str(tmp_path / "small.safetensors"),
              metadata={"format": "jzero"})
    with pytest.raises(CheckpointError, match=r"word_embed has shape \[64, 128\] there but \[320, 128\]"):
        load_pretrained(engine, tmp_path / "small.safetensors")


def test_encodings_tag_each_words_first_token():
    exs = [{"tokens": ["Ann", "met", "Bo", "Li"], "tags": ["B-PER", "O", "B-PER", "I-PER"]}]
    names = ["O", "B-PER", "I-PER"]
    arr = fd.encode(exs, "token_classification", fd.byte_encoder(), 10, names)
    # [CLS] A n n _ m e t _ [SEP]: the words start at bytes 0, 4 and 8 (+1 for [CLS])
    assert arr["tokens"][0, 0] == 257 and arr["tokens"][0, 9] == 258 and arr["mask"][0].sum() == 10
    # "Bo" would start at position 9, which [SEP] takes: it and "Li" are cut off and will be predicted O
    assert arr["word_pos"][0].tolist() == [1, 5, -1, -1] and arr["truncated"][0]
    assert arr["labels"][0].tolist() == [IGNORE, 1, IGNORE, IGNORE, IGNORE, 0] + [IGNORE] * 4
    pred = np.zeros((1, 10), np.int64)
    pred[0, 1] = 1
    assert fd.word_tags(pred, arr["word_pos"], exs, names) == [["B-PER", "O", "O", "O"]]


def test_tokenizer_json_encoder_aligns_subwords(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Al", "##ice", "met", "Bob"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    enc = fd.tokenizer_encoder(tmp_path / "tokenizer.json")
    assert (enc.pad_id, enc.cls_id, enc.sep_id, enc.mask_id, enc.n_ids) == (0, 2, 3, 4, 9)
    assert enc.encode_words(["Alice", "met", "Bob"]) == ([5, 6, 7, 8], [0, 2, 3])
    arr = fd.encode([{"tokens": ["Alice", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]}],
                    "token_classification", enc, 8, ["O", "B-PER"])
    assert arr["labels"][0].tolist() == [IGNORE, 1, IGNORE, 0, 1, IGNORE, IGNORE, IGNORE]


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": 3}\n')
    cases = [
        ([f"finetune.train_file={bad}"], f"{bad}:2: expected"),
        (["model.family=gpt2", "model.preset=gpt2-tiny"], "train.finetune fine-tunes BERT encoders"),
        (["train.steps=5"], "train.steps does not apply to train.finetune"),
        (["finetune.val_file=v.jsonl"], "val_file without train_file"),
        (["model.head=mlm"], "model.head='mlm' but finetune.task='classification'"),
        (["model.num_labels=3"], "model.num_labels=3 but the data has 4 labels"),
    ]
    for overrides, message in cases:
        assert main([f"train.output_dir={tmp_path}/x"] + overrides) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(DataError, match="never occur in the training set"):
        fd.label_names([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}],
                       "classification")


def _error_line(tmp_path, capsys, overrides) -> str:
    """Run train.finetune with ``overrides``; assert exit 2 and a single stderr line, and return it."""
    assert main([f"train.output_dir={tmp_path}/run"] + overrides) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.rstrip("\n")


def test_non_utf8_train_file_names_file_and_line(tmp_path, capsys):
    """A latin-1 line or a binary file: file:line and the offending byte, not a UnicodeDecodeError traceback."""
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n')
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={latin1}"]) == (
        f"error: {latin1}:2 is not UTF-8 text (byte 0xe9 at column 14); pass a UTF-8 JSONL file (convert another "
        f"encoding with iconv -f ENCODING -t UTF-8)")
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "ok", "label": "a"}\n'))
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={gz}"]).startswith(
        f"error: {gz}:1 is not UTF-8 text (byte 0x8b at column 2); ")
    # a UTF-8 byte-order mark is not an error, and \u2028 inside a JSON string does not split a line
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + '{"text": "caf\u00e9\u2028x", "label": "a"}\n'.encode())
    assert fd.read_jsonl(bom, "classification") == [{"text": "caf\u00e9\u2028x", "label": "a"}]
    # a CSV (or CoNLL) file: the error says fine-tuning reads JSONL only
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("text,label\nhello,a\n")
    with pytest.raises(DataError, match=r"t.csv:1 is not JSON .*\(fine-tuning reads JSONL only, not CSV: convert "
                                        r"t.csv to JSONL\)"):
        fd.read_jsonl(csv_file, "classification")


def test_token_classification_without_entity_tags_is_one_line(tmp_path, capsys):
    """All tags 'O' (or no tokens at all) leaves one label: a DataError naming the file, not pydantic's
    num_labels > 1 ValidationError."""
    all_o, empty = tmp_path / "all_o.jsonl", tmp_path / "empty.jsonl"
    all_o.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n' * 80)
    empty.write_text('{"tokens": [], "tags": []}\n' * 80)
    ner = ["finetune.task=token_classification"]
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={all_o}"] + ner) == (
        f"error: the training set ({all_o}) has 1 class(es): every tag is 'O'; token_classification needs entity "
        f"tags to learn (tag the entities B-TYPE/I-TYPE, IOB2)")
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={empty}"] + ner).startswith(
        f"error: the training set ({empty}) has 1 class(es): every token list is empty; ")


def test_directory_as_data_file_says_directory(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_text('{"text": "ok", "label": "a"}\n{"text": "no", "label": "b"}\n' * 20)
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={data}"]) == (
        f"error: finetune.train_file={data} is a directory; pass the JSONL file itself (it holds train.jsonl, "
        f"val.jsonl), one {{\"text\": \"...\", \"label\": \"...\"}} a line")
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={data / 'train.jsonl'}",
                                          f"finetune.val_file={tmp_path}"]) == (
        f"error: finetune.val_file={tmp_path} is a directory; pass the JSONL file itself, one "
        f"{{\"text\": \"...\", \"label\": \"...\"}} a line")
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={data / 'nope.jsonl'}"]).startswith(
        f"error: finetune.train_file={data / 'nope.jsonl'} not found; ")


def test_truncating_most_examples_is_an_error(tmp_path, capsys):
    """Byte-level tokens with the word-sized default seq_len=32 cut every example: refused before compiling."""
    assert _error_line(tmp_path, capsys, ["finetune.tokenizer=bytes"]) == (
        "error: data.seq_len=32 truncates 2000 of 2000 training and 400 of 400 validation examples (the longest "
        "needs 88 tokens with [CLS]/[SEP]): more than half of the training set is cut; raise data.seq_len to 88")
    assert not (tmp_path / "run" / "report.json").exists()


def test_truncation_note_counts_and_fix():
    """A few cut examples: a warning with the fix; cut to the model's max_len, a warning only (no seq_len fixes
    it); over half cut with room to grow: the error, capped at model.max_len; none cut: None."""
    exs = [{"text": "x" * n, "label": "a"} for n in (10, 20, 30, 40)]   # need 12, 22, 32, 42 with [CLS]/[SEP]

    def note(overrides, train=exs, val=exs[:1]):
        cfg = load_config(base=DEFAULT_CONFIG, overrides=overrides)
        T, enc = cfg.data.seq_len, fd.byte_encoder()
        return truncation_note(cfg, fd.encode(train, "classification", enc, T, ["a"]),
                               fd.encode(val, "classification", enc, T, ["a"]))

    assert note(["data.seq_len=42"]) is None
    assert note(["data.seq_len=32"]) == (
        "warning: data.seq_len=32 truncates 1 of 4 training and 0 of 1 validation examples (the longest needs 42 "
        "tokens with [CLS]/[SEP]); raise data.seq_len up to 42 to keep them whole")
    with pytest.raises(DataError, match=r"^data.seq_len=12 truncates 3 of 4 training .* needs 42 tokens .*: more "
                                        r"than half of the training set is cut; raise data.seq_len to 42$"):
        note(["data.seq_len=12"])
    with pytest.raises(DataError, match=r"raise data.seq_len to 30 \(model.max_len=30 is the most this model "
                                        r"takes\)$"):
        note(["data.seq_len=12", "model.max_len=30"])
    assert note(["data.seq_len=22", "model.max_len=22"]) == (   # preset bert-tiny's 128 overridden
        "warning: data.seq_len=22 truncates 2 of 4 training and 0 of 1 validation examples (the longest needs 42 "
        "tokens with [CLS]/[SEP]); data.seq_len is already the model's max_len=22, so the cut tokens are lost "
        "(shorten the examples to keep them)")
    with pytest.raises(DataError, match=r"raise data.seq_len to 42$"):   # no preset, no max_len: no limit
        note(["data.seq_len=12", "model.preset=null", "model.n_layer=1", "model.n_head=2", "model.d_model=32"])


def test_truncation_at_the_models_max_len_warns_and_reports(tmp_path, capsys):
    """seq_len already the model's max_len: the run goes on, and the line is on the console and in report.md."""
    assert main([f"train.output_dir={tmp_path}", "finetune.tokenizer=bytes", "data.seq_len=40", "model.max_len=40",
                 "finetune.synthetic_train_examples=64", "finetune.synthetic_val_examples=16", "model.n_layer=1",
                 "finetune.epochs=1"] + SMALL[:2] + ["train_batch_size=16"]) == 0
    out = capsys.readouterr().out
    line = ("warning: data.seq_len=40 truncates 64 of 64 training and 16 of 16 validation examples (the longest "
            "needs 85 tokens with [CLS]/[SEP]); data.seq_len is already the model's max_len=40, so the cut tokens "
            "are lost (shorten the examples to keep them)")
    assert out.splitlines()[0] == line, out
    report = read(tmp_path / "report.json")
    assert report["truncated"] == {"train": 64, "val": 16} and report["truncation_note"] == line
    md = (tmp_path / "report.md").read_text()
    assert "- seq_len 40: 64 train / 16 val examples truncated (longest 85 tokens with [CLS]/[SEP])" in md
    assert f"- **{line}**" in md


def test_divergence_stops_finetuning_with_one_line(tmp_path, capsys):
    """lr 1e6: the guard (shared with pretrain) stops after train.max_nonfinite_steps nan steps, exit 2."""
    assert main([f"train.output_dir={tmp_path}", "finetune.synthetic_train_examples=64",
                 "finetune.synthetic_val_examples=16", "optimizer.params.lr=1e6", "train.max_nonfinite_steps=2",
                 "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "train.log_interval=1"]
                + SMALL) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: step ") and "training diverged: loss nan" in err, err
    assert "(2 consecutive non-finite steps >= train.max_nonfinite_steps=2); last good checkpoint: none in " in err
    assert not (tmp_path / "report.json").exists()   # no report of a diverged run


TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "finetune.epochs=1",
        "steps_per_print=1000", "scheduler.params.warmup_num_steps=2", "train_batch_size=16"]


def _write(path, exs):
    path.write_text("".join(json.dumps(e) + "\n" for e in exs))
    return path


def test_init_from_keeps_the_head_only_for_the_same_labels_and_reuses_the_word_vocab(tmp_path, capsys):
    """A fine-tuned checkpoint: the next run loads its head only with the same labels in the same order (renamed,
    reordered or more labels: fresh, with a line why, not a shape error), and with tokenizer=words keeps its word
    ids (vocab.json) instead of renumbering them from the new training set. The source run also shows the
    left-out rows (120 rows, batch 16: 8 a epoch) and the epoch-mean train loss."""
    src = _write(tmp_path / "src.jsonl", fd.synthetic_classification(120, seed=1))
    assert main([f"train.output_dir={tmp_path}/a", f"finetune.train_file={src}", "train.checkpoint_interval=1000",
                 "train.log_interval=1", "finetune.val_fraction=0.2"] + TINY) == 0
    a = read(tmp_path / "a" / "report.json")
    assert a["left_out_per_epoch"] == 96 % 16 == 0
    assert main([f"train.output_dir={tmp_path}/a2", f"finetune.train_file={src}", "train.log_interval=1"]
                + TINY) == 0
    out = capsys.readouterr().out
    a2 = read(tmp_path / "a2" / "report.json")   # 108 train rows: 6 batches of 16, 12 rows left out
    assert a2["left_out_per_epoch"] == 12 and "each epoch leaves out 12 (a different random set each epoch)" in out
    assert "- 12 of 108 training examples left out of each epoch" in (tmp_path / "a2" / "report.md").read_text()
    steps = [json.loads(x) for x in (tmp_path / "a2" / "metrics.jsonl").read_text().splitlines()]
    step_losses = [e["loss"] for e in steps if "loss" in e and "accuracy" not in e]
    assert len(step_losses) == 6
    assert a2["per_epoch"][0]["train_loss_mean"] == pytest.approx(np.mean(step_losses), rel=1e-5)
    assert "train loss (epoch mean)" in (tmp_path / "a2" / "report.md").read_text()

    ckpt = tmp_path / "a" / "checkpoints"
    vocab_a = read(tmp_path / "a" / "vocab.json")
    # other sentences (other word frequencies: a rebuilt vocabulary would renumber the words), same labels
    other = fd.synthetic_classification(64, seed=7) + [{"text": "zzznew words only", "label": "food"}]
    assert fd.build_word_vocab(other) != vocab_a
    same = _write(tmp_path / "same.jsonl", other)
    assert main([f"train.output_dir={tmp_path}/b", f"finetune.train_file={same}", f"finetune.init_from={ckpt}"]
                + TINY) == 0
    out = capsys.readouterr().out
    b = read(tmp_path / "b" / "report.json")
    assert b["init_from"]["head"] == "loaded" and "classifier_kernel" not in b["init_from"]["fresh"]
    assert read(tmp_path / "b" / "vocab.json") == vocab_a
    assert "the word vocabulary of the checkpoint's run" in out and "map to [UNK]" in out
    assert b["model"]["vocab_size"] == a["model"]["vocab_size"]

    # labels renamed so that they sort in reverse: the head's rows would mean other classes
    rename = {"food": "z", "music": "y", "sports": "x", "weather": "w"}
    renamed = _write(tmp_path / "renamed.jsonl", [{**e, "label": rename[e["label"]]} for e in other])
    assert main([f"train.output_dir={tmp_path}/c", f"finetune.train_file={renamed}", f"finetune.init_from={ckpt}"]
                + TINY) == 0
    out = capsys.readouterr().out
    init = read(tmp_path / "c" / "report.json")["init_from"]
    assert {"classifier_bias", "classifier_kernel"} <= set(init["fresh"]), init
    assert init["head"].startswith("fresh: the checkpoint's labels [food, music, sports, weather] are not this run's")
    assert f"finetune.init_from: the classification head (classifier_*) starts {init['head']}" in out
    # three labels: another head shape starts fresh instead of failing
    three = _write(tmp_path / "three.jsonl", [e for e in other if e["label"] != "music"])
    assert main([f"train.output_dir={tmp_path}/d", f"finetune.train_file={three}", f"finetune.init_from={ckpt}"]
                + TINY) == 0
    assert {"classifier_bias", "classifier_kernel"} <= set(read(tmp_path / "d" / "report.json")["init_from"]["fresh"])


def test_words_init_from_without_its_vocab_is_refused(tmp_path, capsys):
    _mlm_safetensors(tmp_path / "mlm.safetensors", 320)
    line = _error_line(tmp_path, capsys, [f"finetune.init_from={tmp_path / 'mlm.safetensors'}"])
    assert line.startswith(f"error: finetune.tokenizer=words with finetune.init_from={tmp_path / 'mlm.safetensors'}: "
                           f"the word vocabulary its embedding rows were trained with (vocab.json) is in none of "
                           f"{tmp_path}; copy the vocab.json"), line


def test_keys_finetune_ignores_are_refused_and_shuffle_false_is_honoured(tmp_path, capsys):
    assert _error_line(tmp_path, capsys, ["train.profile_steps=3"]).startswith(
        "error: train.profile_steps does not apply to train.finetune (")
    assert _error_line(tmp_path, capsys, ["data.default_corpus_bytes=1000"]).startswith(
        "error: data.default_corpus_bytes does not apply to train.finetune (")
    cfg = load_config(base=DEFAULT_CONFIG, overrides=["data.default_corpus_bytes=8000000", "train.profile_steps=0"])
    check_config(cfg)   # set to the defaults they change nothing
    assert "default_corpus_bytes" not in config_dict(cfg)["data"] and "profile_steps" not in config_dict(cfg)["train"]
    assert epoch_order(5, 0, 1, shuffle=False).tolist() == epoch_order(5, 0, 2, shuffle=False).tolist() == [0, 1, 2,
                                                                                                           3, 4]
    assert sorted(epoch_order(50, 0, 1)) == list(range(50)) and not np.array_equal(epoch_order(50, 0, 1),
                                                                                   epoch_order(50, 0, 2))
    assert main([f"train.output_dir={tmp_path}/s", "data.shuffle=false", "finetune.synthetic_train_examples=40",
                 "finetune.synthetic_val_examples=8"] + TINY) == 0
    out = capsys.readouterr().out
    assert "each epoch leaves out 8 (the last ones in file order, every epoch (data.shuffle=false))" in out
    assert read(tmp_path / "s" / "report.json")["shuffle"] is False


def test_baseline_is_the_training_sets_majority_class():
    """Train mostly class 0, val mostly class 1: the baseline predicts 0 (what a model that learnt only the training
    frequencies predicts), scoring val's share of 0, not val's own majority."""
    val = {"labels": np.array([1, 1, 1, 0], np.int32)}
    got = scores("classification", np.array([1, 1, 1, 0]), val, None, ["a", "b"], np.array([0, 0, 0, 1]))
    assert got["baseline_accuracy"] == 0.25 and got["accuracy"] == 1.0


def test_int_labels_sort_numerically_and_bool_or_mixed_labels_are_refused(tmp_path, capsys):
    ints = _write(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": i % 12} for i in range(24)])
    train = fd.read_jsonl(ints, "classification")
    names = fd.label_names(train, train[:3], "classification")
    assert names == [str(i) for i in range(12)]
    arr = fd.encode(train[:12], "classification", fd.byte_encoder(), 8, names)
    assert arr["labels"].tolist() == list(range(12))
    boolean = tmp_path / "bool.jsonl"
    boolean.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": true}\n')
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={boolean}"]) == (
        f'error: {boolean}:2: label true is a boolean; use strings (e.g. "yes"/"no") or ints (0/1) as labels')
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "1"}\n')
    assert _error_line(tmp_path, capsys, [f"finetune.train_file={mixed}"]) == (
        f"error: {mixed}:3: label '1' is a string but {mixed}:1 has an int label 1; use one type for every label "
        f"(1 and \"1\" would be two classes)")
    with pytest.raises(DataError, match=r"has int labels but the validation set has string labels"):
        fd.label_names([{"text": "a", "label": 1}, {"text": "b", "label": 2}], [{"text": "c", "label": "1"}],
                       "classification")


RESUMABLE = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "steps_per_print=1000",
             "scheduler.params.warmup_num_steps=2", "train_batch_size=16", "finetune.epochs=3",
             "finetune.synthetic_train_examples=88", "finetune.synthetic_val_examples=32", "train.log_interval=1",
             "train.checkpoint_interval=2", "checkpoint.max_to_keep=null", "csv_monitor.enabled=true"]


def _logged(out):
    """metrics.jsonl's train steps ``(step, loss)`` and its evaluations (without timings), and the CSV train losses."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "val_loss" not in r]
    evals = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "time"} for r in rows if "val_loss" in r]
    csv = [p.read_text() for p in sorted(out.rglob("*train_loss.csv"))]
    return train, evals, csv


@pytest.mark.parametrize("interrupted_at", [4, 10, 12])   # mid epoch 1; epoch 2's end (after its eval); mid epoch 3
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, capsys, interrupted_at):
    """88 examples in batches of 16: 5 steps an epoch (8 rows left out, another set each epoch), 15 steps in 3 epochs,
    a checkpoint every 2 steps. The run interrupted after the checkpoint of step R (its later steps, evaluations and
    report left on disk as a killed run leaves its logs) and resumed with --resume logs the same per-step losses bit
    for bit, each step once, and writes the same evaluations and report as the run that was never interrupted."""
    import shutil

    a = tmp_path / "a"
    assert main([f"train.output_dir={a}"] + RESUMABLE) == 0
    straight = read(a / "report.json")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for d in (b / "checkpoints").iterdir():   # the steps after R were never written
        if d.name.isdigit() and int(d.name) > interrupted_at:
            shutil.rmtree(d)
    for name in ("report.json", "report.md", "summary.json"):
        (b / name).unlink()
    capsys.readouterr()
    assert main([f"train.output_dir={b}", "--resume"] + RESUMABLE) == 0
    out = capsys.readouterr().out
    assert f"resume: continuing from step {interrupted_at} " in out
    resumed = read(b / "report.json")
    assert resumed["resumed_from"] == interrupted_at and straight["resumed_from"] == 0
    train_a, evals_a, csv_a = _logged(a)
    train_b, evals_b, csv_b = _logged(b)
    assert [s for s, _ in train_a] == list(range(1, 16))
    assert train_b == train_a                 # bit for bit, each step once
    assert evals_b == evals_a and [e["epoch"] for e in evals_b] == [1, 2, 3]
    assert csv_b == csv_a and csv_a
    drop = ("time_s", "resumed_from")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in straight.items() if k not in drop}


def test_resume_refuses_other_labels_and_starts_fresh_without_a_checkpoint(tmp_path, capsys):
    exs = fd.synthetic_classification(64, seed=1)
    src = _write(tmp_path / "src.jsonl", exs)
    out = tmp_path / "run"
    assert main([f"train.output_dir={out}", f"finetune.train_file={src}", "train.checkpoint_interval=2", "--resume"]
                + TINY) == 0
    assert f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0" in capsys.readouterr().out
    # without --resume the directory's steps are refused, and the message names --resume
    assert main([f"train.output_dir={out}", f"finetune.train_file={src}", "train.checkpoint_interval=2"] + TINY) == 2
    assert "pass --resume to continue that run" in capsys.readouterr().err
    renamed = _write(tmp_path / "renamed.jsonl", [{**e, "label": e["label"].upper()} for e in exs])
    assert main([f"train.output_dir={out}", f"finetune.train_file={renamed}", "train.checkpoint_interval=2",
                 "--resume"] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --resume: checkpoint {out / 'checkpoints'}/") and "was trained on labels " \
        "[food, music, sports, weather] but this run's data gives [FOOD, MUSIC, SPORTS, WEATHER]" in err, err


def test_a_token_that_is_not_a_string_names_file_line_and_index(tmp_path):
    """Tokens went through str(): a JSON null became the word "None" (a list the word "[1, 2]") and trained
    silently; now the line is refused, naming the token."""
    f = tmp_path / "ner.jsonl"
    for token, shown, hint in ((None, "null", ""), (3, "3", ' ("3")'), ([1, 2], "[1, 2]", "")):
        f.write_text('{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n'
                     + json.dumps({"tokens": ["a", token], "tags": ["O", "O"]}) + "\n")
        with pytest.raises(DataError) as e:
            fd.read_jsonl(f, "token_classification")
        assert str(e.value) == f"{f}:2: token 1 is {shown}, not a string; give every token as a JSON string{hint}"
