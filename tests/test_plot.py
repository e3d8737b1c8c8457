"""train.plot: reading run dirs, curves, differing config keys, the table and the PNG from the CLI."""
import json

import pytest

from jzero.errors import JzeroError
from train.plot import curve, differing_keys, eval_curve, load_run, main, read_jsonl, result_cells


def _make_run(d, lr, losses, summary=True, config_extra=None):
    d.mkdir(parents=True)
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": lr}}, "train": {"output_dir": str(d), "steps": 3},
           **(config_extra or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    lines = [{"step": i + 1, "loss": l, "lr": lr} for i, l in enumerate(losses)]
    lines.append({"step": len(losses), "eval_loss": losses[-1] + 0.1, "eval_ppl": 9.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "final_loss": losses[-1], "steps": len(losses), "tokens_per_s": 12345.4, "mfu": 0.4321,
            "memory_per_device_bytes": {"params": 3 * 2**30, "opt_state": 2**29}, "peak_memory_bytes": None}))


def test_cli_writes_table_and_png(tmp_path, capsys):
    _make_run(tmp_path / "a", 1e-3, [3.0, 2.5, 2.0])
    _make_run(tmp_path / "b", 3e-3, [3.0, 2.0], summary=False)
    out, table = tmp_path / "plots" / "loss.png", tmp_path / "t.md"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--table", str(table)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.read_text().splitlines() == [
        "| run | optimizer.params.lr | final_loss | tokens/s | mfu | memory/device | status |",
        "|---|---|---|---|---|---|---|",
        "| a | 0.001 | 2.0000 | 12,345 | 43.2% | 3.5 GiB | done |",
        "| b | 0.003 | n/a | n/a | n/a | n/a | unfinished |",
    ]
    assert capsys.readouterr().out.startswith("| run | optimizer.params.lr |")


def test_curve_dedupes_resumed_steps_and_reads_eval():
    metrics = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}, {"step": 2, "loss": 2.5},
               {"step": 3, "loss": 2.0}, {"step": 3, "eval_loss": 2.2}]
    assert curve(metrics) == ([1, 2, 3], [3.0, 2.5, 2.0])
    assert curve(metrics, "eval_loss") == ([3], [2.2]) == eval_curve(metrics)
    # train.finetune's eval lines carry val_loss: the plot drew no eval curve for a fine-tune
    assert eval_curve([{"step": 5, "loss": 1.4}, {"step": 5, "epoch": 1, "val_loss": 1.0, "accuracy": 0.5}]) == \
        ([5], [1.0])


def test_differing_keys_and_missing_files(tmp_path):
    _make_run(tmp_path / "a", 1e-3, [1.0], config_extra={"zero_optimization": {"stage": 1}})
    _make_run(tmp_path / "b", 1e-3, [1.0], config_extra={"zero_optimization": {"stage": 3}})
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    assert differing_keys(runs) == ["zero_optimization.stage"]  # output_dir differs too but is ignored
    empty = load_run(tmp_path / "missing")
    assert (empty.config, empty.metrics, empty.summary) == (None, [], None)
    assert result_cells(None) == {"final_loss": "n/a", "tokens/s": "n/a", "mfu": "n/a", "memory/device": "n/a"}
    # an offloaded run's host memory is not on the device: 1 GiB of params + 0.5 GiB of copies, 8 GiB on the host
    offloaded = {"memory_per_device_bytes": {"params": 2**30, "weight_copies": 2**29, "opt_state": 0, "host": 2**33}}
    assert result_cells(offloaded)["memory/device"] == "1.5 GiB"


def test_torn_last_line_is_dropped_but_corruption_raises(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl(p) == [{"step": 1, "loss": 2.0}]
    p.write_text('{"step": 1\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(JzeroError, match="metrics.jsonl:1: not a JSON line"):
        read_jsonl(p)
    with pytest.raises(JzeroError, match="not a run directory"):
        main([str(tmp_path / "nope")])
