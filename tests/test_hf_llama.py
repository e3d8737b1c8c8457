"""HF Llama import (models.hf_llama): a tiny random transformers Llama (GQA, untied head) saved with
save_pretrained gives jzero's Llama the same logits (fp32, 1e-5), scanned and unrolled; bf16 files load through
the own safetensors reader; Llama 3.1's RoPE scaling, a tied head and mismatched configs are handled or refused
by name."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jzero.errors import CheckpointError, ConfigError  # noqa: E402
from models.hf_files import load_safetensors  # noqa: E402
from models.hf_llama import llama_config_from_hf, load_hf_llama  # noqa: E402
from models.llama import Llama  # noqa: E402


#: Llama 3.2's RoPE scaling with a short original context, so all three frequency bands occur at head size 16
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_model(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
                                   rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # non-trivial norms so every mapped tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_model()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path, model


def test_hf_llama_weights_give_the_same_logits(hf_dir):
    path, model = hf_dir
    toks = np.random.default_rng(0).integers(0, 100, size=(2, 80)).astype(np.int64)   # past the original 64
    with torch.no_grad():
        ref = model(torch.from_numpy(toks)).logits.numpy()
    for scan in (True, False):
        params, cfg = load_hf_llama(path, vocab_size=128, scan_layers=scan)
        assert cfg.n_kv_head == 2 and cfg.rope_theta == 500000.0 and not cfg.tie_embeddings
        assert cfg.rope_scaling == (32.0, 1.0, 4.0, 64.0)
        assert not params["embed"][100:].any()
        out = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(toks, jnp.int32)))
        err = np.abs(out[..., :100] - ref).max()
        assert err < 1e-5, (scan, err)


def test_bf16_files_tied_head_and_refusals(tmp_path):
    model = hf_model(tie=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "b")
    state = load_safetensors(tmp_path / "b" / "model.safetensors")
    assert state["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    want = model.model.embed_tokens.weight.detach().float().numpy()
    params, cfg = load_hf_llama(tmp_path / "b")
    assert cfg.tie_embeddings and "lm_head" not in params and np.array_equal(params["embed"], want)
    hf = json.loads((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(ConfigError, match="rope type 'llama3' lacks 'low_freq_factor'"):
        llama_config_from_hf({**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        llama_config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(ConfigError, match="attention_bias=True"):
        llama_config_from_hf({**hf, "attention_bias": True})
    (tmp_path / "b" / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="lack 'layers.2.input_layernorm.weight'"):
        load_hf_llama(tmp_path / "b")


@pytest.mark.parametrize("tie", [False, True])
def test_export_back_is_exact_and_loads_in_transformers(tmp_path, tie):
    """HF -> jzero -> HF gives the same tensors bit for bit (padded vocabulary dropped, scanned or unrolled), and
    the written directory (config rebuilt from a checkpoint's JSON meta) loads in transformers with jzero's logits."""
    from dataclasses import asdict

    from jzero.export import model_config_from_meta
    from models.hf_llama import params_to_hf, save_hf_llama

    model = hf_model(tie)
    model.save_pretrained(tmp_path / "in")
    ref = {k: v.numpy() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    for scan in (True, False):
        params, cfg = load_hf_llama(tmp_path / "in", vocab_size=128, scan_layers=scan)
        back = params_to_hf(params, cfg, vocab_size=100)
        assert sorted(back) == sorted(ref)
        assert all(np.array_equal(back[k], v) for k, v in ref.items())
    plain = {k: v for k, v in asdict(cfg).items() if isinstance(v, (bool, int, float, str, tuple))}
    cfg = model_config_from_meta({"model": json.loads(json.dumps({"family": "llama", **plain}))})
    save_hf_llama(params, cfg, tmp_path / "out", vocab_size=100)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    toks = np.random.default_rng(0).integers(0, 100, size=(2, 80))
    with torch.no_grad():
        got = again(torch.from_numpy(toks)).logits.numpy()
    out = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(toks, jnp.int32)))[..., :100]
    assert np.abs(got - out).max() < 1e-5
