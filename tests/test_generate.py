"""KV-cache generation (jzero.generation, models.kv_cache, jzero.weights, train.generate): cached decoding gives
the logits of a full recompute (fp32, 1e-5) for GPT-2 and Llama with left-padded prompts; greedy continuations of
tiny random HF GPT-2 / Llama equal transformers' generate token for token; tensor=2 equals tensor=1; weights from
a ZeRO-3 x tensor=2 checkpoint; seeds, chunking, stop tokens, streaming, the padded vocabulary; the CLI."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jzero
from jzero.errors import ConfigError
from jzero.generation import Generator
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig

VOCAB, REAL = 96, 90     # model rows, real vocabulary (rows 90..95 are padding: never sampled)
PROMPTS = [[5, 17, 33, 2, 71, 8, 40, 11, 3], [60, 12, 7, 88]]   # different lengths: row 1 is left-padded
NEW = 12


def _model(family):
    if family == "gpt2":
        return GPT2(GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, d_ff=64, max_len=64))
    return Llama(LlamaConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_len=64))


def _params(model, seed=0):
    """Random params N(0, 0.3) (norm scales 1 + N(0, 0.3)), drawn in numpy from the model's abstract init: the
    init's std 0.02 gives near-uniform logits and repetitive continuations, and every mapped tensor matters."""
    shapes = nn.unbox(jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0)))
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
    return jax.tree.unflatten(tree, [(jax.tree_util.keystr(path).endswith("['scale']") + 0.3 * rng.standard_normal(
        x.shape)).astype(np.float32) for path, x in flat])


@pytest.fixture(scope="module")
def gens():
    """GPT-2 decoding with the layer scan; Llama with the scanned params split into one program per layer
    (``unroll_layers``), so both cache paths are checked against the same scanned full recompute."""
    out = {}
    for family, unroll in (("gpt2", False), ("llama", True)):
        model = _model(family)
        params = _params(model)
        out[family] = (model, params, Generator(model, params, vocab_size=REAL, unroll_layers=unroll))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decoding_equals_full_recompute(gens, family):
    model, params, gen = gens[family]
    out = gen.generate(PROMPTS, NEW, chunk=4, return_logits=True)
    assert out.logits.shape == (2, NEW, VOCAB) and out.steps == NEW - 1
    forward = jax.jit(model.apply)
    for r, prompt in enumerate(PROMPTS):
        seq = np.zeros((1, 32), np.int32)     # no cache, no left padding; causal, so the zeros at the end are inert
        seq[0, : len(prompt) + NEW] = prompt + out.tokens[r]
        full = np.asarray(forward({"params": params}, jnp.asarray(seq)))[0]
        ref = full[len(prompt) - 1: len(prompt) - 1 + NEW, :REAL]
        err = np.abs(out.logits[r][:, :REAL] - ref).max()
        assert err < 1e-5, (family, r, err)
        assert out.tokens[r] == list(np.argmax(ref, -1))           # greedy = argmax of the real vocabulary
        assert np.all(np.isneginf(out.logits[r][:, REAL:]))         # padded rows never sampled
    assert ("block_1" in gen.params and "blocks" not in gen.params) == (family == "llama")   # llama: unrolled


def test_seed_chunking_stop_tokens_and_streaming(gens):
    _, _, gen = gens["gpt2"]
    kw = dict(temperature=1.5, top_k=40, top_p=0.95, seed=3)
    a = gen.generate(PROMPTS, NEW, chunk=4, **kw).tokens
    b = gen.generate(PROMPTS, NEW, chunk=1, **kw).tokens          # same seed, other chunking: same tokens
    c = gen.generate(PROMPTS, NEW, chunk=4, **{**kw, "seed": 4}).tokens
    d = gen.generate(PROMPTS, NEW, chunk=4, **{**kw, "seed": 3 + 2 ** 32}).tokens   # was seed 3's (low 32 bits)
    assert a == b and a != c and a != d
    assert all(t < REAL for row in a + c for t in row)
    stop = a[0][3]                      # row 0's 4th token as a stop token: row 0 ends there (kept), row 1 goes on
    streamed = []
    out = gen.generate(PROMPTS, NEW, chunk=4, stop_tokens=[stop], on_tokens=lambda s, t: streamed.append((s, t)),
                       **kw)
    first = a[0].index(stop)
    assert out.tokens[0] == a[0][: first + 1]
    row1 = a[1][: a[1].index(stop) + 1] if stop in a[1] else a[1]
    assert out.tokens[1] == row1
    assert [s for s, _ in streamed][:2] == [0, 1] and streamed[0][1].shape == (1, 2)
    flat = np.concatenate([t for _, t in streamed])
    assert list(flat[: first + 1, 0]) == out.tokens[0]
    if stop not in a[1]:    # both rows done only at the end: every chunk ran
        assert len(flat) >= NEW


