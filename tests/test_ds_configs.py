"""Published DeepSpeed configs (tests/data/ds_configs/, from DeepSpeedExamples; SOURCES.md) load and train as is.

Only tiny overrides are added (model, data, steps, batch: 1 row per device; the 1-bit configs with 2
accumulation steps, as every published 1-bit config implies accumulation > 1; one compile each, so the rest
run one micro-batch). Each config either trains one step
or fails with a one-line error naming a feature jzero does not implement, or one DeepSpeed itself refuses.
"""
import math
from pathlib import Path

import numpy as np
import pytest

import jzero
import jzero.engine
from jzero.config import load_config
from jzero.errors import ConfigError

DIR = Path(__file__).parent / "data" / "ds_configs"
TINY = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.d_model=16", "model.n_head=1", "model.d_ff=32",
        "data.seq_len=8", "train.steps=1", "train_micro_batch_size_per_gpu=1"]
ACCUM = {True: ["train_batch_size=16", "gradient_accumulation_steps=2"],    # 1-bit: accumulation inside shard_map
         False: ["train_batch_size=8", "gradient_accumulation_steps=1"]}   # the rest: one compile as small as can be


def overrides(name: str) -> list[str]:
    onebit = any(t in (DIR / name).read_text() for t in ("OneBit", "ZeroOne"))
    return TINY + ACCUM[onebit]


#: file -> the keys its start line must name as having no effect (trains)
TRAINS = {
    "autotuning_hf_bert-base_ds_config_tune.json": ["autotuning"],
    "autotuning_hf_ds_config_fp16_z2.json": [],
    "autotuning_hf_ds_config_z3.json": [],
    "bing_bert_deepspeed_bsz4k_01adam_config_seq128_mpi_infiniband.json": ["prescale_gradients"],
    "bing_bert_deepspeed_bsz4k_onebit_config_seq128.json": ["prescale_gradients", "optimizer.params.cuda_aware"],
    "bing_bert_deepspeed_bsz4k_onebitadam_config_seq128_nccl.json": ["prescale_gradients",
                                                                     "optimizer.params.cuda_aware"],
    "bing_bert_deepspeed_bsz64k_onebitlamb_config_seq128_nccl.json": ["prescale_gradients"],
    "cifar_ds_config_onebitlamb.json": ["prescale_gradients"],
    "megatron_ds_zero-offload_config.json": ["activation_checkpointing.partition_activations",
                                             "activation_checkpointing.contiguous_memory_optimization"],
    "megatron_ds_zero2_config.json": ["activation_checkpointing.partition_activations"],
    "megatron_ds_zero3_config.json": ["activation_checkpointing.partition_activations"],
    "qanet_ds_bsz512_1cycle.json": [],
    "qanet_ds_bsz512_warmup.json": [],
}

#: file -> (where it fails: "load" or "initialize", the message it must contain)
FAILS = {
    # truly unimplemented features
    "megatron_zero3_ds_zero_stage_infinity_config.json": ("load", "NVMe offload (ZeRO-Infinity) is not implemented"),
    "bing_bert_deepspeed_bsz64k_lamb_config_seq128.json": ("load", "sparse_attention={'mode': 'fixed'"),
    "cifar_ds_config.json": ("load", "fp16.fp16_master_weights_and_grads=true (fp16 master weights"),
    # refused by DeepSpeed too: its config model forbids unknown keys (these two carry a misspelt
    # stage3_param_persistence_threshold) and its engine raises on optimizer.params.max_grad_norm
    "megatron_zero3_ds_zero_stage_3_config.json": (
        "load", "did you mean 'zero_optimization.stage3_param_persistence_threshold'?"),
    "megatron_zero3_ds_zero_stage_3_config_release.json": (
        "load", "did you mean 'zero_optimization.stage3_param_persistence_threshold'?"),
    "megatron_zero3_curriculum_ds_zero_stage_2_config_baseline.json": ("initialize", "max_grad_norm"),
    "bing_bert_deepspeed_bsz4096_adam_config.json": ("initialize", "max_grad_norm"),
    "bingbertsquad_deepspeed_bsz24_config.json": ("initialize", "max_grad_norm"),
}


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """This file checks that each config builds and trains, not how fast its code runs: compile the train steps
    with LLVM's optimisations off (about half the compile time on CPU; same XLA program and numerics)."""
    original = jzero.engine.Engine.compile

    def compile_fast(self):
        if self._compiled is None:
            options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
            self._compiled = self.lower_train_step().compile(compiler_options=options)
        return self._compiled

    jzero.engine.Engine.compile = compile_fast
    yield
    jzero.engine.Engine.compile = original


def test_every_kept_config_has_an_expected_outcome_and_a_source():
    files = {p.name for p in DIR.glob("*.json")}
    assert files == set(TRAINS) | set(FAILS) and len(TRAINS) >= 10
    sources = (DIR / "SOURCES.md").read_text()
    assert all(f"| {name} |" in sources for name in files)


def _batch(eng):
    rng = np.random.default_rng(0)
    A, B, T = eng.batch_shape()
    start, stride = rng.integers(0, 64, (A, B, 1)), rng.integers(1, 4, (A, B, 1))
    return ((start + stride * np.arange(T)) % 64).astype(np.int32)


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_published_config_trains(name):
    cfg = load_config(DIR / name, overrides(name))
    notes = " ".join(cfg.start_notes())
    for key in TRAINS[name]:
        assert f"{key} (" in notes
    eng = jzero.initialize(cfg)
    assert eng.accum_steps == (2 if "16" in overrides(name)[-2] else 1)
    metrics = eng.train_step(_batch(eng))
    assert math.isfinite(float(metrics["loss"])) and int(eng.state.step) == 1


