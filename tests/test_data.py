"""jzero.data and train.prepare_data: token files, windows, global batches per process, resume, errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from jzero import data
from jzero.errors import DataError
from train import prepare_data


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _token_dir(tmp_path: Path, n_tokens: int, seed: int = 0) -> Path:
    """A prepared-looking directory whose train.bin holds n_tokens random uint16 ids."""
    out = tmp_path / "tok"
    out.mkdir()
    ids = np.random.default_rng(seed).integers(0, 60000, n_tokens).astype(np.uint16)
    ids.tofile(out / "train.bin")
    ids[: n_tokens // 4].tofile(out / "val.bin")
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 60000}))
    return out


# ------------------------------------------------------------------------------------------ prepare_data

def test_prepare_bytes_streams_files_in_order_and_splits_val(tmp_path):
    d = tmp_path / "corpus"
    b = _write(d / "b.txt", "second file\n")
    a = _write(d / "sub" / "a.txt", "first file é\n")  # sub/a.txt sorts after b.txt
    _write(d / ".hidden", "skipped")
    single = _write(tmp_path / "z.txt", "héllo wörld " * 20)
    out = tmp_path / "out"
    rc = prepare_data.main(["--input", str(single), str(d), "--output-dir", str(out), "--val-fraction", "0.1"])
    assert rc == 0
    stream = single.read_bytes() + b.read_bytes() + a.read_bytes()
    expected = np.frombuffer(stream, np.uint8).astype(np.uint16)
    n_val = int(len(expected) * 0.1)
    train = np.fromfile(out / "train.bin", np.uint16)
    val = np.fromfile(out / "val.bin", np.uint16)
    np.testing.assert_array_equal(train, expected[: len(expected) - n_val])
    np.testing.assert_array_equal(val, expected[len(expected) - n_val:])
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"dtype": "uint16", "vocab_size": 256, "n_train_tokens": len(expected) - n_val,
                    "n_val_tokens": n_val, "tokenizer": "bytes", "sources": 3, "skipped": 0}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_with_tokenizer_json_matches_encode_and_uses_uint32_for_big_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    texts = ["w1 w69999 w5\nw42 nope", "w65536 w7"]
    files = [_write(tmp_path / "in" / f"{i}.txt", t) for i, t in enumerate(texts)]
    meta = data.prepare([tmp_path / "in"], tmp_path / "out", tokenizer=tok_path, val_fraction=0.25)
    ids = [i for t in texts for i in tok.encode(t).ids]
    assert ids == [2, 70000, 6, 43, 0, 65537, 8]
    n_val = int(len(ids) * 0.25)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["sources"] == len(files)
    assert meta["tokenizer"] == str(tok_path.resolve())
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "train.bin", np.uint32), ids[:-n_val])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "val.bin", np.uint32), ids[-n_val:])


def test_prepare_missing_input_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"nope\.txt not found") as e:
        data.prepare([missing], tmp_path / "out")
    assert "\n" not in str(e.value)
    assert prepare_data.main(["--input", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert "error: input" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"tok\.json not found"):
        data.prepare([_write(tmp_path / "a.txt", "x")], tmp_path / "out", tokenizer=tmp_path / "tok.json")


def test_default_corpus_dir_builds_from_stdlib_with_cap_and_reuses_cache(tmp_path, monkeypatch):
    import __future__
    monkeypatch.setenv("JZERO_CACHE", str(tmp_path))
    out = data.default_corpus_dir(max_bytes=200_000)
    assert out == tmp_path / "stdlib_bytes_200000"
    meta = data.read_meta(out)
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == 200_000
    assert meta["n_val_tokens"] == 2_000 and meta["tokenizer"] == "bytes" and meta["max_bytes"] == 200_000
    first = Path(__future__.__file__).read_bytes()  # "__future__.py" sorts first in the stdlib
    train = np.fromfile(out / "train.bin", np.uint16)
    np.testing.assert_array_equal(train[: len(first)], np.frombuffer(first, np.uint8))
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert data.default_corpus_dir(max_bytes=200_000) == out
    assert (out / "train.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = data.default_corpus_dir(max_bytes=100_000)  # another cap: its own directory, this one untouched
    assert other == tmp_path / "stdlib_bytes_100000" and data.read_meta(other)["n_train_tokens"] == 99_000
    assert data.read_meta(out)["n_train_tokens"] == 198_000


# ------------------------------------------------------------------------------------------ reading

def test_token_source_windows_equal_numpy_slices(tmp_path):
    d = _token_dir(tmp_path, 1000)
    tokens = np.fromfile(d / "train.bin", np.uint16)
    src = data.TokenSource(d / "train.bin", seq_len=16)
    assert len(src) == (1000 - 1) // 16 == 62
    for i in (0, 1, 61):
        rec = src[i]
        assert rec.dtype == np.int32 and rec.shape == (17,)
        np.testing.assert_array_equal(rec, tokens[i * 16: i * 16 + 17])
    with pytest.raises(IndexError):
        src[62]
    explicit = data.TokenSource(d / "val.bin", seq_len=8, dtype="uint16")
    np.testing.assert_array_equal(explicit[3], tokens[24:33])


def test_batch_iterator_unshuffled_order_and_shapes(tmp_path):
    d = _token_dir(tmp_path, 2000)
    src = data.TokenSource(d / "train.bin", seq_len=8)  # 249 records
    it = data.BatchIterator(d / "train.bin", seq_len=8, global_batch_rows=8, accum_steps=2, shuffle=False)
    assert it.shape == (2, 4, 9)
    for step in range(3):
        batch = next(it)
        assert batch.shape == (2, 4, 9) and batch.dtype == np.int32
        expected = np.stack([src[step * 8 + k] for k in range(8)]).reshape(2, 4, 9)
        np.testing.assert_array_equal(batch, expected)
    assert it.step == 3
    it.close()


@pytest.mark.parametrize("rows,accum,processes", [(8, 8, 1), (1, 1, 1), (4, 2, 2)])
def test_batch_iterator_with_one_row_per_micro_batch(tmp_path, rows, accum, processes):
    """One row per micro-batch per process (an 8-stage pipeline of 8 micro-batches, or batch 1): the records in
    order, as with more rows (grain's len of batch(1) over an endless repeat overflowed here)."""
    d = _token_dir(tmp_path, 2000)
    src = data.TokenSource(d / "train.bin", seq_len=8)
    its = [data.BatchIterator(d / "train.bin", seq_len=8, global_batch_rows=rows, accum_steps=accum, shuffle=False,
                              process_index=p, process_count=processes) for p in range(processes)]
    for step in range(2):
        got = np.concatenate([next(it) for it in its], axis=1)   # each process's rows of every micro-batch
        assert got.shape == (accum, 1 * processes, 9)
        np.testing.assert_array_equal(got.reshape(rows, 9), np.stack([src[step * rows + k] for k in range(rows)]))
    for it in its:
        it.close()


def test_batch_iterator_shuffles_each_epoch_as_a_permutation(tmp_path):
    d = _token_dir(tmp_path, 16 * 4 + 1)  # exactly 16 records of seq_len 4
    src = data.TokenSource(d / "train.bin", seq_len=4)
    it = data.BatchIterator(d / "train.bin", seq_len=4, global_batch_rows=8, seed=3)
    epochs = [np.concatenate([next(it)[0] for _ in range(2)]) for _ in range(2)]
    index_of = {src[i].tobytes(): i for i in range(len(src))}
    orders = [[index_of[row.tobytes()] for row in e] for e in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(16))
    assert orders[0] != list(range(16)) and orders[0] != orders[1]


def test_two_processes_concatenate_to_the_one_process_batch(tmp_path):
    d = _token_dir(tmp_path, 3000)
    kw = dict(seq_len=8, global_batch_rows=8, accum_steps=2, seed=7, prefetch=0)
    one = data.BatchIterator(d / "train.bin", **kw)
    two = [data.BatchIterator(d / "train.bin", process_index=p, process_count=2, **kw) for p in range(2)]
    for _ in range(40):  # 40 steps x 8 rows > 374 records: crosses an epoch boundary
        parts = [next(t) for t in two]
        assert parts[0].shape == (2, 2, 9)
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), next(one))