def test_hf_greedy_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-5)),
    }
    prompts = np.random.default_rng(0).integers(0, 100, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0        # row 1 is a 4-token prompt, left-padded as HF batches it (positions from the mask)
    for name, model in models.items():
        model.eval().save_pretrained(tmp_path / name)
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(prompts * mask), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 7:].numpy()
        out = jzero.generate([prompts[0].tolist(), prompts[1, 3:].tolist()], hf=tmp_path / name, dtype="fp32",
                             max_new_tokens=20)
        assert np.array_equal(np.asarray(out.tokens), ref), name
        assert min(len(set(r.tolist())) for r in ref) > 5, "a degenerate continuation would prove little"


def test_prompt_bucket_stops_at_max_len(gens):
    """A request that fits max_len runs even where the prompt bucket would not: a 57-token prompt + 7 new on the
    max_len=64 model (bucket 40 -> 80 padded tokens) failed with 'sequence length 80 exceeds model.max_len=64'."""
    model, params, gen = gens["gpt2"]
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, REAL, 57)]
    gen.prompt_bucket = 40
    try:
        out = gen.generate([prompt], 7, chunk=7)
    finally:
        gen.prompt_bucket = 16
    seq = jnp.asarray([prompt + out.tokens[0]], jnp.int32)
    full = np.asarray(jax.jit(model.apply)({"params": params}, seq))[0, 56:-1, :REAL]
    assert out.tokens[0] == list(np.argmax(full, -1))


def test_tensor_parallel_equals_single_device(gens):
    model, params, gen1 = gens["llama"]
    gen2 = Generator(model, params, vocab_size=REAL, tensor=2, unroll_layers=True)
    q = gen2.params["block_0"]["attn"]["q_kernel"]
    assert q.sharding.spec[1] == "tensor" and q.addressable_shards[0].data.shape == (32, 2, 8)
    a = gen1.generate(PROMPTS, NEW, chunk=4, return_logits=True)
    b = gen2.generate(PROMPTS, NEW, chunk=4, return_logits=True)
    assert a.tokens == b.tokens
    assert np.abs(a.logits[..., :REAL] - b.logits[..., :REAL]).max() < 1e-5
    # the cache is split over K/V heads like the K/V projections (the prefill program generate just compiled)
    from jzero import kernels, sharding

    with jax.set_mesh(gen2.mesh), sharding.activate(gen2.mesh, gen2.rules), kernels.suspended():
        _, cache, _ = gen2._prefill(gen2.params, np.zeros((2, 16), np.int32), np.zeros(2, np.int32),
                                    jax.random.PRNGKey(0), np.asarray([0.0, 1.0], np.float32), slots=32,
                                    mode=(True, 0, False))
    assert cache.k_LxBxSxKxH.addressable_shards[0].data.shape == (2, 2, 32, 1, 8)    # [L, B, S, K/2, H]
    with pytest.raises(ConfigError, match="n_kv_head=2 is not divisible by mesh.tensor=4"):
        Generator(model, params, tensor=4)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """(run directory, params) of a tiny Llama checkpointed under ZeRO-3 x tensor=2 (embedded byte-level data)."""
    from jzero import checkpoint
    from jzero.config import load_config

    cfg = load_config(base={}, overrides=[
        "model.family=llama", "model.preset=llama-tiny", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
        "model.n_kv_head=2", "model.d_ff=64", "data.seq_len=32", "train_batch_size=8", "zero_optimization.stage=3", "mesh.tensor=2",
        "zero_optimization.stage3_param_persistence_threshold=0"])
    eng = jzero.initialize(cfg)
    run = tmp_path_factory.mktemp("zero3") / "run"
    eng.save_checkpoint(run / "checkpoints")
    checkpoint.wait_until_finished(run / "checkpoints")
    return run, jax.tree.map(np.asarray, jax.device_get(eng.state.params))


