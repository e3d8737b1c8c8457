"""Text generation with a KV cache: prefill and decode as two jitted programs, sharded over ``tensor``.

    gen = Generator.from_checkpoint("runs/default", tensor=2, dtype="bf16")   # or .from_hf("gpt2_dir")
    out = gen.generate([[15496, 11], [40]], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0,
                       stop_tokens=[50256], on_tokens=lambda step, toks: print(toks))
    out.tokens                       # the new tokens of each prompt, cut after its first stop token
    jzero.generate([[15496, 11]], hf="gpt2_dir", max_new_tokens=16)           # one call: load, compile, generate

The two programs (:mod:`models.kv_cache` holds the cache layout):

- **prefill** ``(params, tokens_BxP, start_B, key) -> (token_B, cache)``: the prompts, left-padded to a common
  length ``P`` (rounded up to a multiple of ``prompt_bucket``, at most ``max_len``, so nearby lengths share one
  compiled program), run through the model in one pass writing slots ``0..P-1`` of a fresh cache; the head is
  applied to the last position only (with left padding it is every row's last prompt token) and the first new
  token sampled.
- **decode** ``(params, cache, token_B, done_B, key, step) -> (tokens_NxB, cache, token_B, done_B)``: ``chunk``
  decode steps in one ``lax.scan`` (feed the last token, sample the next), the cache donated so XLA updates it
  in place. Between chunks the host streams the chunk's tokens (``on_tokens``) and stops early when every row has
  hit a stop token; with neither, chunks are dispatched back to back without a host sync.

Sampling is :mod:`jzero.sampling`; step ``i``'s random key is ``fold_in(seed_key(seed), i)``, so a seed gives the
same tokens whatever the chunk size. A row that emitted a stop token keeps decoding (the batch is one program)
but its later tokens are ``pad_id`` and dropped from ``tokens``. Logits of padded vocabulary rows (jzero pads
50257 -> 50304 so tensor sizes divide it) are ``-inf``: only the real ``vocab_size`` ids are ever sampled.

Weights: params are placed once in their compute layout by the model's logical-axis rules
(:mod:`jzero.sharding`) on a ``(pipeline=1, data=1, tensor=T)`` mesh of the first ``T`` devices, matrices stored
in the compute dtype (what the model would cast them to on every step anyway; norms stay fp32), so a model
``T`` times larger than one device fits. Decoding traces with the GPU kernels of :mod:`jzero.kernels` off
(:func:`jzero.kernels.suspended`): they are shaped for training's many-row blocks; XLA fuses decoding well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from jzero import kernels
from jzero import sharding as shd
from jzero.errors import ConfigError
from jzero.sampling import SamplingConfig, sample, seed_key
from models.kv_cache import CACHE_AXES, KVCache

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclass
class GenerationResult:
    """New tokens per prompt (cut after the first stop token, which is kept) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float = 0.0          # prefill program incl. the first token, and its compile on a new shape
    decode_s: float = 0.0           # all decode chunks, and their compile on a new shape
    steps: int = 0                  # decode steps run (the batch's tokens after the first; early stop cuts them)
    logits: np.ndarray | None = None   # [B, steps + 1, V] fp32 when asked for (return_logits=True; tests)


