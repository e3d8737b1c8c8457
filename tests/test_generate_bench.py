"""The decode benchmark's table (benchmarks.generate_bench) from given rows: tokens/s and ms/token from the wall
time, failed rows kept with their note, the goal lines against HF. (The harness itself runs with --tiny on CPU;
nothing here is timed.)"""
from benchmarks import generate_bench as gb


def test_table_numbers_and_goals():
    args = gb.parse_args(["--tiny", "--batches", "1,4"])
    assert (args.prompt, args.new, args.batches) == (16, 16, [1, 4])
    rows = {("M", 1, "jzero"): {"seconds": 0.08, "note": ""}, ("M", 1, "jzero unrolled"): {"seconds": 0.04, "note": ""},
            ("M", 1, "hf eager"): {"seconds": 0.16, "note": "x"},
            ("M", 4, "jzero"): {"seconds": 0.16, "note": ""},
            ("M", 4, "hf static+compile"): {"seconds": None, "note": "timeout after 170 s"}}
    out = gb.table(rows, args).splitlines()
    assert out[0].startswith("| model | batch | impl | prompt | new | tokens/s | ms/token |")
    assert "| M | 1 | jzero | 16 | 16 | 200 | 5.00 |" in out[2]           # 1 x 16 tokens / 0.08 s; 80 ms / 16
    assert "| M | 1 | jzero unrolled | 16 | 16 | 400 | 2.50 |" in out[3]
    assert "| M | 4 | jzero | 16 | 16 | 400 | 10.00 |" in out[5]
    assert "| M | 4 | hf static+compile | 16 | 16 | - | - | timeout after 170 s |" in out[6]
    assert "- M batch 1: jzero unrolled 4.00x hf eager (goal >= 2.0x: met)" in out
    assert "- M batch 4: no comparison with hf static+compile (a row is missing)" in out
