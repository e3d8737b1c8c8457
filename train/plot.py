"""Loss curves and a markdown results table for any set of run directories.

    python -m train.plot RUN_DIR [RUN_DIR...] [--out loss.png] [--table results.md]

A run directory is what ``train.pretrain`` or ``train.finetune`` writes: ``config.json``, ``metrics.jsonl`` (train
lines carry ``loss``, eval lines ``eval_loss``, or ``val_loss`` for a fine-tune) and, once finished, ``summary.json``. The table's leading columns are the
config keys whose values differ between the runs; ``train.sweep`` calls the same functions with its swept keys.
matplotlib is imported only when a plot is drawn (Agg canvas, no display, no pyplot global state).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from jzero.errors import JzeroError
from jzero.monitor import human_bytes
from train._main import ArgumentParser

RESULT_COLUMNS = ("final_loss", "tokens/s", "mfu", "memory/device", "status")


@dataclass
class Run:
    """One run directory's files, each None/empty when absent."""

    name: str
    path: Path
    config: Optional[dict]
    metrics: list
    summary: Optional[dict]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) is dropped, other bad lines raise."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise JzeroError(f"{path}:{i + 1}: not a JSON line; the metrics file is corrupted") from None
    return out


def _read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JzeroError(f"{path}: not valid JSON ({e}); delete it or rerun the run") from None


def load_run(path: str | Path, name: Optional[str] = None) -> Run:
    """Read a run directory (missing files allowed: an unfinished or failed run)."""
    path = Path(path)
    return Run(name=name or path.name, path=path, config=_read_json(path / "config.json"),
               metrics=read_jsonl(path / "metrics.jsonl"), summary=_read_json(path / "summary.json"))


def curve(metrics: Iterable[dict], key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for m in metrics:
        if m.get(key) is not None and "step" in m:
            by_step[int(m["step"])] = float(m[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


#: the eval loss of each main's metrics.jsonl: train.pretrain's ``eval_loss`` lines, train.finetune's ``val_loss``
EVAL_KEYS = ("eval_loss", "val_loss")


def eval_curve(metrics: Sequence[dict]) -> tuple[list[int], list[float]]:
    """(steps, values) of the run's eval loss, whichever main wrote it (:data:`EVAL_KEYS`)."""
    for key in EVAL_KEYS:
        steps, values = curve(metrics, key)
        if steps:
            return steps, values
    return [], []


def plot_losses(runs: Sequence[Run], out: str | Path, title: str = "loss") -> Path:
    """All runs' training loss (solid) and eval loss (dashed, same colour) on one PNG; returns its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise JzeroError("drawing loss curves needs matplotlib; pip install matplotlib") from None
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in runs:
        steps, losses = curve(run.metrics, "loss")
        (line,) = ax.plot(steps, losses, label=run.name, linewidth=1.2)
        esteps, elosses = eval_curve(run.metrics)
        if esteps:
            ax.plot(esteps, elosses, linestyle="--", marker="o", markersize=3, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (dashed: eval)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted keys that overrides and sweeps use."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing_keys(runs: Sequence[Run], ignore: Iterable[str] = ("train.output_dir",)) -> list[str]:
    """Dotted config keys whose values are not the same in every run (order of first appearance)."""
    flat = [flatten(r.config or {}) for r in runs]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys and k not in ignore]
    missing = object()
    return [k for k in keys if len({json.dumps(f.get(k, missing), default=str) for f in flat}) > 1]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict, bool)):
        return json.dumps(v)
    return str(v)


def result_cells(summary: Optional[dict]) -> dict[str, str]:
    """final_loss, tokens/s, mfu and the bytes of params, weight copies and optimizer state on one device (not
    host-offloaded state), formatted, from a summary.json."""
    s = summary or {}
    loss = s.get("final_loss")
    tps = s.get("tokens_per_s")
    mfu = s.get("mfu")
    mem = s.get("memory_per_device_bytes")
    # on the device only: "host" (optimizer offload's pinned host memory) is not on the device
    mem_total = (sum(v for k, v in mem.items() if k != "host" and isinstance(v, (int, float)))
                 if isinstance(mem, dict) else None)
    return {
        "final_loss": "n/a" if loss is None else f"{loss:.4f}",
        "tokens/s": "n/a" if tps is None else f"{round(tps):,}",
        "mfu": "n/a" if mfu is None else f"{100 * mfu:.1f}%",
        "memory/device": human_bytes(mem_total),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table; cells are strings (``|`` escaped)."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(runs: Sequence[Run], keys: Sequence[str], values: Optional[Sequence[dict]] = None,
                  statuses: Optional[Sequence[str]] = None) -> str:
    """One row per run: the ``keys`` columns (from ``values`` or the run's config), then RESULT_COLUMNS."""
    rows = []
    for i, run in enumerate(runs):
        vals = values[i] if values is not None else flatten(run.config or {})
        row = {"run": run.name, **{k: _fmt(vals.get(k)) for k in keys}, **result_cells(run.summary)}
        row["status"] = statuses[i] if statuses is not None else ("done" if run.summary else "unfinished")
        rows.append(row)
    return markdown_table(rows, ["run", *keys, *RESULT_COLUMNS])


def _names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (train.output_dir of each run)")
    ap.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG of the loss curves (default loss.png)")
    ap.add_argument("--table", type=Path, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    for p in args.runs:
        if not p.is_dir():
            raise JzeroError(f"{p}: not a run directory; pass the train.output_dir of a run")
    runs = [load_run(p, n) for p, n in zip(args.runs, _names(args.runs))]
    table = results_table(runs, differing_keys(runs))
    print(table, end="")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    print(f"wrote {plot_losses(runs, args.out)}")
    return 0


if __name__ == "__main__":
    from train._main import exit_with

    exit_with(main)
