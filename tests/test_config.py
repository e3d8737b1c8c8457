"""Config: DeepSpeed keys as is, batch triple rule, mesh resolution, overrides, and one-line errors."""
import json

import pytest

from jzero.config import load_config, resolve, resolve_batch, resolve_mesh_shape, read_config_file, to_dict, MeshConfig
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


def test_model_family_flags_turn_the_dot_merger_and_triton_gemms_off_for_gpt2_and_llama():
    from jzero import xla_flags

    measured = ("--xla_gpu_dot_merger_threshold_mb=0", "--xla_gpu_enable_triton_gemm=false")
    for family in ("gpt2", "llama"):
        cfg = load_config(base={"train_batch_size": 8, "model": {"family": family}})
        assert all(f in xla_flags.flags_for(cfg) for f in measured)
        # a flag the user already set wins: only the missing one is added
        env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
        assert xla_flags.apply(cfg, env=env) == "--xla_gpu_enable_triton_gemm=true --xla_gpu_dot_merger_threshold_mb=0"
    cfg = load_config(base={"train_batch_size": 8, "model": {"family": "bert"}})
    assert not any(f in xla_flags.flags_for(cfg) for f in measured)


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
    assert str(e.value) == (f"config file '{bad}' is not valid JSON at line 2, column 11: Found a punctuator "
                            "character when expecting a quoteless string (check your syntax)")


