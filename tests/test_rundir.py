"""jzero.rundir: one run per output directory; an unwritable one is one line naming the key (mains: exit 2)."""
import os
import subprocess

import pytest

from jzero import rundir
from jzero.errors import RunDirError
from train.pretrain import main

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.seq_len=16",
        "train_batch_size=8", "data.default_corpus_bytes=200000", "train.steps=2"]


def test_a_second_claim_fails_until_the_first_ends(tmp_path):
    with rundir.claim(tmp_path / "out"):
        assert f"pid {os.getpid()} on " in (tmp_path / "out" / rundir.LOCK_NAME).read_text()
        with pytest.raises(RunDirError, match=rf"train.output_dir={tmp_path / 'out'} is in use by another run "
                                              rf"\(pid {os.getpid()} on .* since .*\); wait for it to end"):
            with rundir.claim(tmp_path / "out"):
                pass
    with rundir.claim(tmp_path / "out"):   # released: the next run takes it
        pass


def test_second_run_into_a_busy_output_dir_fails_at_once_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.json").write_text("the first run's")
    (out / "metrics.jsonl").write_text("{}\n")
    with rundir.claim(out):
        assert main(TINY + [f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: train.output_dir={out} is in use by another run (pid ") and "\n" not in err
    assert (out / "config.json").read_text() == "the first run's" and (out / "metrics.jsonl").read_text() == "{}\n"


def test_a_checkpoint_dir_in_use_by_another_run_is_refused(tmp_path, capsys):
    """Run A checkpoints into its output dir; run B, another output dir but checkpoint.dir pointing at A's, would
    rotate A's steps away: the checkpoint directory is claimed too."""
    busy = tmp_path / "a" / "checkpoints"
    with rundir.claim(busy, "checkpoint.dir"):
        assert main(TINY + [f"train.output_dir={tmp_path / 'b'}", f"checkpoint.dir={busy}",
                            "train.checkpoint_interval=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint.dir={busy} is in use by another run (pid ") and "\n" not in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("make", ["file_in_the_way", "read_only"])
def test_unwritable_output_dir_is_one_line(tmp_path, capsys, request, make):
    if make == "file_in_the_way":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        if os.geteuid() == 0:   # root writes through permissions: a read-only mount stops it (EROFS)
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(out)],
                                 capture_output=True, text=True)
            if res.returncode:
                pytest.skip(f"root cannot mount a read-only tmpfs here ({res.stderr.strip()})")
            request.addfinalizer(lambda: subprocess.run(["umount", str(out)], check=True))
        else:
            out.chmod(0o500)
    assert main(TINY + [f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: train.output_dir={out} is not a writable directory (") and "\n" not in err, err
    assert err.endswith("set train.output_dir to a directory this user can write")


def test_an_earlier_runs_results_are_moved_aside_not_overwritten(tmp_path):
    from jzero.rundir import keep_earlier_results

    assert keep_earlier_results(tmp_path) is None   # nothing there: nothing moved
    (tmp_path / "metrics.jsonl").write_text("first\n")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("x")   # not a result file: stays
    first = keep_earlier_results(tmp_path)
    assert first.parent == tmp_path / "earlier" and sorted(p.name for p in first.iterdir()) == \
        ["metrics.jsonl", "summary.json"]
    assert (first / "metrics.jsonl").read_text() == "first\n" and (tmp_path / "keep.txt").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text("second\n")   # a second rerun within the same second: its own folder
    second = keep_earlier_results(tmp_path)
    assert second != first and (second / "metrics.jsonl").read_text() == "second\n"
    assert (first / "metrics.jsonl").read_text() == "first\n"
