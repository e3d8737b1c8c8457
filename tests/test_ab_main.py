"""benchmarks.ab_main: variant specs, the interleaved summary (medians, difference from the first variant), and
one real interleaved run of the main on CPU (tiny config) whose rows carry each variant's environment."""
import json

import pytest

from benchmarks import ab_main

TINY = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
        "data.seq_len=32", "train_batch_size=8", "train_micro_batch_size_per_gpu=1", "data.default_corpus_bytes=200000"]


def test_variant_specs_parse_and_bad_ones_name_themselves():
    assert ab_main.parse_variant("shipped=") == ("shipped", {})
    assert ab_main.parse_variant("x=JZERO_WEIGHT_COPIES=0;JZERO_KERNELS=a,b") == (
        "x", {"JZERO_WEIGHT_COPIES": "0", "JZERO_KERNELS": "a,b"})
    for bad in ("noequals", "=K=V", "x=K"):
        with pytest.raises(SystemExit, match=f"--variant '{bad}'"):
            ab_main.parse_variant(bad)


def test_summary_is_medians_and_the_difference_from_the_first_variant():
    runs = {"a": [{"step_ms": 10.0, "mfu": 0.5}, {"step_ms": 12.0, "mfu": 0.4}, {"step_ms": 11.0, "mfu": 0.45}],
            "b": [{"step_ms": 9.0, "mfu": 0.55}, {"step_ms": 10.0, "mfu": 0.5}],
            "c": []}
    s = ab_main.summarize(runs)
    assert [x["median_ms"] for x in s] == [11.0, 9.5, None]
    assert s[1]["vs_first_ms"] == pytest.approx(-1.5) and s[1]["vs_first_pct"] == pytest.approx(-100 * 1.5 / 11)
    assert s[0]["median_mfu"] == 0.45 and s[2]["vs_first_ms"] is None
    text = ab_main.table(s)
    assert "| b | 9.00, 10.00 | 9.50 | 52.5% | -1.50 ms (-13.6%) |" in text and "| c | failed | n/a | n/a |" in text


def test_interleaved_runs_of_the_main(tmp_path, capsys):
    out = tmp_path / "ab.jsonl"
    rc = ab_main.main(["--rounds", "1", "--steps", "1", "--variant", "plain=", "--variant",
                       "no-copies=JZERO_WEIGHT_COPIES=0", "--json", str(out)] + TINY)
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["round"], r["env"]) for r in rows] == [
        ("plain", 1, {}), ("no-copies", 1, {"JZERO_WEIGHT_COPIES": "0"})]
    assert all(r["step_ms"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "| variant | runs (ms/step) |" in text and "| no-copies |" in text
