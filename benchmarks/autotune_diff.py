"""Compare XLA:GPU autotune result dumps (``--xla_gpu_dump_autotune_results_to=FILE``, text proto):
``python -m benchmarks.autotune_diff A.textproto B.textproto ...``.

Why: two runs of the same Llama-1B main on one H200 differed by 4% (BENCHMARKS.md, "Session 9") while each run's
windows agreed within 1 ms, which points at a per-process choice. XLA picks each GEMM's algorithm (and each Triton
fusion's tiles) by timing candidates at compile time; a noisy pick differs between processes. This prints, per
file, how many entries it holds and how many choices differ from the first file's (run times left out).
"""

from __future__ import annotations

import re
import sys


def entries(text: str) -> dict[str, str]:
    """``results { ... }`` blocks keyed by their ``hlo`` (and device), valued by the chosen result with the
    measured times stripped (``run_time`` / ``duration`` sub-messages and ``seconds``/``nanos`` fields)."""
    out: dict[str, str] = {}
    blocks = re.split(r"(?m)^results\s*\{", text)[1:]
    for b in blocks:
        hlo = re.search(r'(?m)^\s*hlo:\s*"((?:[^"\\]|\\.)*)"', b)
        dev = re.search(r'(?m)^\s*device:\s*"((?:[^"\\]|\\.)*)"', b)
        key = (dev.group(1) if dev else "") + "|" + (hlo.group(1) if hlo else b[:200])
        kept = [ln.strip() for ln in b.splitlines()
                if not re.match(r"\s*(seconds|nanos|hlo|device):", ln) and ln.strip() not in ("", "}")
                and not re.match(r"\s*run_time\s*\{", ln)]
        out[key] = " ".join(kept)
    return out


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        raise SystemExit("usage: python -m benchmarks.autotune_diff A.textproto B.textproto [...]")
    tables = []
    for p in paths:
        with open(p) as f:
            tables.append(entries(f.read()))
    first = tables[0]
    for p, t in zip(paths, tables):
        common = set(first) & set(t)
        diff = [k for k in common if first[k] != t[k]]
        print(f"{p}: {len(t)} entries, {len(common)} shared with {paths[0]}, {len(diff)} choices differ")
        for k in diff[:5]:
            print(f"   {k.split('|')[1][:90]!r}\n     first: {first[k][:160]}\n     this:  {t[k][:160]}")


if __name__ == "__main__":
    main(sys.argv[1:])
