"""jzero.flops: the analytic formula, XLA and jaxpr FLOP counts against hand counts, peaks, MFU, the profile."""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.errors import ConfigError
from jzero.flops import (FlopsProfile, format_flops, gpt_train_flops_per_token, hlo_while_loops,
                         jaxpr_matmul_flops, mfu, peak_flops, xla_flops)


def test_analytic_formula_gpt2_small():
    # GPT-2 small without position embeddings: 124,439,808 - 1024*768 = 123,653,376 params.
    n = 123_653_376
    got = gpt_train_flops_per_token(n, n_layer=12, seq_len=1024, d_model=768)
    assert got == 741_920_256 + 113_246_208 == 855_166_464
    assert gpt_train_flops_per_token(10, 1, 2, 3) == 60 + 72


def test_mfu_and_peaks():
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops(h100) == 989e12
    assert peak_flops(h100, "float32") == 494.5e12
    assert peak_flops(h100, jnp.bfloat16) == 989e12
    assert peak_flops(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 PCIe"), "bf16") == 756e12
    assert peak_flops(SimpleNamespace(platform="gpu", device_kind="NVIDIA H200"), "fp16") == 989e12
    assert peak_flops(SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB"), "fp32") == 156e12
    assert peak_flops(SimpleNamespace(platform="gpu", device_kind="Some Future GPU")) is None
    # the PCIe H200 NVL is not the SXM H200 (it matched 'h200': MFU against 989 TFLOP/s, read low)
    assert peak_flops(SimpleNamespace(platform="gpu", device_kind="NVIDIA H200 NVL")) is None
    assert peak_flops(jax.devices()[0]) is None  # CPU
    with pytest.raises(ConfigError, match="int8"):
        peak_flops(h100, "int8")
    # 100k tok/s x 1 GFLOP/token on 8 x 989 TFLOP/s = 1e14 / 7.912e15
    assert mfu(1e5, 1e9, 8, 989e12) == pytest.approx(1e14 / 7.912e15, rel=1e-12)
    assert mfu(1e5, 1e9, 8, None) is None


def test_xla_flops_matmul_is_2mnk():
    m, k, n = 64, 48, 32
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert xla_flops(compiled) == 2 * m * n * k
    assert hlo_while_loops(compiled) == 0
    # both return shapes of cost_analysis across jax versions
    assert xla_flops(SimpleNamespace(cost_analysis=lambda: [{"flops": 3.0}, {"flops": 4.0}])) == 7.0
    assert xla_flops(SimpleNamespace(cost_analysis=lambda: None)) is None


def test_scan_counted_once_by_xla_but_fully_by_jaxpr():
    x = jnp.ones((32, 32))
    f = lambda x: jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=5)[0]
    compiled = jax.jit(f).lower(x).compile()
    assert hlo_while_loops(compiled) == 1
    assert xla_flops(compiled) < 2 * 2 * 32**3  # one body, not five
    assert jaxpr_matmul_flops(f, x) == 5 * 2 * 32**3


def test_jaxpr_counts_shard_map_bodies_per_shard():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    f = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
                      axis_names={"data"})
    assert jaxpr_matmul_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4


# ---- a tiny GPT in plain jax.numpy: XLA's count of fwd+bwd vs 6N + 12LTd --------------------------------
V, D, L, T, H, B = 256, 128, 2, 128, 4, 2


def _init(key):
    ks = jax.random.split(key, 2 + 4 * L)
    p = {"wte": jax.random.normal(ks[0], (V, D)) * 0.02, "wpe": jax.random.normal(ks[1], (T, D)) * 0.02,
         "ln_f": jnp.ones((D,)), "layers": []}
    for i in range(L):
        k = ks[2 + 4 * i: 6 + 4 * i]
        p["layers"].append({"ln1": jnp.ones((D,)), "ln2": jnp.ones((D,)),
                            "qkv": jax.random.normal(k[0], (D, 3 * D)) * 0.02,
                            "proj": jax.random.normal(k[1], (D, D)) * 0.02,
                            "fc": jax.random.normal(k[2], (D, 4 * D)) * 0.02,
                            "out": jax.random.normal(k[3], (4 * D, D)) * 0.02})
    return p


def _ln(x, g):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g


def _loss(p, tokens):
    x = p["wte"][tokens] + p["wpe"][None]
    mask = jnp.tril(jnp.ones((T, T), bool))
    for lp in p["layers"]:
        q, k, v = jnp.split(_ln(x, lp["ln1"]) @ lp["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, D // H) for a in (q, k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // H)
        a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, T, D) @ lp["proj"]
        x = x + jax.nn.gelu(_ln(x, lp["ln2"]) @ lp["fc"]) @ lp["out"]
    logits = _ln(x, p["ln_f"]) @ p["wte"].T  # tied LM head
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))