def test_json_is_read_as_deepspeed_reads_it(tmp_path):
    """hjson, as DeepSpeed: comments, trailing commas and a byte-order mark load; a duplicate key is refused (in
    YAML too), where plain json / PyYAML would keep the last value silently."""
    ok = tmp_path / "ds.json"
    ok.write_bytes(b'\xef\xbb\xbf{"train_batch_size": 8, // the global batch\n "zero_optimization": {"stage": 2,},}')
    assert read_config_file(ok) == {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    for name, text, key in (("dup.json", '{"zero_optimization": {"stage": 2, "stage": 3}}', "stage"),
                            ("dup.yaml", "optimizer: {type: Adam}\noptimizer: {type: AdamW}\n", "optimizer")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            read_config_file(tmp_path / name)
        assert str(e.value) == (f"config file '{tmp_path / name}': key '{key}' is given twice in one section; keep "
                                "one (DeepSpeed refuses duplicate keys too)")
    with pytest.raises(ConfigError, match="override value '{a: 1, a: 2}': key 'a' is given twice"):
        load_config(base={}, overrides=["train={a: 1, a: 2}"])


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "b.json"
    binary.write_bytes(b'{"a": "\xd0\xff"}')
    with pytest.raises(ConfigError, match=r"b.json' is not UTF-8 text \(byte 7\); pass a JSON or YAML config"):
        read_config_file(binary)
    with pytest.raises(ConfigError, match="is a directory; pass the JSON or YAML file in it"):
        read_config_file(tmp_path)
    for name, text in (("e.json", ""), ("e.yaml", "# nothing\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="holds no keys; write the config into it, or omit --config"):
            read_config_file(tmp_path / name)


def test_optimizer_params_left_out_take_deepspeeds_defaults():
    """A ds_config's optimizer without params (or with some) trains at DeepSpeed's FusedAdam/FusedLamb defaults
    for the rest, not at values of jzero's own; the same with no optimizer section and an lr override."""
    from jzero.optim import build_optimizer, default_params

    for base, overrides in (({"optimizer": {"type": "AdamW"}}, []), ({}, ["optimizer.params.lr=1e-3"]),
                            ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, [])):
        cfg = load_config(base={"train_batch_size": 8, **base}, overrides=overrides)
        assert cfg.optimizer.params in ({}, {"lr": 1e-3})
        p = default_params(cfg.optimizer.type)
        assert (p["lr"], tuple(p["betas"]), p["eps"], p["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    # AdamW at those defaults: one update of a unit gradient from zero moments is -lr * sign (no decay term)
    import jax.numpy as jnp

    tx, _ = build_optimizer({"type": "AdamW"})
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert jnp.allclose(updates["w"], -1e-3, rtol=1e-4)


def test_deepspeed_nulls_and_quoted_text():
    cfg = load_config(base={"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": None,
                                                                         "offload_param": None}})
    assert cfg.zero_optimization.offload_optimizer.device == "none" == cfg.zero_optimization.offload_param.device
    with pytest.raises(ConfigError) as e:
        load_config(base={"train_batch_size": 8}, overrides=["train.output_dir=2024"])
    assert str(e.value) == ("key 'train.output_dir' in override 'train.output_dir=2024': must be text, not the int "
                            "2024; quote the value (on the command line: train.output_dir='\"VALUE\"')")
    with pytest.raises(ConfigError) as e:
        load_config(base={"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": -1}})
    assert str(e.value).startswith("fp16.loss_scale=-1: must be")    # the key named once


def test_yaml_exponents_are_numbers_in_configs_and_overrides(tmp_path):
    """PyYAML alone reads `lr: 1e-3` as the string '1e-3'; one loader (config files, overrides, sweeps) reads floats."""
    path = tmp_path / "c.yaml"
    path.write_text("train_batch_size: 8\noptimizer:\n  type: AdamW\n  params: {lr: 1e-3, eps: 1.0e-8, "
                    "weight_decay: .5E-2, betas: [0.9, 0.95]}\n")
    cfg = load_config(path, ["optimizer.params.eps=2E-8"])
    assert cfg.optimizer.params == {"lr": 1e-3, "eps": 2e-8, "weight_decay": 5e-3, "betas": [0.9, 0.95]}
    assert all(isinstance(v, float) for k, v in cfg.optimizer.params.items() if k != "betas")


# --------------------------------------------------------------------------- DeepSpeed's whole key set (jzero.ds_keys)


def test_every_deepspeed_key_of_the_schema_is_in_the_table_and_the_docs():
    """The table names every field the schema has under DeepSpeed's sections, its by_schema rows are real
    fields, and docs/deepspeed_keys.md is the table as generated."""
    from pathlib import Path

    from jzero.config import JzeroConfig
    from jzero.ds_auto import RULES
    from jzero.ds_keys import KEYS, _schema_paths, markdown_table

    schema = _schema_paths(JzeroConfig)
    ds_top = {k.split(".")[0] for k in KEYS} - {"pipeline", "checkpoint"}   # jzero sections sharing a name
    sections = {k.rsplit(".", 1)[0] for k in schema if "." in k}
    missing = [p for p in schema if p.split(".")[0] in ds_top and p not in sections
               and p not in KEYS and not any(p.startswith(k + ".") for k in KEYS)]
    assert not missing
    assert [k for k, v in KEYS.items() if v.by_schema and k not in schema] == []
    doc = (Path(__file__).parents[1] / "docs" / "deepspeed_keys.md").read_text()
    assert markdown_table() in doc and all(f"| `{k}` |" in doc for k in RULES)


PUBLISHED_STYLE = {   # keys from DeepSpeedExamples configs that jzero used to refuse
    "train_batch_size": 16, "prescale_gradients": False, "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 2, "cpu_offload": True, "overlap_comm": True, "contiguous_gradients": True,
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_prefetch_bucket_size": 5e7, "sub_group_size": 1e9},
    "fp16": {"enabled": True, "auto_cast": False},
    "aio": {"block_size": 1048576, "queue_depth": 8},
    "activation_checkpointing": {"partition_activations": True},
    "optimizer": {"type": "DeepSpeed_Adam", "params": {"lr": 1e-4}},
}


def test_no_effect_keys_are_accepted_and_named_in_one_start_line():
    cfg = load_config(base=PUBLISHED_STYLE)
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"   # cpu_offload: DeepSpeed's alias
    assert cfg.optimizer.type == "Adam"
    notes = cfg.start_notes()
    assert len(notes) == 1 and "\n" not in notes[0]
    assert cfg.zero_optimization.overlap_comm is True   # mapped to XLA flags (jzero.overlap), not no-effect
    assert "overlap_comm" not in notes[0]
    for key in ("prescale_gradients", "zero_allow_untested_optimizer",
                "zero_optimization.contiguous_gradients", "zero_optimization.stage3_max_live_parameters",
                "zero_optimization.sub_group_size", "fp16.auto_cast", "aio",
                "activation_checkpointing.partition_activations"):
        assert f"{key} (" in notes[0]
    assert load_config(base={"train_batch_size": 8}).start_notes() == []
    # the default optimizer's line is the caller's choice (train/_main.py prints it: include_optimizer=True)
    assert load_config(base=PUBLISHED_STYLE).start_notes(include_optimizer=True) == notes   # names its optimizer


def test_the_main_prints_the_start_line(tmp_path, capsys):
    from train._main import run_main
    from train.pretrain import parse_args

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 8, "prescale_gradients": True}))
    assert run_main(parse_args(["--config", str(p)]), {}, lambda cfg: None) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("ds_config keys with no effect under XLA: prescale_gradients")]