def generation_mesh(tensor: int = 1, devices=None) -> Mesh:
    """``(pipeline=1, data=1, tensor)`` over the first ``tensor`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor < 1 or tensor > len(devices):
        raise ConfigError(f"tensor={tensor} needs 1..{len(devices)} devices ({len(devices)} visible); "
                          f"choose a tensor size that fits")
    return Mesh(np.asarray(devices[:tensor]).reshape(1, 1, tensor), ("pipeline", "data", "tensor"),
                axis_types=(AxisType.Auto,) * 3)


def _is_matrix(names: tuple) -> bool:
    return len([n for n in names if n != "layers"]) >= 2


def place_params(model: nn.Module, params, mesh: Mesh, dtype, rules: shd.LogicalRules = shd.DEFAULT_RULES):
    """``params`` (host or device arrays, the model's tree) on ``mesh`` in their compute layout, matrices in
    ``dtype``; a tree that does not match the model, or sizes ``tensor`` does not divide, are ConfigErrors."""
    cfg = model.cfg
    params = nn.unbox(params)   # Flax init's LogicallyPartitioned boxes, if any
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))["params"]
    names = shd.logical_names(boxed)
    abstract = nn.unbox(boxed)
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in sorted(set(want) | set(have)):
        if want.get(path) != have.get(path):
            raise ConfigError(f"param {path}: the weights have shape {have.get(path)} but the "
                              f"{type(model).__name__} config (n_layer={cfg.n_layer}, d_model={cfg.d_model}, "
                              f"scan_layers={cfg.scan_layers}) wants {want.get(path)}; the weights and config differ")
    try:
        plan = shd.make_plan(abstract, names, mesh, zero_stage=0, rules=rules)
    except ValueError as exc:
        raise ConfigError(f"tensor={mesh.shape['tensor']}: {exc}") from None

    def put(x, n, s):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.device_put(x.astype(dtype if _is_matrix(n) else jnp.float32), s)

    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    flat_names = jax.tree.leaves(names, is_leaf=is_names)
    flat_p, treedef = jax.tree.flatten(params)
    flat_s = jax.tree.leaves(plan.param_compute)
    return jax.tree.unflatten(treedef, [put(x, n, s) for x, n, s in zip(flat_p, flat_names, flat_s)])


def token_id_lists(prompts) -> list[list[int]]:
    """``prompts`` as lists of Python ints: a list (or array) of token-id sequences. Text, a flat list of ids
    and non-integer ids (2.7 used to be cut to 2, "Hello" failed as ``int('H')``) are one-line ConfigErrors."""
    fix = ("pass a list of token-id lists, e.g. [[15496, 11], [40]] (text goes through the model's tokenizer "
           "first; python -m train.generate --prompt does that)")
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ConfigError(f"prompts={prompts!r:.60}: {fix}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise ConfigError(f"prompt {i} is {p!r:.60}, not a sequence of token ids: {fix}")
        ids = list(p)
        bad = [t for t in ids if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer))]
        if bad:
            raise ConfigError(f"prompt {i} holds {bad[0]!r:.60}, not an integer token id: {fix}")
        out.append([int(t) for t in ids])
    return out


class Generator:
    """A model, its placed params and its compiled prefill/decode programs (compiled on first use per shape)."""

    def __init__(self, model: nn.Module, params, *, vocab_size: int | None = None, tensor: int = 1,
                 devices=None, rules: shd.LogicalRules = shd.DEFAULT_RULES, prompt_bucket: int = 16,
                 unroll_layers: bool = True):
        """``unroll_layers`` (default): decode with the layers unrolled instead of the layer scan (the stacked params
        are split into ``block_{i}``): no loop inside each decode step, for a longer compile. On an H200 this is
        1.7x (Llama-1B) and 1.05x (GPT-2 124M, batch 1) faster per token (BENCHMARKS.md, sessions 5-6);
        ``False`` keeps the scan (GPT-2 at batch 32 is 1.1x faster scanned)."""
        params = nn.unbox(params)
        if unroll_layers and model.cfg.scan_layers:
            model = type(model)(replace(model.cfg, scan_layers=False))
            params = {k: v for k, v in params.items() if k != "blocks"} | {
                f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(model.cfg.n_layer)}
        self.model, self.cfg = model, model.cfg
        self.dtype = self.cfg.dtype
        self.vocab_size = int(vocab_size or self.cfg.vocab_size)
        if not 0 < self.vocab_size <= self.cfg.vocab_size:
            raise ConfigError(f"vocab_size={self.vocab_size} must be in 1..{self.cfg.vocab_size} (the model's rows)")
        self.mesh = generation_mesh(tensor, devices)
        self.rules = rules
        self.prompt_bucket = max(1, int(prompt_bucket))
        self.params = place_params(model, params, self.mesh, self.dtype, rules)
        self.n_kv_head = getattr(self.cfg, "n_kv_head", self.cfg.n_head)
        self.head_dim = self.cfg.d_model // self.cfg.n_head
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("slots", "mode"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("n", "mode", "pad_id", "keep_logits"),
                               donate_argnames=("cache",))

    # ------------------------------------------------------------------ the two programs

    def _logits(self, hidden_BxD, w_VxD):
        logits = jnp.einsum("bd,vd->bv", hidden_BxD, w_VxD, preferred_element_type=jnp.float32)
        logits = shd.constrain(logits, ("batch", "vocab"))
        if self.vocab_size < logits.shape[-1]:   # padded vocabulary rows are never sampled
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_size, logits, -jnp.inf)
        return logits

    def _prefill_fn(self, params, tokens_BxP, start_B, key, knobs, *, slots: int, mode: tuple):
        B = tokens_BxP.shape[0]
        cache = KVCache.zeros(self.cfg.n_layer, B, slots, self.n_kv_head, self.head_dim, self.dtype, start_B)
        cache = cache.replace(k_LxBxSxKxH=shd.constrain(cache.k_LxBxSxKxH, CACHE_AXES),
                              v_LxBxSxKxH=shd.constrain(cache.v_LxBxSxKxH, CACHE_AXES))
        (hidden, w), cache = self.model.apply({"params": params}, tokens_BxP, head=False, cache=cache)
        logits = self._logits(hidden[:, -1], w)
        return sample(logits, jax.random.fold_in(key, 0), mode, knobs[0], knobs[1]), cache, logits

    def _decode_fn(self, params, cache, token_B, done_B, key, step, knobs, stop_ids, *, n: int, mode: tuple,
                   pad_id: int, keep_logits: bool):

        def one(carry, i):
            cache, tok, done = carry
            (hidden, w), cache = self.model.apply({"params": params}, tok[:, None], head=False, cache=cache)
            logits = self._logits(hidden[:, -1], w)
            nxt = sample(logits, jax.random.fold_in(key, step + i), mode, knobs[0], knobs[1])
            out = jnp.where(done, pad_id, nxt)
            done = done | jnp.isin(nxt, stop_ids)
            return (cache, nxt, done), (out, logits if keep_logits else None)

        (cache, tok, done), (toks_NxB, logits) = jax.lax.scan(one, (cache, token_B, done_B),
                                                              jnp.arange(n, dtype=jnp.int32))
        return toks_NxB, cache, tok, done, logits

    # ------------------------------------------------------------------ the loop

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
                 pad_id: int = 0, chunk: int = 8, on_tokens: Callable[[int, np.ndarray], None] | None = None,
                 return_logits: bool = False) -> GenerationResult:
        """New tokens for each prompt (token-id lists). ``on_tokens(step, tokens_NxB)`` streams each decoded
        chunk (step 0 is the prefill's token, ``[1, B]``); ``pad_id`` fills the left padding and the finished rows."""
        sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
        prompts = token_id_lists(prompts)
        self.check(prompts, max_new_tokens, chunk, stop_tokens, pad_id)
        B = len(prompts)
        longest = max(len(p) for p in prompts)
        P = -(-longest // self.prompt_bucket) * self.prompt_bucket
        # the bucket never takes the padded prompt past max_len (the model refuses longer inputs): a 17-token prompt
        # + 3 new on a max_len=20 model passed check() and then failed with a ValueError for the 32 padded tokens
        P = min(P, getattr(self.cfg, "max_len", None) or P)
        n_chunks = -(-(max_new_tokens - 1) // chunk)
        # the last chunk may run past max_new_tokens (its extra tokens are dropped); slots rounded up to a multiple
        # of 32 so nearby max_new_tokens share the compiled programs (the extra slots are never attended to)
        slots = -(-(P + n_chunks * chunk) // 32) * 32
        tokens = np.full((B, P), pad_id, np.int32)
        for r, p in enumerate(prompts):
            tokens[r, P - len(p):] = p
        start = np.asarray([P - len(p) for p in prompts], np.int32)
        key = seed_key(seed)
        stop = sorted(set(int(s) for s in stop_tokens))
        stop_ids = np.asarray(stop or [-1], np.int32)   # traced: another stop set does not recompile
        knobs = np.asarray([sampling.temperature, sampling.top_p], np.float32)
        sync = on_tokens is not None or bool(stop)

        with jax.set_mesh(self.mesh), shd.activate(self.mesh, self.rules), kernels.suspended():
            t0 = time.perf_counter()
            tok, cache, logits0 = self._prefill(self.params, tokens, start, key, knobs, slots=slots,
                                                mode=sampling.mode)
            first = np.asarray(tok)[None]    # host copy: the first token is streamed / checked at once
            t1 = time.perf_counter()
            if on_tokens is not None:
                on_tokens(0, first)
            done = jnp.asarray(np.isin(first[0], stop))
            chunks, logit_chunks, step = [first], [np.asarray(logits0)[:, None]] if return_logits else [], 1
            for _ in range(n_chunks):
                if sync and bool(np.all(np.asarray(done))):
                    break
                toks, cache, tok, done, logits = self._decode(self.params, cache, tok, done, key, step, knobs,
                                                              stop_ids, n=chunk, mode=sampling.mode, pad_id=pad_id,
                                                              keep_logits=return_logits)
                if sync:
                    toks = np.asarray(toks)
                    if on_tokens is not None:   # the last chunk's steps past max_new_tokens are not streamed
                        on_tokens(step, toks[: max_new_tokens - step])
                chunks.append(toks)
                if return_logits:
                    logit_chunks.append(np.swapaxes(np.asarray(logits), 0, 1))
                step += chunk
            all_NxB = np.concatenate([np.asarray(c) for c in chunks])[:max_new_tokens]
            t2 = time.perf_counter()
        out = []
        for r in range(B):
            row = all_NxB[:, r].tolist()
            hit = [i for i, t in enumerate(row) if t in stop]
            out.append(row[: hit[0] + 1] if hit else row)
        logits = np.concatenate(logit_chunks, 1)[:, :max_new_tokens] if return_logits else None
        return GenerationResult(out, prefill_s=t1 - t0, decode_s=t2 - t1, steps=min(step, max_new_tokens) - 1,
                                logits=logits)

    def check(self, prompts, max_new_tokens, chunk=1, stop_tokens=(), pad_id=0) -> None:
        """Raise the one-line ConfigError :meth:`generate` would for these arguments (empty prompts, counts < 1,
        token ids outside the vocabulary, prompt + new tokens past ``max_len``), without running anything; a CLI
        calls it before it prints the prompt."""
        prompts = token_id_lists(prompts)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token (an empty prompt has nothing to continue)")
        if max_new_tokens < 1 or chunk < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} and chunk={chunk} must be >= 1")
        for t in [t for p in prompts for t in p] + [int(s) for s in stop_tokens] + [pad_id]:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(f"token id {t} is outside the vocabulary 0..{self.vocab_size - 1}; check the "
                                  f"prompt ids / stop tokens / pad id against the model's tokenizer")
        longest = max(len(p) for p in prompts) + max_new_tokens
        max_len = getattr(self.cfg, "max_len", None)
        if max_len is not None and longest > max_len:
            raise ConfigError(f"prompt ({longest - max_new_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                              f"{longest} exceeds the model's max_len={max_len}; shorten the prompt or generate less")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, path, step: int | None = None, dtype: str = "bf16", **kw) -> "Generator":
        """From a jzero run directory (holding ``checkpoints/``) or a checkpoint directory, any mesh or ZeRO stage."""
        from jzero.weights import load_checkpoint

        model, params, vocab = load_checkpoint(path, step, _dtype(dtype))
        return cls(model, params, vocab_size=kw.pop("vocab_size", vocab), **kw)

    @classmethod
    def from_hf(cls, path, dtype: str = "bf16", **kw) -> "Generator":
        """From a local Hugging Face directory (``config.json`` + safetensors) of a GPT-2 or Llama model."""
        from jzero.weights import load_hf

        model, params, vocab = load_hf(path, _dtype(dtype), pad_to=max(1, kw.get("tensor", 1)))
        return cls(model, params, vocab_size=kw.pop("vocab_size", vocab), **kw)


def _dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not one of {list(DTYPES)}")
    return DTYPES[name]


def generate(prompts: Sequence[Sequence[int]], *, checkpoint=None, hf=None, model: nn.Module | None = None,
             params: Any = None, tensor: int = 1, dtype: str | None = None, **kwargs) -> GenerationResult:
    """One call: build a :class:`Generator` from exactly one of ``checkpoint=DIR``, ``hf=DIR`` or
    ``model=..., params=...`` and run :meth:`Generator.generate` (``max_new_tokens``, sampling, ``stop_tokens``,
    ``seed``, ``on_tokens`` ... as keywords). Reuse a Generator to generate repeatedly without recompiling.
    ``dtype`` (default bf16) is the loaded weights' compute dtype; a ``model=`` computes in its own ``cfg.dtype``."""
    given = [n for n, v in (("checkpoint", checkpoint), ("hf", hf), ("model", model)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"pass exactly one of checkpoint=, hf=, model= (got {given or 'none'})")
    if model is not None and params is None:
        raise ConfigError("model= needs params= (the model's param tree)")
    if model is not None and dtype is not None:   # it would be ignored: the model's cfg.dtype decides
        raise ConfigError(f"dtype={dtype!r} applies to checkpoint= and hf=; a model= computes in its own cfg.dtype "
                          f"({jnp.dtype(model.cfg.dtype).name}): build the model with the dtype you want and drop "
                          "dtype=")
    dtype = dtype or "bf16"
    gen_keys = ("vocab_size", "devices", "rules", "prompt_bucket", "unroll_layers")
    gkw = {k: kwargs.pop(k) for k in gen_keys if k in kwargs}
    if checkpoint is not None:
        gen = Generator.from_checkpoint(checkpoint, dtype=dtype, tensor=tensor, **gkw)
    elif hf is not None:
        gen = Generator.from_hf(hf, dtype=dtype, tensor=tensor, **gkw)
    else:
        gen = Generator(model, params, tensor=tensor, **gkw)
    return gen.generate(prompts, **kwargs)


__all__ = ["Generator", "GenerationResult", "generate", "generation_mesh", "place_params", "token_id_lists"]