#: the misspelt ones with the key spelt as jzero suggests: None = trains, else the error it must give then
AS_SUGGESTED = {"megatron_zero3_ds_zero_stage_3_config.json": None,
                "megatron_zero3_ds_zero_stage_3_config_release.json": "parameter offload is not implemented"}


@pytest.mark.parametrize("name", sorted(AS_SUGGESTED))
def test_misspelt_key_spelt_as_suggested(name):
    import json
    import re

    from jzero.config import apply_overrides, validate

    wrong, right = re.search(r"unknown key '([\w.]+)'.*did you mean '([\w.]+)'", _error(name)).groups()
    data = json.loads((DIR / name).read_text())
    zero = data["zero_optimization"]
    zero[right.split(".")[-1]] = zero.pop(wrong.split(".")[-1])
    cfg = validate(apply_overrides(data, overrides(name)))
    if AS_SUGGESTED[name] is None:
        eng = jzero.initialize(cfg)
        assert math.isfinite(float(eng.train_step(_batch(eng))["loss"]))
    else:
        with pytest.raises(ConfigError, match=AS_SUGGESTED[name]):
            jzero.initialize(cfg)


def _error(name) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(DIR / name, overrides(name))
    return str(exc.value)


@pytest.mark.parametrize("name", sorted(FAILS))
def test_published_config_fails_naming_the_feature(name):
    where, needle = FAILS[name]
    with pytest.raises(ConfigError) as exc:
        jzero.initialize(load_config(DIR / name, overrides(name)))
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    if where == "initialize":   # the config itself loads
        load_config(DIR / name, overrides(name))


def test_fp16_onebit_skips_overflowed_steps_on_every_rank():
    """bing_bert's fp16 OneBitAdam config (the same compiled step as its training test above; only the initial
    loss scale differs, which is state, not program): the loss is scaled, local gradients unscaled before the
    optimizer, and a step where any rank overflowed leaves params, moments, error buffers and the optimizer's
    step count untouched on every rank while the scaler follows DeepSpeed's hysteresis rule; the rest train."""
    import jax

    name = "bing_bert_deepspeed_bsz4k_onebit_config_seq128.json"
    eng = jzero.initialize(load_config(DIR / name, overrides(name) + ["fp16.initial_scale_power=22"]))
    scale, hysteresis, skipped, losses = 2.0 ** 22, 2, 0, []
    rng = np.random.default_rng(1)
    for _ in range(14):
        A, B, T = eng.batch_shape()
        batch = ((rng.integers(0, 64, (A, B, 1)) + rng.integers(1, 4, (A, B, 1)) * np.arange(T)) % 64)
        before = [np.asarray(x) for x in jax.tree.leaves((eng.state.params, eng.state.opt_state))]
        m = eng.train_step(batch.astype(np.int32))
        after = [np.asarray(x) for x in jax.tree.leaves((eng.state.params, eng.state.opt_state))]
        assert float(m["loss_scale"]) == scale
        if int(m["skipped_steps"]) > skipped:      # overflow: nothing moved; DeepSpeed's update_scale
            assert all(np.array_equal(x, y) for x, y in zip(before, after))
            skipped += 1
            if hysteresis == 1:
                scale /= 2
            else:
                hysteresis -= 1
        else:
            assert not all(np.array_equal(x, y) for x, y in zip(before, after))
            losses.append(float(m["loss"]))
    assert skipped >= 2 and len(losses) >= 3 and np.isfinite(losses).all()
    assert float(eng.state.loss_scale.scale) == scale
    assert int(jzero.optim.applied_steps(eng.state.opt_state)) == 14 - skipped


# --------------------------------------------------------------------------- Hugging Face's own DeepSpeed configs

#: transformers' tests/deepspeed/ds_config_zero3.json, as published (reduce_bucket_size 0: DeepSpeed's ge=0)
HF_ZERO3 = {
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2,
             "min_loss_scale": 1},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e14, "reduce_bucket_size": 0,
                          "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0,
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_fp16_weights_on_model_save": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500}},
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}

#: the Hugging Face Trainer's ZeRO-2 template with its Apex block left at "auto" (HF resolves it off)
HF_ZERO2_AMP = {
    "amp": {"enabled": "auto", "opt_level": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2,
             "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_hf_zero3_config_with_bucket_size_zero_loads_and_trains():
    """HF's ZeRO-3 test config loads as is (it used to fail on reduce_bucket_size 0); its parameter offload is the one
    feature jzero refuses, and with that off it trains (optimizer offload, fp16, bucket size 0 kept)."""
    from jzero.config import validate, apply_overrides

    cfg = validate(apply_overrides(HF_ZERO3, TINY + ACCUM[False]))
    assert cfg.zero_optimization.reduce_bucket_size == 0
    with pytest.raises(ConfigError, match="parameter offload is not implemented"):
        jzero.initialize(cfg)
    eng = jzero.initialize(validate(apply_overrides(HF_ZERO3, TINY + ACCUM[False]
                                                    + ["zero_optimization.offload_param.device=none"])))
    assert eng.config.zero_optimization.reduce_bucket_size == 0
    assert math.isfinite(float(eng.train_step(_batch(eng))["loss"])) and int(eng.state.step) == 1


def test_hf_amp_auto_config_trains():
    """The HF template's "amp": {"enabled": "auto", ...} resolves off as transformers does, and the config trains."""
    from jzero.config import validate, apply_overrides

    cfg = validate(apply_overrides(HF_ZERO2_AMP, TINY + ACCUM[False]))
    assert "amp.enabled=False (off: HF turns Apex AMP on only with --fp16 --fp16_backend apex)" in cfg.start_notes()[1]
    eng = jzero.initialize(cfg)
    assert math.isfinite(float(eng.train_step(_batch(eng))["loss"])) and int(eng.state.step) == 1