def test_weights_from_a_zero3_tensor_parallel_checkpoint(zero3_run, capsys):
    run, want = zero3_run
    gen = Generator.from_checkpoint(run, dtype="fp32", tensor=2, unroll_layers=False)
    assert gen.vocab_size == 256 and isinstance(gen.model, Llama)
    got = jax.tree.map(np.asarray, jax.device_get(gen.params))
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    seq = np.zeros((1, 11), np.int32)     # greedy by full recompute: causal, so the zeros after t do not matter
    seq[0, :5] = [1, 2, 3, 4, 5]
    forward = jax.jit(gen.model.apply)
    for t in range(5, 11):
        seq[0, t] = int(np.argmax(np.asarray(forward({"params": want}, jnp.asarray(seq)))[0, t - 1]))
    assert gen.generate([[1, 2, 3, 4, 5]], 6).tokens == [seq[0, 5:].tolist()]
    # the CLI on the run directory: byte-level tokenizer (the run's data is the embedded default), streamed
    from train.generate import ByteTokenizer, main

    capsys.readouterr()
    assert main(["--checkpoint", str(run), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--tensor", "2"]) == 0
    assert capsys.readouterr().out == ByteTokenizer().decode(seq[0].tolist()) + "\n"


def test_llama_checkpoint_exports_to_transformers(zero3_run, tmp_path, capsys):
    """train.export --format hf of a Llama run (ZeRO-3 x tensor=2) loads in transformers with jzero's logits; it
    was refused ("Hugging Face export is implemented for gpt2 only")."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.llama import LlamaConfig as Cfg
    from train.export import main

    run, params = zero3_run
    assert main([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    toks = np.random.default_rng(0).integers(0, 256, (2, 24))
    with torch.no_grad():
        got = hf(torch.from_numpy(toks)).logits.numpy()
    cfg = Cfg(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_len=256)
    want = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(toks, jnp.int32)))
    assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())
    assert hf.config.eos_token_id is None     # transformers' default 2 would stop generate at byte 0x02


@pytest.mark.parametrize("argv,err", [
    (["--max-new-tokens", "2000"], "prompt (3 tokens) + max_new_tokens (2000) = 2003 exceeds the model's max_len=256; "
                                   "shorten the prompt or generate less"),
    (["--stop", "300"], "token id 300 is outside the vocabulary 0..255; check the prompt ids / stop tokens / pad id "
                        "against the model's tokenizer"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give a count >= 1"),
    (["--chunk", "-2"], "--chunk -2: give a count >= 1"),
    (["--step", "-1"], "--step -1: give a checkpoint step >= 0, or leave it out for the latest"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: give an integer that fits in 64 bits"),
    (["--temperature", "-1"], "temperature=-1.0 is negative; use 0 (greedy) or a positive value")])
def test_cli_checks_before_printing_the_prompt(zero3_run, capsys, argv, err):
    """The streamed prompt used to go out before the checks, and the error was glued onto it ("deferror: ...")."""
    from train.generate import main

    assert main(["--checkpoint", str(zero3_run[0]), "--prompt", "def", "--dtype", "fp32"] + argv) == 2
    assert capsys.readouterr() == ("", f"error: {err}\n")


def test_cli_error_after_streaming_starts_on_its_own_line(zero3_run, capsys, monkeypatch):
    from train.generate import main

    def fail(self, prompts, max_new_tokens, on_tokens=None, **kw):
        on_tokens(0, np.asarray([[ord("!")]]))
        raise ConfigError("decoding failed")

    monkeypatch.setattr(Generator, "generate", fail)
    assert main(["--checkpoint", str(zero3_run[0]), "--prompt", "def", "--dtype", "fp32"]) == 2
    assert capsys.readouterr() == ("def!\n", "error: decoding failed\n")


def test_errors_name_the_fix(gens, tmp_path, capsys):
    _, _, gen = gens["gpt2"]
    with pytest.raises(ConfigError, match="exceeds the model's max_len=64"):
        gen.generate([[1] * 60], 10)
    with pytest.raises(ConfigError, match="token id 95 is outside the vocabulary 0..89"):
        gen.generate([[95]], 2)
    with pytest.raises(ConfigError, match="need sampling"):
        gen.generate([[1]], 2, top_k=5)
    with pytest.raises(ConfigError, match="exactly one of checkpoint=, hf=, model="):
        jzero.generate([[1]], hf="x", checkpoint="y")
    # text, a flat id list or a float id: one line naming the fix (2.7 was cut to 2, "Hello" failed as int('H'))
    for prompts, where in (("Hello", "prompts='Hello'"), ([1, 2], "prompt 0 is 1, not a sequence of token ids"),
                           ([[1, 2.7]], "prompt 0 holds 2.7, not an integer token id"),
                           ([[1], [True]], "prompt 1 holds True, not an integer token id")):
        with pytest.raises(ConfigError) as e:
            gen.generate(prompts, 2)
        assert str(e.value) == f"{where}: pass a list of token-id lists, e.g. [[15496, 11], [40]] (text goes " \
                               "through the model's tokenizer first; python -m train.generate --prompt does that)"
    assert gen.generate(np.asarray([[1, 2]], np.int64), 2).tokens == gen.generate([[1, 2]], 2).tokens
    model, _, _ = gens["gpt2"]   # a model passed in computes in its cfg.dtype: dtype= was accepted and ignored
    with pytest.raises(ConfigError, match=r"^dtype='bf16' applies to checkpoint= and hf=; a model= computes in its "
                                          r"own cfg.dtype \(float32\): build the model"):
        jzero.generate([[1]], model=model, params={}, dtype="bf16")
    from train.generate import main

    assert main(["--hf", str(tmp_path / "none"), "--prompt-ids", "1,2"]) == 2
    assert f"error: {tmp_path / 'none' / 'config.json'} not found" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["--hf", str(tmp_path), "--step", "3", "--prompt-ids", "1"]) == 2
    assert "--step applies to --checkpoint only" in capsys.readouterr().err