def test_resume_from_state_yields_the_same_batches_on_any_process_count(tmp_path):
    d = _token_dir(tmp_path, 3000)
    kw = dict(seq_len=8, global_batch_rows=8, accum_steps=2, seed=11)
    ref = data.BatchIterator(d / "train.bin", **kw)
    for _ in range(5):
        next(ref)
    state = json.loads(json.dumps(ref.get_state()))
    assert state["step"] == 5
    expected = [next(ref) for _ in range(3)]
    resumed = data.BatchIterator(d / "train.bin", **kw)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)
    halves = [data.BatchIterator(d / "train.bin", process_index=p, process_count=2, **kw) for p in range(2)]
    for h in halves:
        h.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(np.concatenate([next(h) for h in halves], axis=1), want)
    other_seed = data.BatchIterator(d / "train.bin", **{**kw, "seed": 12})
    with pytest.raises(DataError, match="seed=11 but this run has seed=12"):
        other_seed.set_state(state)
    old_state = {k: v for k, v in state.items() if k != "data_fingerprint"}   # saved before fingerprints
    resumed = data.BatchIterator(d / "train.bin", **kw)
    resumed.set_state(old_state)
    np.testing.assert_array_equal(next(resumed), expected[0])
    # data prepared again from other text, same token count (another directory here: the iterators above still
    # map this one's file): refused, not continued
    (tmp_path / "again").mkdir()
    changed = data.BatchIterator(_token_dir(tmp_path / "again", 3000, seed=99) / "train.bin", **kw)
    assert len(changed.source) == state["n_records"] and changed.fingerprint != state["data_fingerprint"]
    with pytest.raises(DataError, match=r"data iterator state was saved over other training data than .*train.bin "
                                        r"holds now \(content fingerprint [0-9a-f]{16} vs [0-9a-f]{16}"):
        changed.set_state(state)


