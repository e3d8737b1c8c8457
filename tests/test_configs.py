"""Every shipped config parses, resolves, and builds the mesh it names on 8 fake devices where it fits;
the embedded default equals configs/default.yaml; a real 2x2 sweep of the main writes its table and plot."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jzero.config import load_config, read_config_file, resolve
from jzero.mesh import make_mesh
from train.pretrain import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep_example.yaml")
TINY = {"gpt2": ["model.preset=null", "model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.d_ff=128",
                 "model.vocab_size=256", "model.max_len=64"],
        "llama": ["model.preset=null", "model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.n_kv_head=4",
                  "model.d_ff=128", "model.vocab_size=256", "model.max_len=64"],
        "bert": []}


def test_embedded_default_is_configs_default_yaml():
    assert read_config_file(ROOT / "configs/default.yaml") == DEFAULT_CONFIG


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_builds_its_mesh(path):
    cfg = load_config(path)
    sizes = {"data": cfg.mesh.data, "tensor": cfg.mesh.tensor, "pipeline": cfg.mesh.pipeline}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if 8 % fixed:
        pytest.skip(f"{path.name} names {fixed} model-parallel devices, more than 8")
    n = 8
    if cfg.train_batch_size and cfg.train_micro_batch_size_per_gpu:   # a recipe written for a fixed device count
        dp = cfg.train_batch_size // (cfg.train_micro_batch_size_per_gpu * (cfg.gradient_accumulation_steps or 1))
        n = min(8, fixed * dp)
    r = resolve(cfg, n)
    import jax
    mesh = make_mesh(r.mesh, devices=jax.devices()[:n])
    assert dict(mesh.shape) == {"pipeline": r.mesh.pipeline, "data": r.mesh.data, "tensor": r.mesh.tensor}
    assert r.train_batch_size == r.train_micro_batch_size_per_gpu * r.gradient_accumulation_steps * r.mesh.data


@pytest.mark.parametrize("path", [p for p in CONFIGS if any(k in p.name for k in ("7b_3d", "1.5b", "onebit", "offload"))],
                         ids=lambda p: p.name)
def test_big_recipes_initialise_with_tiny_model_overrides(path):
    """The 3D-parallel / ZeRO-3 / 1-bit / offload recipes really build: same config, tiny model, seq 32."""
    import jzero

    family = read_config_file(path)["model"]["family"]
    over = TINY[family] + ["data.seq_len=32", "train_micro_batch_size_per_gpu=1"]
    if "gradient_accumulation_steps" not in read_config_file(path):
        over += ["train_batch_size=null", "gradient_accumulation_steps=1"]
    cfg = load_config(path, over)
    eng = jzero.initialize(cfg)
    asked = {a: n for a, n in (read_config_file(path).get("mesh") or {}).items() if a in ("tensor", "pipeline")}
    want = {"tensor": 1, "pipeline": 1, **asked}
    want["data"] = jax.device_count() // (want["tensor"] * want["pipeline"])   # data=-1: the remaining devices
    assert {a: eng.mesh.shape[a] for a in want} == want
    assert eng.n_params() > 0


def test_sweep_of_the_real_main(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "base": str(ROOT / "configs/default.yaml"), "output_dir": str(tmp_path / "out"),
        "grid": {"zero_optimization.stage": [1, 3], "optimizer.params.lr": [1e-3, 3e-3]},
        "overrides": {"train.steps": 3, "train.eval_interval": 0, "model.n_layer": 1, "model.d_model": 32,
                      "model.n_head": 2, "model.d_ff": 64, "data.seq_len": 16, "train_batch_size": 8,
                      "data.default_corpus_bytes": 200000, "scheduler.params.total_num_steps": 3,
                      "scheduler.params.warmup_num_steps": 1},
    }))
    proc = subprocess.run([sys.executable, "-m", "train.sweep", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "out/results.md").read_text().strip().splitlines()
    rows = [line for line in table if line.startswith("|") and "---" not in line][1:]
    assert len(rows) == 4, table
    assert (tmp_path / "out/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in (tmp_path / "out").iterdir():
        if d.is_dir():
            s = json.loads((d / "summary.json").read_text())
            assert s["steps"] == 3 and math.isfinite(s["final_loss"])


def test_sweep_example_points_train_at_their_learning_rates():
    """The example sweeps two learning rates for 20 steps on default.yaml, whose schedule warms up for 20 steps (of
    300): every step of every point was warm-up, the swept lr reached only at the last one. Its overrides now fit
    the schedule to the run: warm-up done early, the cosine ending at the last step."""
    from jzero.optim.schedules import build_schedule
    from train.sweep import plan
    from train.sweep_spec import load_sweep

    path = ROOT / "configs/sweep_example.yaml"
    for point in plan(load_sweep(path), path):
        argv = point.argv[point.argv.index("--config") + 2:]
        cfg = load_config(ROOT / "configs/default.yaml", argv)
        lr = cfg.optimizer.params["lr"]
        lrs = [float(build_schedule(cfg.scheduler.type, cfg.scheduler.params, lr)(k)) for k in range(cfg.train.steps)]
        assert lr == point.values["optimizer.params.lr"] and lrs.index(max(lrs)) <= cfg.train.steps // 4
        assert max(lrs) == pytest.approx(lr) and lrs[-1] < 0.2 * lr   # the peak early, the cosine's end at the last