@pytest.mark.parametrize("data,needle", [
    ({"zero_optimization": {"stage3_param_persitence_threshold": 10}},
     "did you mean 'zero_optimization.stage3_param_persistence_threshold'?"),
    ({"gradient_clip": 1.0}, "did you mean 'gradient_clipping'?"),
    ({"stage": 2}, "did you mean 'zero_optimization.stage'?"),
    ({"fp16": {"loss_scale_windows": 10}}, "did you mean 'fp16.loss_scale_window'?"),
    ({"zero_optimization": {"comm_overlap": True}}, "did you mean 'zero_optimization.overlap_comm'?"),
    ({"zero_optimization": {"zero_quantized_nontrainable_weights": True}}, "ZeRO++ quantized frozen weights is "
                                                                            "not implemented in jzero; remove it or "
                                                                            "set DeepSpeed's default False"),
    ({"zero_optimization": {"zero_quantized_gradients": True, "stage": 2}}, "zero_quantized_gradients=true needs "
                                                                            "stage 3"),
    ({"zero_optimization": {"zero_quantized_weights": True, "stage": 2}}, "zero_quantized_weights=true needs stage 3"),
    ({"zero_optimization": {"zero_hpz_partition_size": 4, "stage": 1}}, "zero_hpz_partition_size=4 needs stage 3"),
    ({"sparse_attention": {"mode": "fixed"}}, "block-sparse attention"),
    ({"elasticity": {"enabled": True}}, "elastic training"),
    ({"zero_optimization": {"cpu_offload": True, "offload_optimizer": {"device": "none"}}},
     "zero_optimization.cpu_offload=True means zero_optimization.offload_optimizer.device='cpu'"),
    ({"optimizer": {"type": "Adam", "params": {"lr": "auto"}}, "scheduler": {"type": "auto"}},
     "scheduler.type='auto': jzero resolves 'auto' only where"),
])
def test_unknown_and_unimplemented_keys_one_line_errors(data, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(base=data)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_features_off_at_deepspeed_defaults_are_accepted():
    cfg = load_config(base={"elasticity": {"enabled": False}, "sequence_parallel_size": 1, "comms_logger": {},
                            "zero_optimization": {"zero_quantized_weights": False, "mics_shard_size": -1,
                                                  "load_from_fp32_weights": True},
                            "checkpoint": {"use_node_local_storage": False, "tag_validation": "Warn"},
                            "pipeline": {"stages": "auto", "pipe_partitioned": True}})
    assert cfg.pipeline.schedule == "gpipe" and cfg.start_notes()[0].count("(") >= 2


HF_AUTO = {   # the Hugging Face integration's ZeRO-3 template
    "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_auto_values_resolve_as_the_hf_integration_does():
    from jzero.optim import build_optimizer

    cfg = load_config(base=HF_AUTO, overrides=["train_micro_batch_size_per_gpu=2", "model.preset=gpt2-tiny",
                                               "train.steps=50"])
    assert cfg.optimizer.params == {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert cfg.scheduler.params == {"warmup_min_lr": 0, "warmup_max_lr": 5e-5, "warmup_num_steps": 0,
                                    "total_num_steps": 50}
    assert cfg.gradient_clipping == 1.0 and not cfg.fp16.enabled and not cfg.bf16.enabled
    z = cfg.zero_optimization
    assert (z.reduce_bucket_size, z.stage3_param_persistence_threshold) == (192 * 192, 1920)   # gpt2-tiny d=192
    assert resolve(cfg, 8).train_batch_size == 16 and resolve(cfg, 8).gradient_accumulation_steps == 1
    _, schedule = build_optimizer(cfg.optimizer.model_dump(), cfg.scheduler.model_dump(), cfg.gradient_clipping)
    assert float(schedule(0)) == pytest.approx(0.0) and float(schedule(2)) == pytest.approx(5e-5)   # max(2, 0)
    notes = cfg.start_notes()
    assert any("optimizer.params.lr=5e-05 (HF learning_rate default 5e-5)" in n for n in notes)
    with pytest.raises(ConfigError, match=r"train_batch_size='auto': HF fills the batch sizes from its "
                                          r"--per_device_train_batch_size"):   # every batch key 'auto'
        load_config(base=HF_AUTO)


def test_offload_check_reads_optimizer_type_case_insensitively():
    from jzero.engine import check_supported

    for t in ("adam", "ADAMW", "DeepSpeed_Adam"):
        check_supported(resolve(load_config(base={"train_batch_size": 8, "optimizer": {"type": t}, "zero_optimization": {
            "stage": 2, "offload_optimizer": {"device": "cpu"}}}), 8))
    with pytest.raises(ConfigError, match="offloading lamb is not implemented"):
        check_supported(resolve(load_config(base={"train_batch_size": 8, "optimizer": {"type": "lamb"},
                                                  "zero_optimization": {"stage": 2, "cpu_offload": True}}), 8))


def test_an_error_in_an_override_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 1}}')
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.steps=3", "zero_optimization.stage=7"])
    assert str(e.value) == "key 'zero_optimization.stage' in override 'zero_optimization.stage=7': Input should be 0, " \
                           "1, 2 or 3 (got 7)"
    path.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 7}}')
    with pytest.raises(ConfigError, match=rf"key 'zero_optimization.stage' in {path}: Input should be"):
        load_config(path, ["train.steps=3"])


