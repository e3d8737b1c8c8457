"""What the top kernels of a profile are: ``python -m benchmarks.fusion_report TRACE_DIR HLO_TXT [N] [--library]``.

Joins ``trace_top``'s per-kernel totals with the compiled step's optimized HLO (``bench --hlo FILE``): for each of
the N most expensive XLA fusions it prints the fusion instruction (result shape, operands) and the ops of its fused
computation, without metadata, so a kernel name like ``input_add_reduce_fusion_8`` becomes readable.

``--library``: the kernels XLA does not name after an instruction (cuBLAS ``nvjet_*``, cuDNN, CUTLASS ``sm90_xmma``),
joined through the ``hlo_op`` each trace event carries: per (kernel, HLO op) its time and mean duration, and the
custom call with its layouts kept (``{1,0}``), its operands' producers and the GEMM's dot dimensions and epilogue,
so two GEMMs of one shape that run at different speeds can be told apart by what feeds them. A kernel launched
inside one of XLA's CUDA graphs carries the graph's thunk (``command_buffer_N``) as its ``hlo_op``, not the GEMM's
(session 15, H100: all but the FFI GEMMs): profile with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to attribute
those, at the graphs' cost (0.74 ms a GPT-2 step, session 13).
"""

import collections
import re
import sys

from benchmarks.trace_top import kernel_totals
from jzero.profiler import device_events

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


_CONFIG_KEYS = re.compile(r'"(lhs_contracting_dimensions|rhs_contracting_dimensions|lhs_batch_dimensions|'
                          r'rhs_batch_dimensions)":\[([^\]]*)\]|"epilogue":"(\w+)"')


def gemm_config(line: str) -> str:
    """The dot dimension numbers and epilogue of a GEMM custom call's backend_config, compactly."""
    parts = []
    for m in _CONFIG_KEYS.finditer(line):
        if m.group(3):
            parts.append(f"epilogue={m.group(3)}")
        else:
            short = "".join(w[0] for w in m.group(1).split("_")[:2])   # lc, rc, lb, rb
            parts.append(f"{short}=[{m.group(2).replace(chr(34), '')}]")
    return " ".join(parts)


def operands(line: str) -> list[str]:
    """The operand names of an instruction line: the ``%name``s inside its opcode's parentheses (after the result
    shape, which may be a tuple)."""
    rhs = line.split(" = ", 1)[-1]
    i = _balanced(rhs, 0) if rhs.startswith("(") else rhs.find(" ")
    m = re.compile(r"\s*[\w\-]+\(").match(rhs, i)
    if not m:
        return []
    inner = rhs[m.end() - 1:_balanced(rhs, m.end() - 1)]
    return re.findall(r"%([\w.\-]+)", inner)


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def library_report(trace_dir: str, hlo_path: str, n: int = 15, steps: int = 3):
    """Per (library kernel, HLO op): ms a step, launches a step, mean us; the op's instruction with layouts and
    its GEMM config, and each operand's producing instruction (first 160 characters, layouts kept)."""
    _, instrs = parse(open(hlo_path).read())
    tot, cnt = collections.Counter(), collections.Counter()
    for e in device_events(trace_dir):
        op = (e.get("args") or {}).get("hlo_op", "")
        if e["name"] in instrs:
            continue
        tot[e["name"], op] += e.get("dur", 0)
        cnt[e["name"], op] += 1
    for (name, op), us in tot.most_common(n):
        c = cnt[name, op]
        print(f"\n### {name[:90]} <- {op or '(no hlo_op)'}: {us / 1e3 / steps:.3f} ms/step, x{c / steps:g}/step, "
              f"{us / c:.1f} us each")
        line = instrs.get(op.replace(".", "_"))
        if op.startswith("command_buffer"):
            print("  (inside a CUDA graph: the trace names the graph; XLA_FLAGS=--xla_gpu_enable_command_buffer= "
                  "names the op)")
        if line is None:
            continue
        print("  " + re.sub(r", (metadata|backend_config)=.*$", "", line)[:400])
        cfg = gemm_config(line)
        if cfg:
            print("  gemm: " + cfg)
        for o in operands(line):
            src = instrs.get(o.replace(".", "_"))
            if src:
                print("    <- " + re.sub(r", (metadata|backend_config)=.*$", "", src)[:160])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--library"]
    fn = library_report if "--library" in sys.argv else report
    fn(args[0], args[1], int(args[2]) if len(args) > 2 else 15)