def test_tiny_gpt_xla_flops_within_10pct_of_analytic(capsys):
    params = _init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    grad = jax.jit(jax.value_and_grad(_loss))
    compiled = grad.lower(params, tokens).compile()
    n_no_pos = sum(x.size for x in jax.tree.leaves(params)) - params["wpe"].size
    assert n_no_pos == V * D + D + L * (2 * D + 12 * D * D)
    analytic = gpt_train_flops_per_token(n_no_pos, L, T, D) * B * T
    counted = xla_flops(compiled)
    jaxpr_counted = jaxpr_matmul_flops(jax.value_and_grad(_loss), params, tokens)
    with capsys.disabled():
        print(f"\n  tiny GPT fwd+bwd: analytic {analytic:.4e}, XLA {counted:.4e} (ratio {counted / analytic:.4f}),"
              f" jaxpr matmuls {jaxpr_counted:.4e} (ratio {jaxpr_counted / analytic:.4f})")
    assert counted == pytest.approx(analytic, rel=0.10)
    assert jaxpr_counted == pytest.approx(analytic, rel=0.10)


def test_profile_format_and_numbers():
    prof = FlopsProfile(tokens_per_step=1000, flops_per_token=1e9, n_devices=4, xla_flops_per_device=2.6e11,
                        xla_while_loops=1, xla_library_calls=7, jaxpr_flops=9.9e11, compile_time_s=12.0,
                        step_time_s=0.5, window_steps=(11, 20),
                        device_step_s=0.49, host_time_s=0.004,
                        host_split={"data_wait_s": 0.002, "place_time_s": 0.001, "dispatch_time_s": 0.0005,
                                    "log_time_s": 0.0005}, queue_wait_s=0.45, peak_flops_per_device=989e12)
    assert prof.analytic_flops_per_step == 1e12
    assert prof.xla_ratio == pytest.approx(1.04)
    assert prof.mfu == pytest.approx(2000 * 1e9 / (4 * 989e12))
    text = prof.format()
    assert "analytic 6N+12LTd : 1.00 TFLOP (1.00 GFLOP per token)" in text
    assert "XLA cost analysis : 1.04 TFLOP (260.00 GFLOP per device), XLA / analytic = 1.040" in text
    assert "1 while loop(s) whose bodies XLA counts once and its 7 library calls" in text and "reads low" in text
    assert ("compile 12.0 s (once) | loop step 500.0 ms (steps 11-20) | device step 490.0 ms (synchronised) | "
            "host overhead 4.0 ms per step") in text
    assert ("host overhead     : data wait 2.0 ms | place 1.0 ms | dispatch 0.5 ms | log 0.5 ms "
            "(+ 450.0 ms waiting for the device)") in text
    assert "MFU 0.1% of 989.00 TFLOP/s (bfloat16)" in text
    assert prof.to_dict()["xla_flops_per_step"] == pytest.approx(1.04e12)
    assert format_flops(None) == "n/a" and format_flops(512) == "512 FLOP"


def test_xla_counted_flops_of_jzero_gpt2_within_10_percent_of_analytic():
    """GPT-2 small's shapes (d 768, 12 heads, vocab 50304, seq 1024; 2 layers to keep the test small), layers
    unrolled so XLA's cost analysis sees every layer: XLA's count of the whole train step vs 6N + 12LTd."""
    import jzero
    from jzero import flops
    from jzero.config import load_config

    cfg = load_config(base={}, overrides=["model.preset=gpt2-small", "model.n_layer=2", "model.scan_layers=false",
                                          "data.seq_len=1024", "train_batch_size=8"])
    eng = jzero.initialize(cfg, vocab_size=50304)
    ca = eng.lower_train_step().cost_analysis()
    xla = (ca if isinstance(ca, dict) else ca[0])["flops"]
    mc = eng.model_config
    analytic = 8 * 1024 * flops.gpt_train_flops_per_token(mc.n_params(include_pos=False), mc.n_layer, 1024,
                                                          mc.d_model)
    print(f"GPT-2 (2 layers of 124M shapes) train step: XLA {xla:.4e} FLOPs, analytic {analytic:.4e}, "
          f"ratio {xla / analytic:.4f}")
    assert abs(xla / analytic - 1) < 0.10


def test_matmul_params_counts_an_untied_input_embedding_as_a_lookup():
    """6N counts each matmul weight once: an untied Llama's input table is a lookup (only its head is a matmul).
    Before, MFU took both tables: a tiny untied Llama's analytic count read 222,144 FLOPs a token where its jaxpr
    matmuls give 172,032 (+ attention's 12LTd); Llama-2-7B at seq 2048 read 1.8% high."""
    import dataclasses

    from jzero.flops import matmul_params
    from models.gpt2 import GPT2Config
    from models.llama import LlamaConfig

    tied = LlamaConfig(vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, tie_embeddings=True)
    untied = dataclasses.replace(tied, tie_embeddings=False)
    assert matmul_params(tied) == tied.n_params() == 26_784      # 256*32 + 2*(3072 + 6144 + 64) + 32
    assert untied.n_params() == 34_976 and matmul_params(untied) == 26_784
    assert gpt_train_flops_per_token(matmul_params(untied), 2, 16, 32) == 172_992
    gpt = GPT2Config(vocab_size=256, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=32)
    assert matmul_params(gpt) == gpt.n_params(include_pos=False) == 25_344   # tied: the one table is the head
    l7 = LlamaConfig()   # Llama-2-7B: 6,738,415,616 params, 32000 x 4096 per table
    assert l7.n_params() - matmul_params(l7) == 32000 * 4096