# --------------------------------------------------------------------------- audit of 21 real DeepSpeed configs


def test_bucket_sizes_and_hpz_size_zero_are_accepted_with_deepspeeds_meaning():
    """DeepSpeed declares reduce_bucket_size / allgather_bucket_size / zero_hpz_partition_size ge=0 (HF's own
    tests/deepspeed/ds_config_zero3.json has reduce_bucket_size 0): 0 loads and stays 0; hpZ 0 is off (on only
    above 1), whatever the stage; a negative size is still refused."""
    import jzero

    zero = {"stage": 3, "reduce_bucket_size": 0, "allgather_bucket_size": 0, "zero_hpz_partition_size": 0}
    cfg = resolve(load_config(base={"train_batch_size": 8, "zero_optimization": zero}), 8)
    z = cfg.zero_optimization
    assert (z.reduce_bucket_size, z.allgather_bucket_size, z.zero_hpz_partition_size) == (0, 0, 0)
    assert load_config(base={"zero_optimization": {"stage": 1, "zero_hpz_partition_size": 0}})   # off: no stage 3
    eng = jzero.initialize(load_config(base={"train_batch_size": 8, "zero_optimization": zero},
                                       overrides=["model.preset=gpt2-tiny", "model.n_layer=1", "data.seq_len=8"]),
                           abstract=True)
    assert "node" not in eng.mesh.axis_names and eng.mesh.shape["data"] == 8   # flat ZeRO-3, no hpZ split
    with pytest.raises(ConfigError) as e:
        load_config(base={"zero_optimization": {"reduce_bucket_size": -1}})
    assert str(e.value) == ("key 'zero_optimization.reduce_bucket_size' in config: Input should be greater than or "
                            "equal to 0 (got -1)")


