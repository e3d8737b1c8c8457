"""What the top kernels of a profile are: ``python -m benchmarks.fusion_report TRACE_DIR HLO_TXT [N]``.

Joins ``trace_top``'s per-kernel totals with the compiled step's optimized HLO (``bench --hlo FILE``): for each of
the N most expensive XLA fusions it prints the fusion instruction (result shape, operands) and the ops of its fused
computation, without metadata, so a kernel name like ``input_add_reduce_fusion_8`` becomes readable.
"""

import re
import sys

from benchmarks.trace_top import kernel_totals

_META = re.compile(r",? (metadata|backend_config|frontend_attributes|statistics)=(\{.*?\}|\".*?\")(?=,|$)")


def parse(hlo_text: str):
    comps, instrs, cur = {}, {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            continue
        if cur is None or not line.startswith("  "):
            continue
        line = line.strip()
        comps[cur].append(line)
        m = re.match(r"^(?:ROOT )?%(\S+) = ", line)
        if m:
            instrs[m.group(1).replace(".", "_")] = line   # kernel names use '_' where HLO names have '.' 
    return comps, instrs


def clean(line: str, width: int = 220) -> str:
    line = re.sub(r", metadata=\{[^}]*\}", "", line)
    line = re.sub(r", backend_config=.*$", "", line)
    line = re.sub(r"\{[0-9,]+\}", "", line)   # layouts
    return line[:width]


def report(trace_dir: str, hlo_path: str, n: int = 15, body: int = 40):
    comps, instrs = parse(open(hlo_path).read())
    tot, cnt, steps = kernel_totals(trace_dir)
    for name, us in tot.most_common(200):
        if name not in instrs:
            continue
        n -= 1
        if n < 0:
            break
        line = instrs[name]
        print(f"\n### {name}: {us / 1e3 / steps:.3f} ms/step, x{cnt[name] / steps:g}/step")
        print("  " + clean(line, 400))
        m = re.search(r"calls=%([\w.\-]+)", line)
        if m and m.group(1) in comps:
            for op in comps[m.group(1)][:body]:
                print("    " + clean(op))


if __name__ == "__main__":
    report(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 15)
