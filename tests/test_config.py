"""Config: DeepSpeed keys as is, batch triple rule, mesh resolution, overrides, and one-line errors."""
import json

import pytest

from jzero.config import load_config, resolve, resolve_batch, resolve_mesh_shape, read_config_file, MeshConfig
from jzero.errors import ConfigError

DS_CONFIG = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 5,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 500000000, "allgather_bucket_size": 500000000,
                          "overlap_comm": True, "contiguous_gradients": True},
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100}},
}


def test_deepspeed_json_accepted_as_is(tmp_path):
    p = tmp_path / "ds_config.json"
    p.write_text(json.dumps(DS_CONFIG))
    cfg = resolve(load_config(p), n_devices=8)
    assert cfg.zero_optimization.stage == 2 and cfg.bf16.enabled
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (64, 4, 2)
    assert cfg.mesh.data == 8 and cfg.optimizer.params["lr"] == 3e-4


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train_batch_size: 16\nmesh:\n  tensor: 2\n")
    cfg = load_config(p, ["zero_optimization.stage=3", "mesh.data=4", "optimizer.params.lr=1e-2", "train.steps=7"])
    assert cfg.zero_optimization.stage == 3 and cfg.mesh.data == 4 and cfg.mesh.tensor == 2
    assert cfg.optimizer.params["lr"] == 1e-2 and cfg.train.steps == 7


@pytest.mark.parametrize("tbs,micro,gas,dp,expect", [
    (64, 4, None, 8, (64, 4, 2)),
    (64, None, 2, 8, (64, 4, 2)),
    (None, 4, 2, 8, (64, 4, 2)),
    (32, None, None, 8, (32, 4, 1)),
    (None, 3, None, 2, (6, 3, 1)),
])
def test_batch_triple_rule(tbs, micro, gas, dp, expect):
    cfg = load_config(base={"train_batch_size": tbs, "train_micro_batch_size_per_gpu": micro,
                            "gradient_accumulation_steps": gas})
    assert resolve_batch(cfg, dp) == expect


def test_mesh_minus_one_fills_the_rest():
    assert resolve_mesh_shape(MeshConfig(data=-1, tensor=2), 8) == {"data": 4, "tensor": 2, "pipeline": 1}
    assert resolve_mesh_shape(MeshConfig(data=2, tensor=-1, pipeline=2), 8) == {"data": 2, "tensor": 2, "pipeline": 2}


@pytest.mark.parametrize("data,overrides,needle", [
    ({"train_batch_size": 8, "bogus_key": 1}, [], "bogus_key"),
    ({"zero_optimization": {"stage": 2, "nonsense": True}}, [], "zero_optimization.nonsense"),
    ({"zero_optimization": {"stage": 5}}, [], "zero_optimization.stage"),
    ({"train_batch_size": "many"}, [], "train_batch_size"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], "fp16.enabled and bf16.enabled"),
    ({}, ["mesh.data=0"], "mesh.data=0"),
    ({}, ["model.dropout=0.1"], "model.dropout"),
    ({}, ["stage3"], "stage3"),
    ({}, ["zero_optimization.offload_optimizer.device=nvme"], "NVMe offload (ZeRO-Infinity) is not implemented"),
    ({}, ["zero_optimization.offload_optimizer.fast_init=true"], "fast_init=True configures DeepSpeed's NVMe"),
    ({}, ["zero_optimization.offload_optimizer.pin_memory=false"], "pin_memory=false"),
    ({}, ["zero_optimization.offload_optimizer.ratio=0.5"], "ratio=0.5 without device 'cpu'"),
    ({}, ["zero_optimization.offload_optimizer.ratio=1.5"], "offload_optimizer.ratio"),
])
def test_bad_config_one_line_errors(data, overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(base=data, overrides=overrides)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_batch_mismatch_names_the_numbers():
    cfg = load_config(base={"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                            "gradient_accumulation_steps": 1})
    with pytest.raises(ConfigError, match=r"train_batch_size=30 != .*\(4\).*\(1\).*\(8\) = 32"):
        resolve(cfg, 8)


def test_mesh_not_dividing_devices():
    with pytest.raises(ConfigError, match=r"multiply to 3, which does not divide the 8 devices"):
        resolve(load_config(base={"train_batch_size": 8, "mesh": {"tensor": 3}}), 8)
    with pytest.raises(ConfigError, match=r"= 4 but there are 8 devices"):
        resolve(load_config(base={"train_batch_size": 8, "mesh": {"data": 2, "tensor": 2, "pipeline": 1}}), 8)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(bad)


def test_bucket_sizes_become_xla_combine_thresholds():
    from jzero import xla_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cfg = load_config(base=DS_CONFIG)
    flags = xla_flags.apply(cfg, env=env)
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=2000000000" in flags
    assert "--xla_gpu_all_gather_combine_threshold_bytes=2000000000" in flags
    assert flags.startswith("--xla_force_host_platform_device_count=8 ")
    assert xla_flags.apply(cfg, env=env) == flags   # idempotent


def test_deepspeed_offload_section_at_its_defaults_is_accepted():
    """A ds_config's offload block with DeepSpeed's defaults for its NVMe-only knobs loads as is."""
    cfg = load_config(base={"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "pin_memory": True, "buffer_count": 4, "fast_init": False}}})
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"


def test_yaml_and_json_syntax_errors_name_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   seed: 1\n")
    with pytest.raises(ConfigError) as e:
        read_config_file(bad)
    assert str(e.value) == f"config file '{bad}' is not valid YAML at line 3, column 8: mapping values are not allowed here"
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"steps": 3,\n  "seed": }}')
    with pytest.raises(ConfigError) as e:
        read_config_file(bad)
    assert str(e.value) == f"config file '{bad}' is not valid JSON at line 2, column 11: Expecting value"


def test_yaml_exponents_are_numbers_in_configs_and_overrides(tmp_path):
    """PyYAML alone reads `lr: 1e-3` as the string '1e-3'; one loader (config files, overrides, sweeps) reads floats."""
    path = tmp_path / "c.yaml"
    path.write_text("train_batch_size: 8\noptimizer:\n  type: AdamW\n  params: {lr: 1e-3, eps: 1.0e-8, "
                    "weight_decay: .5E-2, betas: [0.9, 0.95]}\n")
    cfg = load_config(path, ["optimizer.params.eps=2E-8"])
    assert cfg.optimizer.params == {"lr": 1e-3, "eps": 2e-8, "weight_decay": 5e-3, "betas": [0.9, 0.95]}
    assert all(isinstance(v, float) for k, v in cfg.optimizer.params.items() if k != "betas")