def test_bucket_size_zero_is_xla_threshold_zero():
    """DeepSpeed's bucket of 0 elements holds one gradient, reduced on its own; XLA's combiners skip a module whose
    threshold is 0 (every collective by itself). So 0 maps to the threshold flags at 0, not to XLA's defaults."""
    from jzero.xla_flags import flags_for

    cfg = load_config(base={"train_batch_size": 8, "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 0, "allgather_bucket_size": 0}})
    flags = flags_for(cfg)
    for name in ("all_reduce", "reduce_scatter", "all_gather"):
        assert f"--xla_gpu_{name}_combine_threshold_bytes=0" in flags


HF_AMP = {"amp": {"enabled": "auto", "opt_level": "auto"}, "fp16": {"enabled": "auto"}, "train_batch_size": 8}


def test_hf_amp_auto_resolves_off_before_the_apex_check():
    """transformers fills amp.enabled with (fp16 and fp16_backend == "apex"), false by default, and amp.opt_level with
    fp16_opt_level ("O1"); so the HF template's amp block is off, and named with the other resolved "auto" values.
    amp.enabled: true stays the unimplemented-feature error."""
    cfg = load_config(base=HF_AMP)
    assert not cfg.fp16.enabled and "amp" not in to_dict(cfg)
    assert cfg.start_notes() == [
        "ds_config 'auto' values resolved as the Hugging Face integration does: amp.enabled=False (off: HF turns "
        "Apex AMP on only with --fp16 --fp16_backend apex); amp.opt_level='O1' (HF fp16_opt_level default 'O1'); "
        "fp16.enabled=False (HF --fp16 default off)"]
    with pytest.raises(ConfigError) as e:
        load_config(base={**HF_AMP, "amp": {"enabled": True, "opt_level": "auto"}})
    assert str(e.value) == ("amp={'enabled': True, 'opt_level': 'O1'}: NVIDIA Apex AMP (use fp16 or bf16) is not "
                            "implemented in jzero; remove the section or set enabled: false (config)")


def test_trackio_section_is_accepted_off_like_wandb():
    """DeepSpeed's monitor config reads a trackio section (enabled, project): off loads, on is refused as wandb is."""
    cfg = load_config(base={"train_batch_size": 8, "trackio": {"enabled": False, "project": "p"},
                            "wandb": {"enabled": False}})
    assert cfg.trackio.enabled is False and cfg.start_notes() == []
    with pytest.raises(ConfigError) as e:
        load_config(base={"train_batch_size": 8, "trackio": {"enabled": True}})
    assert str(e.value) == ("trackio.enabled: true is not implemented in jzero; set it to false and use tensorboard "
                            "or csv_monitor (config)")


def test_unknown_key_with_reordered_words_gets_a_hint():
    with pytest.raises(ConfigError) as e:
        load_config(base={"train_batch_size": 8, "zero_optimization": {"stage": 2, "comm_overlap": True}})
    assert str(e.value) == ("unknown key 'zero_optimization.comm_overlap' in config: not a DeepSpeed or jzero key "
                            "under zero_optimization; did you mean 'zero_optimization.overlap_comm'?")
    from jzero.config import valid_keys
    from jzero.ds_keys import closest_key

    keys = valid_keys()
    assert closest_key("zero_optimization.size_bucket_reduce", keys) == "zero_optimization.reduce_bucket_size"
    assert closest_key("overlap_comm", keys) == "zero_optimization.overlap_comm"   # right name, wrong section
    assert closest_key("zero_optimization.comm", keys) is None   # one word: nothing to reorder


def test_default_optimizer_is_recorded_and_named():
    """No optimizer section: DeepSpeed would train the client's optimizer, jzero trains AdamW at FusedAdam's
    defaults. The resolved config (config.json) records every parameter it trains with, the config says it was
    defaulted, and the start line names it with those values."""
    from jzero.optim import default_params

    cfg = load_config(base={"train_batch_size": 8})
    assert cfg.optimizer_defaulted and cfg.optimizer.params == {}
    r = resolve(cfg, 8)
    want = {**default_params("AdamW"), "betas": [0.9, 0.999]}
    assert r.optimizer.params == want and to_dict(r)["optimizer"] == {"type": "AdamW", "params": want}
    assert r.optimizer_defaulted and resolve(r, 8).optimizer.params == want   # resolving again changes nothing
    assert cfg.start_notes(include_optimizer=True) == [
        "optimizer: no optimizer.type given (DeepSpeed would train the client's optimizer; jzero's mains have none), "
        "so AdamW trains with lr=0.001, betas=[0.9, 0.999], eps=1e-08, weight_decay=0.0 (keys not given: "
        "DeepSpeed's FusedAdam defaults); set optimizer.type and optimizer.params to choose"]
    given = load_config(base={"train_batch_size": 8}, overrides=["optimizer.params.lr=3e-4"])
    assert given.optimizer_defaulted and "lr=0.0003 (given), betas=[0.9, 0.999]" in given.optimizer_note()
    named = load_config(base={"train_batch_size": 8, "optimizer": {"type": "AdamW"}})
    assert not named.optimizer_defaulted and named.optimizer_note() is None
    # a 1-bit optimizer leaving bias_correction out is told it differs from DeepSpeed's, which never applies it
    onebit = load_config(base={"train_batch_size": 8, "optimizer": {"type": "ZeroOneAdam", "params": {"lr": 1e-3}}})
    assert onebit.start_notes(include_optimizer=True) == [
        "optimizer: ZeroOneAdam applies Adam's bias correction (bias_correction=true by default; DeepSpeed's "
        "ZeroOneAdam accepts the key but never applies it); set optimizer.params.bias_correction=false to train as "
        "DeepSpeed does"]
    off = {"type": "OneBitAdam", "params": {"bias_correction": False}}
    assert load_config(base={"train_batch_size": 8, "optimizer": off}).bias_correction_note() is None
    assert resolve(named, 8).optimizer.params == want   # a named optimizer's defaults are recorded too
    again = resolve(load_config(base=to_dict(r)), 8)   # config.json loads back: the type is named now
    assert not again.optimizer_defaulted and to_dict(again) == to_dict(r)


@pytest.mark.parametrize("optimizer", [
    {"type": "AdamW"}, {"type": "Adam", "params": {"lr": 1e-2, "adam_w_mode": False, "weight_decay": 0.1}},
    {"type": "Adam", "params": {"torch_adam": True}}, {"type": "AdamW", "params": {"torch_adam": True}},
    {"type": "Adam", "params": {"torch_adam": True, "adam_w_mode": False}}, {"type": "Lamb", "params": {"lr": 1e-2}},
    {"type": "OneBitAdam", "params": {"freeze_step": 4}}])
def test_recorded_optimizer_params_build_the_same_optimizer(optimizer):
    """The params resolve() records are the ones the given config trains with: building from them gives the same
    updates (torch_adam: torch's AdamW decay 0.01 recorded; its missing bias_correction / set_grad_none stay out),
    and a 1-bit optimizer's params stay as given."""
    import jax.numpy as jnp

    from jzero.optim import build_optimizer
    from jzero.optim.onebit import is_onebit

    cfg = load_config(base={"train_batch_size": 8, "optimizer": optimizer})
    recorded = resolve(cfg, 8).optimizer.model_dump()
    if is_onebit(optimizer["type"]):
        assert recorded["params"] == optimizer["params"]
        return
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    updates = []
    for opt in (cfg.optimizer.model_dump(), recorded):
        tx, _ = build_optimizer(opt)
        state, g = tx.init(params), {"w": jnp.linspace(0.5, -0.3, 5)}
        for _ in range(3):
            u, state = tx.update(g, state, params)
        updates.append(u["w"])
    assert jnp.array_equal(*updates)
    assert resolve(load_config(base={"train_batch_size": 8, "optimizer": recorded}), 8).optimizer.params == \
        recorded["params"]


def test_a_dict_config_is_taken_as_the_config():
    """deepspeed.initialize(config=dict) takes a dict: load_config(dict) too (it used to be a pathlib TypeError)."""
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 0.01}}},
                      overrides=["gradient_clipping=0.5"])
    assert (cfg.train_batch_size, cfg.optimizer.type, cfg.optimizer.params["lr"], cfg.gradient_clipping) == \
        (8, "Adam", 0.01, 0.5)
    with pytest.raises(ConfigError, match="load_config: a dict config and base= both given; pass one of them"):
        load_config({"train_batch_size": 8}, base={"train_batch_size": 4})
