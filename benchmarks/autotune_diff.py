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
    """The dump's entries keyed by what they tune, valued by the chosen config with measured times stripped.

    Two formats: jax 0.11's ``entries { key { target { device, hlo_fingerprint } ... } value { optimal_config
    ... } }`` and the older ``results { device hlo result { ... run_time { ... } } }``."""
    out: dict[str, str] = {}
    new = re.split(r"(?m)^entries\s*\{", text)[1:]
    for b in new:
        fp = re.search(r'hlo_fingerprint:\s*"(\w+)"', b)
        dev = re.search(r'device:\s*"([^"]*)"', b)
        value = b[b.index("value {"):] if "value {" in b else b
        key = (dev.group(1) if dev else "") + "|" + (fp.group(1) if fp else b[:200])
        out[key] = _strip(value)
    for b in re.split(r"(?m)^results\s*\{", text)[1:]:
        hlo = re.search(r'(?m)^\s*hlo:\s*"((?:[^"\\]|\\.)*)"', b)
        dev = re.search(r'(?m)^\s*device:\s*"((?:[^"\\]|\\.)*)"', b)
        key = (dev.group(1) if dev else "") + "|" + (hlo.group(1) if hlo else b[:200])
        out[key] = _strip(b)
    return out


def _strip(block: str) -> str:
    """One line of the block without braces, keys, devices and measured times."""
    kept = [ln.strip() for ln in block.splitlines()
            if not re.match(r"\s*(seconds|nanos|hlo|device|hlo_fingerprint):", ln) and ln.strip() not in ("", "}")
            and not re.match(r"\s*run_time\s*\{", ln)]
    return " ".join(kept)


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
