"""HF GPT-2 interop: a tiny random ``transformers`` GPT-2 saved with save_pretrained loads into jzero's GPT-2 with
the same logits, exports back tensor for tensor, and a jzero checkpoint exports (``train.export --format hf``) to
a directory ``GPT2LMHeadModel.from_pretrained`` loads with jzero's logits."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jzero.errors import CheckpointError, ConfigError  # noqa: E402
from models.gpt2 import GPT2  # noqa: E402
from models.hf_gpt2 import load_hf_gpt2, params_to_hf  # noqa: E402

VOCAB, PADDED = 100, 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():   # non-trivial LayerNorms and biases, so every mapped tensor matters
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    return path, model


def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, size=(2, 24)).astype(np.int32)


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.from_numpy(toks.astype(np.int64))).logits.numpy()


def jzero_logits(params, cfg, toks):
    return np.asarray(GPT2(cfg).apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(toks)))


def test_hf_weights_give_the_same_logits(hf_dir):
    path, model = hf_dir
    params, cfg = load_hf_gpt2(path, vocab_size=PADDED)
    assert params["wte"].shape == (PADDED, 64) and not params["wte"][VOCAB:].any()
    assert params["blocks"]["attn"]["qkv_kernel"].shape == (2, 64, 3, 4, 16)
    toks = tokens()
    ref = hf_logits(model, toks)
    out = jzero_logits(params, cfg, toks)
    assert out.shape == (2, 24, PADDED)
    err = np.max(np.abs(out[..., :VOCAB] - ref))
    assert err < 2e-6, err
    # unscanned layout (block_i) computes the same
    params_u, cfg_u = load_hf_gpt2(path, vocab_size=PADDED, scan_layers=False)
    assert "block_1" in params_u
    assert np.max(np.abs(jzero_logits(params_u, cfg_u, toks)[..., :VOCAB] - ref)) < 2e-6


def test_export_back_is_exact(hf_dir):
    path, model = hf_dir
    params, cfg = load_hf_gpt2(path, vocab_size=PADDED)
    back = params_to_hf(params, cfg, vocab_size=VOCAB)
    ref = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(back) == sorted(ref)
    for k, v in ref.items():
        assert np.array_equal(back[k], v), k


def test_unsupported_hf_config_is_refused(hf_dir, tmp_path):
    path, _ = hf_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    hf = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, "activation_function": "relu"}))
    with pytest.raises(ConfigError, match="activation_function='relu'"):
        load_hf_gpt2(bad)
    (bad / "config.json").write_text(json.dumps({**hf, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="lack 'h.2.ln_1.weight'"):
        load_hf_gpt2(bad)
    with pytest.raises(ConfigError, match="smaller than the HF model's vocab_size=100"):
        load_hf_gpt2(path, vocab_size=64)


def test_checkpoint_exports_to_transformers(hf_dir, tmp_path):
    """HF weights -> jzero engine (ZeRO-3 over 8 devices) -> checkpoint -> train.export --format hf -> transformers."""
    import jzero
    from jzero.config import load_config
    from train.export import main

    path, _ = hf_dir
    params, cfg = load_hf_gpt2(path, vocab_size=PADDED)
    eng = jzero.initialize(load_config(base={}, overrides=[
        "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_ff=256", f"model.vocab_size={PADDED}",
        "model.max_len=64", "data.seq_len=32", "train_batch_size=8", "zero_optimization.stage=3",
        "zero_optimization.stage3_param_persistence_threshold=0"]), vocab_size=PADDED)
    eng.state = eng.state.replace(params=jax.device_put(params, eng.state_shardings.params))
    eng.save_checkpoint(tmp_path / "ckpt", tag=7)
    out = tmp_path / "hf_out"
    assert main([str(tmp_path / "ckpt"), "--format", "hf", "--out", str(out), "--vocab-size", str(VOCAB)]) == 0
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    toks = tokens()
    ref = jzero_logits(params, cfg, toks)[..., :VOCAB]
    assert np.max(np.abs(hf_logits(again, toks) - ref)) < 2e-6