def test_token_fingerprint_sees_a_change_anywhere_sampled_and_the_length():
    ids = np.arange(100_000, dtype=np.uint16)
    base = data.token_fingerprint(ids)
    assert data.token_fingerprint(ids.copy()) == base and len(base) == 16
    assert data.token_fingerprint(ids[:-1]) != base
    for at in (0, (100_000 - 4096) * 7 // 15 + 10, 99_999):   # first, in the 8th sampled run, last token
        other = ids.copy()
        other[at] += 1
        assert data.token_fingerprint(other) != base, at
    assert data.token_fingerprint(np.zeros(0, np.uint16)) != data.token_fingerprint(np.zeros(0, np.uint32))


def test_eval_batches_in_file_order_sliced_per_process_and_wrapping(tmp_path):
    d = _token_dir(tmp_path, 2000)
    src = data.TokenSource(d / "val.bin", seq_len=8)  # 500 tokens -> 62 records
    full = list(data.eval_batches(d / "val.bin", seq_len=8, rows=4))
    assert len(full) == 15
    np.testing.assert_array_equal(full[2], np.stack([src[k] for k in range(8, 12)]))
    parts = [list(data.eval_batches(d / "val.bin", 8, 4, n_batches=16, process_index=p, process_count=2))
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([parts[0][2], parts[1][2]]), full[2])
    np.testing.assert_array_equal(parts[1][15], np.stack([src[62 % 62], src[63 % 62]]))  # wraps to the start


# ------------------------------------------------------------------------------------------ errors

def test_errors_name_file_and_numbers(tmp_path):
    missing = tmp_path / "data" / "train.bin"
    with pytest.raises(DataError, match=r"data/train\.bin not found; run python -m train\.prepare_data"):
        data.BatchIterator(missing, seq_len=8, global_batch_rows=8)
    missing.parent.mkdir()
    with pytest.raises(DataError, match=rf"{missing.parent} is a directory without train\.bin; pass a token file, "
                                        r"or run python -m train\.prepare_data"):
        data.BatchIterator(missing.parent, seq_len=8, global_batch_rows=8)
    d = _token_dir(tmp_path, 100)
    assert data.TokenSource(d, seq_len=4).path == d / "train.bin"   # a prepared directory: its train split
    with pytest.raises(DataError, match=r"train\.bin has 100 tokens but one global batch of 16 rows x seq_len "
                                         r"8 needs 129; use a smaller train_batch_size or seq_len"):
        data.BatchIterator(d / "train.bin", seq_len=8, global_batch_rows=16)
    with pytest.raises(DataError, match=r"global batch rows 12 is not divisible by accum_steps 2 x "
                                         r"process_count 4 = 8"):
        data.BatchIterator(d / "train.bin", seq_len=4, global_batch_rows=12, accum_steps=2, process_count=4)
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json not found to give the dtype"):
        data.TokenSource(d / "train.bin", seq_len=4)


# ------------------------------------------------------------------------------------------ issue 20: bad data


def test_ids_beyond_the_vocab_are_refused_when_the_data_is_opened(tmp_path, capsys):
    """A text file copied in as train.bin (uint16 pairs of bytes, far past vocab 256) used to train on nan loss."""
    d = tmp_path / "d"
    assert prepare_data.main(["--input", str(_write(tmp_path / "a.txt", "abcdefgh" * 64)), "--output-dir", str(d),
                              "--val-fraction", "0.25"]) == 0
    assert data.max_token_id(d / "train.bin", "uint16") == ord("h")
    good = (d / "train.bin").read_bytes()
    (d / "new.bin").write_bytes(good[:20] + b"ab" + good[22:])   # one uint16 = 0x6261 = 25185 at token 10
    (d / "new.bin").replace(d / "train.bin")   # another file: the cached max of the good one does not apply
    msg = (rf"data file {d / 'train.bin'} holds token id 25185 \(first bad one at token 10\) >= vocab_size 256 of "
           rf"its meta.json, so it is not the token file meta.json describes; run python -m train.prepare_data")
    with pytest.raises(DataError, match=msg):
        data.TokenSource(d / "train.bin", seq_len=8)
    with pytest.raises(DataError, match="holds token id 25185"):
        data.BatchIterator(d / "train.bin", seq_len=8, global_batch_rows=2)
    from train.pretrain import main   # fails at once, before anything compiles, and writes nothing

    out = tmp_path / "o"
    assert main(["model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.seq_len=8", "train_batch_size=8",
                 f"data.path={d}", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data file") and "holds token id 25185" in err and "\n" not in err
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()


def test_prepare_output_dir_that_is_a_file_or_val_fraction_0_is_one_line(tmp_path, capsys):
    src = _write(tmp_path / "a.txt", "hello " * 100)
    (tmp_path / "file").write_text("keep me")
    assert prepare_data.main(["--input", str(src), "--output-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --output-dir {tmp_path / 'file'}: writing the token files failed (File exists: "
                   f"{tmp_path / 'file'}); pass a writable directory with free space")
    assert (tmp_path / "file").read_text() == "keep me"
    assert prepare_data.main(["--input", str(src), "--output-dir", str(tmp_path / "o"), "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --val-fraction 0.0 is out of range: val.bin gets that fraction of the tokens and "
                   "training evaluates on it; use a value in (0, 1), e.g. 0.01")
    assert not (tmp_path / "o").exists()


def test_a_val_split_too_short_to_evaluate_names_the_fix(tmp_path):
    d = _token_dir(tmp_path, 100)
    with pytest.raises(DataError, match=r"val\.bin has 25 tokens but one eval batch of 8 rows x seq_len 8 needs 65; "
                                         r".*prepare_data --val-fraction sets the size of val\.bin\), or set "
                                         r"train\.eval_interval=0"):
        next(data.eval_batches(d / "val.bin", seq_len=8, rows=8))


# ------------------------------------------------------------------------------------------ prepare: what is input


def test_prepare_again_with_output_inside_the_input_never_reads_prepared_files(tmp_path, capsys):
    """--output-dir inside --input used to read the last run's train.bin/val.bin/meta.json back in (the train
    tokens grew 237,600 -> 712,936 -> 1,663,607 over three runs); now every run writes the same files."""
    corpus = tmp_path / "corpus"
    text = _write(corpus / "a.txt", "hello world\n" * 50).read_bytes()   # 600 bytes
    out = corpus / "prep"
    runs = []
    for _ in range(3):
        assert prepare_data.main(["--input", str(corpus), "--output-dir", str(out), "--val-fraction", "0.1"]) == 0
        runs.append(((out / "train.bin").read_bytes(), (out / "val.bin").read_bytes(), data.read_meta(out)))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][2] == {"dtype": "uint16", "vocab_size": 256, "n_train_tokens": 540, "n_val_tokens": 60,
                          "tokenizer": "bytes", "sources": 1, "skipped": 0}
    np.testing.assert_array_equal(np.frombuffer(runs[0][0] + runs[0][1], np.uint16), np.frombuffer(text, np.uint8))
    assert capsys.readouterr().err == ""   # our own output dir is skipped without a notice
    # another prepared dataset in the corpus (meta.json + train.bin) is skipped too, with a notice; so are the
    # prepared files when --output-dir is the input directory itself, while the text beside them is still read
    (corpus / "sub").mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (corpus / "sub" / name).write_bytes((out / name).read_bytes())
    _write(corpus / "sub" / "notes.txt", "kept")
    for _ in range(2):
        assert prepare_data.main(["--input", str(corpus), "--output-dir", str(corpus), "--val-fraction", "0.1"]) == 0
        meta = data.read_meta(corpus)
        assert (meta["n_train_tokens"], meta["n_val_tokens"], meta["sources"]) == (544, 60, 2)
        err = capsys.readouterr().err.splitlines()
        assert err == [f"notice: skipped train.bin, val.bin, meta.json in {out}: a prepared dataset is token ids, "
                       "not text",
                       f"notice: skipped train.bin, val.bin, meta.json in {corpus / 'sub'}: a prepared dataset is "
                       "token ids, not text"]
    assert prepare_data.main(["--input", str(out), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: input directory {out} holds no files to read (hidden entries, "
                                       "__pycache__ and prepared train.bin/val.bin/meta.json are skipped); pass a "
                                       "directory with text files\n")


def test_byte_mode_refuses_a_named_binary_file_and_skips_a_walked_one(tmp_path, capsys, monkeypatch):
    """Byte mode used to write any binary file as tokens (5,000 random bytes became 4,950 train tokens). Now, as in
    tokenizer mode, a file that is not UTF-8 or holds a NUL byte is an error when named and skipped with a notice
    when found by a directory walk, its partial tokens removed."""
    from jzero import prepare as prep
    monkeypatch.setattr(prep, "_BLOCK_BYTES", 4)   # bad bytes past the first block: tokens are already written
    d = tmp_path / "corpus"
    text = _write(d / "a.txt", "héllo\n").read_bytes()                  # 7 bytes
    blob = d / "b" / "blob.bin"
    blob.parent.mkdir()
    blob.write_bytes("abcé".encode() + b"\xff\x00")                    # é crosses the block edge; 0xff at byte 5
    (d / "c.txt").write_bytes("hi".encode("utf-16-le"))                  # ASCII UTF-16: valid UTF-8 but NUL at 1
    (d / "d.txt").write_bytes(b"ok\n\xe9t\xc3")                         # latin-1 é at byte 3
    _write(d / "e.txt", "é")                                             # cut mid-character by the tail: fine
    out = tmp_path / "out"
    assert prepare_data.main(["--input", str(d), "--output-dir", str(out), "--val-fraction", "0.25"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"notice: skipped {blob}: not UTF-8 text (invalid start byte at byte 5); convert it to UTF-8 to include it",
        f"notice: skipped {d / 'c.txt'}: not UTF-8 text (NUL byte at byte 1); convert it to UTF-8 to include it",
        f"notice: skipped {d / 'd.txt'}: not UTF-8 text (invalid continuation byte at byte 3); convert it to UTF-8 "
        "to include it"]
    expected = np.frombuffer(text + "é".encode(), np.uint8)
    tokens = np.concatenate([np.fromfile(out / "train.bin", np.uint16), np.fromfile(out / "val.bin", np.uint16)])
    np.testing.assert_array_equal(tokens, expected)
    assert data.read_meta(out)["sources"] == 2 and data.read_meta(out)["skipped"] == 3
    for bad, why in ((blob, "invalid start byte at byte 5"), (d / "c.txt", "NUL byte at byte 1")):
        assert prepare_data.main(["--input", str(d / "a.txt"), str(bad), "--output-dir", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: input {bad} is not UTF-8 text ({why}); convert it to UTF-8 or "
                                           "leave it out\n")
    assert data.read_meta(out)["skipped"] == 3   # the refused runs left the last output as it was
    (tmp_path / "cut.txt").write_bytes("aé".encode() + b"\xff")
    meta = data.prepare([tmp_path / "cut.txt"], tmp_path / "o2", max_bytes=2, val_fraction=0.5)   # cut inside é
    assert (meta["n_train_tokens"], meta["n_val_tokens"]) == (1, 1)
    (tmp_path / "cut.txt").write_bytes(b"a\xc3")   # ... but a file that ends inside a character is not text
    with pytest.raises(DataError, match=r"^input .*cut\.txt is not UTF-8 text \(unexpected end of data at byte 1\)"):
        data.prepare([tmp_path / "cut.txt"], tmp_path / "o3")


def test_tokenizer_mode_skips_a_walked_non_utf8_file_and_names_the_byte_of_a_named_one(tmp_path, capsys):
    """Same rule as byte mode; the byte offset is in the file (it used to be in the decoder's chunk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    d = tmp_path / "in"
    _write(d / "1.txt", "a b a\n")
    (d / "2.txt").write_bytes(b"b\n" * 10_000 + b"\xff\n")   # bad byte at 20000, past the first text chunk
    out = tmp_path / "out"
    meta = data.prepare([d], out, tokenizer=tmp_path / "tok.json", val_fraction=0.5)
    assert capsys.readouterr().err == (f"notice: skipped {d / '2.txt'}: not UTF-8 text (invalid start byte at byte "
                                       "20000); convert it to UTF-8 to include it\n")
    assert (meta["n_train_tokens"], meta["n_val_tokens"], meta["sources"], meta["skipped"]) == (2, 1, 1, 1)
    with pytest.raises(DataError) as e:
        data.prepare([d / "2.txt"], out, tokenizer=tmp_path / "tok.json")
    assert str(e.value) == (f"input {d / '2.txt'} is not UTF-8 text (invalid start byte at byte 20000); convert it "
                            "to UTF-8 or leave it out")


def test_an_interrupted_prepare_over_a_dataset_is_never_read_as_complete(tmp_path, monkeypatch):
    """A prepare killed after renaming its new train.bin used to leave the old val.bin and meta.json beside it,
    read as complete: a re-run on a.txt + b.txt (2 x 9,200 bytes) over a.txt's dataset gave train.bin 16,560
    tokens next to a meta.json saying 8,280 and the old val.bin, whose 920 tokens were inside the new train.bin,
    and train.pretrain evaluated on them. Now meta.json is removed before the renames and written last, and a
    token file whose size is not meta.json's count is refused."""
    from jzero import prepare as prep
    a = _write(tmp_path / "a.txt", "alpha beta gamma delta\n" * 400)   # 9,200 bytes
    b = _write(tmp_path / "b.txt", "epsilon zeta eta theta\n" * 400)
    out = tmp_path / "d"
    assert data.prepare([a], out, val_fraction=0.1)["n_train_tokens"] == 8280
    real, renamed = prep.os.replace, []

    def killed_after_first_rename(src, dst):
        real(src, dst)
        renamed.append(Path(dst).name)
        raise KeyboardInterrupt   # (SIGKILL in the reproduction; the finally below it must not matter)

    monkeypatch.setattr(prep.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([a, b], out, val_fraction=0.1)
    monkeypatch.setattr(prep.os, "replace", real)
    assert renamed == ["train.bin"] and np.fromfile(out / "train.bin", np.uint16).size == 16560
    assert not (out / "meta.json").exists()   # the directory reads as not prepared
    with pytest.raises(DataError, match=r"meta\.json not found"):
        data.TokenSource(out / "val.bin", seq_len=8)
    # a token file whose size is not meta.json's count (replaced by hand, or by an older prepare) is refused too
    assert data.prepare([a, b], out, val_fraction=0.1)["n_train_tokens"] == 16560
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-4])
    with pytest.raises(DataError, match=rf"data file {out / 'val.bin'} holds 1838 tokens but its meta\.json says "
                                        r"n_val_tokens=1840: the file was replaced or a prepare was interrupted; "
                                        r"run python -m train\.prepare_data"):
        list(data.eval_batches(out / "val.bin", seq_len=8, rows=2, n_batches=1))
    assert data.TokenSource(out / "train.bin", seq_len=8).n_tokens == 16560


def test_a_file_reached_twice_by_input_is_refused_naming_both(tmp_path, capsys):
    """`--input corpus corpus/b.txt` used to read b.txt twice ("from 3 files" of 2): its second copy is the end of
    the stream, so val.bin (the last 10%) was text train.bin also held and evaluation scored memorised text."""
    corpus = tmp_path / "corpus"
    a, b = _write(corpus / "a.txt", "alpha\n" * 50), _write(corpus / "b.txt", "beta\n" * 50)
    out = tmp_path / "out"
    for argv, twice, how in (([corpus, b], b, f"as {b} in directory {corpus} and named as {b}"),
                             ([a, corpus / "." / "a.txt"], a, f"named as {a} and named as {a}"),
                             ([corpus, tmp_path / "." / "corpus"], a, f"as {a} in directory {corpus} and as {a} in "
                                                                      f"directory {corpus}")):
        assert prepare_data.main(["--input", *map(str, argv), "--output-dir", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: input file {twice} is reached twice by --input, {how}; pass "
                                           "each file once (a directory includes every file under it)\n")
    assert not out.exists()
    (corpus / "link.txt").symlink_to(b)   # two names of one file inside a directory
    with pytest.raises(DataError, match=rf"input file {b} is reached twice by --input, as {b} in directory "
                                        rf"{corpus} and as {corpus / 'link.txt'} in directory {corpus}"):
        data.prepare([corpus], out)
    (corpus / "link.txt").unlink()
    assert data.prepare([corpus], out, val_fraction=0.1)["sources"] == 2


def test_prepare_removes_the_temporaries_a_killed_run_left(tmp_path, capsys):
    """A prepare killed before its `finally` (SIGKILL, OOM) left all.bin.tmp-PID / val.bin.tmp-PID in --output-dir,
    and no later run removed them (all.bin.tmp is as large as the token stream). Now the next run removes those of
    processes that are gone, naming each, and leaves a running process's alone."""
    import os
    src = _write(tmp_path / "a.txt", "hello world\n" * 10)
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = 4_194_999, os.getppid()   # above Linux's largest pid_max (2**22): no such process
    (out / f"all.bin.tmp-{dead}").write_bytes(b"\0" * 240)
    (out / f"val.bin.tmp-{dead}").write_bytes(b"\0" * 24)
    (out / f"all.bin.tmp-{alive}").write_bytes(b"\0" * 8)   # (a prepare running beside this one)
    (out / "all.bin.tmp-notes").write_text("not ours")
    assert prepare_data.main(["--input", str(src), "--output-dir", str(out), "--val-fraction", "0.1"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"notice: removed {out / f'all.bin.tmp-{dead}'} (240 bytes): left by an interrupted prepare (process {dead} "
        "is gone)",
        f"notice: removed {out / f'val.bin.tmp-{dead}'} (24 bytes): left by an interrupted prepare (process {dead} "
        "is gone)"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["all.bin.tmp-notes", f"all.bin.tmp-{alive}", "meta.json",
                                                            "train.bin", "val.bin"])
    assert (data.read_meta(out)["n_train_tokens"], data.read_meta(out)["n_val_tokens"]) == (108, 12)


@pytest.mark.parametrize("template", ["[CLS] $A [SEP]", "<s> $A", None])
def test_a_huge_file_read_in_pieces_gets_the_tokenizers_special_tokens_once(tmp_path, monkeypatch, template):
    """A file over 16M characters is encoded in line-aligned pieces; each piece used to be encoded as a document,
    so a BERT tokenizer.json put [CLS]/[SEP] (a Llama one <s>) into it every 16M characters: 51 ids where
    tokenizers' encode of the file gives 47 (3 [CLS]). Now the ids are encode(file) whatever the piece size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from jzero import prepare as prep
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=[(t, vocab[t]) for t in template.split()
                                                                           if t != "$A"])
    tok.save(str(tmp_path / "tok.json"))
    texts = ["a b c d\n" * 12, "e f g\nh x\n"]   # 96 + 10 characters: 3 + 1 pieces of 4 lines
    files = [_write(tmp_path / "in" / f"{i}.txt", t) for i, t in enumerate(texts)]
    monkeypatch.setattr(prep, "_PIECE_CHARS", 30)
    meta = data.prepare(files, tmp_path / "out", tokenizer=tmp_path / "tok.json", val_fraction=0.1)
    want = [i for t in texts for i in tok.encode(t).ids]
    assert len(want) == 53 + {"[CLS] $A [SEP]": 4, "<s> $A": 2, None: 0}[template]
    got = np.concatenate([np.fromfile(tmp_path / "out" / n, np.uint16) for n in ("train.bin", "val.bin")])
    assert got.tolist() == want and meta["n_train_tokens"] + meta["n_val_tokens"] == len(want)


def test_tokenizer_mode_reads_a_huge_line_in_bounded_pieces_with_the_whole_texts_ids(tmp_path, monkeypatch):
    """Pieces were whole lines: a one-line file was one piece, and tokenizers takes ~220 bytes per character (a
    19 MB one-line file peaked at 3.8 GB RSS; with 1M-character pieces 0.33 GB, same ids). Now a long line is
    cut too, at word boundaries that leave GPT-2's byte-level pre-tokens whole, so the ids are encode(text)'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from jzero import prepare as prep
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "the", "fox", ",", "\n", "\n\n\n", "  "]
    text = " ".join(rng.choice(words, 400)) + "\n" + " ".join(rng.choice(words[:5], 300))   # a 1,500-char line
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "bpe.json"))
    path = _write(tmp_path / "big.txt", text)
    monkeypatch.setattr(prep, "_PIECE_CHARS", 64)
    pieces = [t for t, _ in prep._text_pieces(path)]
    assert "".join(pieces) == text and max(map(len, pieces)) <= 4 * 64 + 64 and len(pieces) > 3000 // 128
    data.prepare([path], tmp_path / "out", tokenizer=tmp_path / "bpe.json", val_fraction=0.1)
    got = np.concatenate([np.fromfile(tmp_path / "out" / n, np.uint16) for n in ("train.bin", "val.bin")])
    assert got.tolist() == tok.encode(text).ids


def test_val_split_is_the_exact_fraction_of_the_tokens(tmp_path):
    """100 tokens at --val-fraction 0.29 give 29 val tokens (int(100 * 0.29) would be 28: 28.999999999999996)."""
    src = tmp_path / "a.txt"
    src.write_bytes(b"x" * 100)
    data.prepare([src], tmp_path / "out", val_fraction=0.29)
    meta = data.read_meta(tmp_path / "out")
    assert (meta["n_train_tokens"], meta["n_val_tokens"]) == (71, 29)
