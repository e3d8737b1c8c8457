"""Building blocks shared by the model families: embeddings, attention, MLPs, the stack of blocks.

Parameters come from :func:`models.params.param` (logical axis names, fp32 masters, compute-dtype reads) and the
norms from :mod:`models.norms`; both are re-exported here. Activations are named with ``checkpoint_name`` so remat
policies can save or offload them by name.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jzero import kernels, pipeline
from jzero.kernels import gelu_gemm as kernel_gg
from jzero.kernels import layer_norm as kernel_ln
from jzero.kernels import swiglu as kernel_sw
from jzero.sharding import constrain
from models.kv_cache import attend_cached
from models.norms import LayerNorm, Residual, RMSNorm, block_input, final_norm, layer_norm  # noqa: F401 (re-export)
from models.params import RESIDUAL, SUBLAYER_INPUT, Dtype, low_precision, param  # noqa: F401 (re-export)


def qkv_inputs() -> int:
    """How many outputs a block's input norm gives its attention: 3 (one each for the q, k and v projections, so
    their gradients are summed inside the norm's backward kernel), or 1 where the sub-layer input is gathered from
    the residual layout (sequence parallelism: one all-gather, and one reduce-scatter back, rather than three)."""
    got = kernels.row_spec(RESIDUAL)
    if got is None or got[0].size == 1:
        return 3
    return 3 if kernels.row_spec(SUBLAYER_INPUT)[1] == got[1] else 1


def _sublayer_inputs(x, n: int):
    """``n`` sub-layer inputs in their compute layout from ``x``, one array or a tuple of ``n`` (copies of one
    norm's output, each to its own consumer: :func:`qkv_inputs`)."""
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,) * n
    if len(xs) != n:
        raise ValueError(f"expected 1 or {n} sub-layer inputs, got {len(xs)}")
    return tuple(constrain(t, SUBLAYER_INPUT) for t in xs)


def embed_lookup(table_VxD: jax.Array, ids_BxT: jax.Array) -> jax.Array:
    """``table_VxD[ids_BxT]`` (rows in the table's dtype) whose gradient is summed in fp32.

    The gradient of a gather is a scatter-add of ``[B*T, D]`` rows into ``[V, D]``. Autodiff emits it in the
    table's compute dtype: in bf16 a GPU has no native atomic add, and text repeats tokens (a byte-level corpus has
    ~100 distinct ids, natural text is Zipfian), so the colliding compare-and-swap loops serialise. Here the sum
    runs in fp32 (native atomics) and is rounded once to the table's dtype: on an H200 the GPT-2 124M main on the
    byte-level corpus went from ~410k to ~520k tokens/s (BENCHMARKS.md, session 5), and a bf16 sum also stops
    growing once it reaches 256x an addend (a token seen 4096 times got 256 in tests/test_layers.py).
    """
    return _embed_lookup(table_VxD.shape[0], table_VxD, ids_BxT)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _embed_lookup(vocab: int, table_VxD, ids_BxT):
    return jnp.take(table_VxD, ids_BxT, axis=0)


def _embed_lookup_fwd(vocab, table_VxD, ids_BxT):
    return jnp.take(table_VxD, ids_BxT, axis=0), ids_BxT


def _embed_lookup_bwd(vocab, ids_BxT, g_BxTxD):
    g_NxD = g_BxTxD.reshape(-1, g_BxTxD.shape[-1]).astype(jnp.float32)
    d_VxD = jnp.zeros((vocab, g_NxD.shape[1]), jnp.float32).at[ids_BxT.reshape(-1)].add(g_NxD)
    return d_VxD.astype(g_BxTxD.dtype), None


_embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


def attention_impl(choice: str) -> str | None:
    """'auto' -> cuDNN flash attention on GPU, XLA elsewhere."""
    if choice == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return choice


@jax.custom_vjp
def gelu_tanh(x):
    """GELU (tanh approximation; ``jax.nn.gelu(approximate=True)``) whose backward needs only ``x``.

    With autodiff the forward also writes ``tanh(...)`` for the backward pass (one more [B, T, d_ff] array out
    and back in); here the backward recomputes it from ``x`` in fp32 (closer to an fp32 reference than bf16
    autodiff: BENCHMARKS.md, "Notes: predictions vs measurements", with its step time on GPT-2 124M). The forward
    is jax.nn.gelu's own expression, yet XLA (jax 0.11.2) still does not fold it into a cuBLASLt GELU epilogue.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, g):
    d = kernel_gg.gelu_tanh_grad(x.astype(jnp.float32))
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, impl: str) -> jax.Array:
    """Causal scaled dot-product attention, BTNH layout, GQA when K < N heads."""
    return attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, impl, causal=True)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, impl: str, causal: bool, key_mask_BxS=None) -> jax.Array:
    """Scaled dot-product attention, BTNH layout, GQA when K < N heads.

    ``key_mask_BxS`` (1 = real token) hides padded keys. With XLA it is a boolean mask; cuDNN takes key lengths
    instead, so there the padding must be on the right (what jzero's tasks produce).
    """
    if impl == "cudnn" and q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        impl = "xla"  # cuDNN flash attention needs 16-bit inputs
    kwargs = {}
    if key_mask_BxS is not None:
        if impl == "cudnn":
            kwargs["key_value_seq_lengths"] = key_mask_BxS.astype(jnp.int32).sum(-1)
        else:
            kwargs["mask"] = key_mask_BxS.astype(bool)[:, None, None, :]
    if impl == "xla" and q_BxTxNxH.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA:CPU has no fp16 x fp16 -> fp32 dot (which XLA attention asks for): compute in fp32 there
        q, k, v = (t.astype(jnp.float32) for t in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl,
                                            **kwargs).astype(jnp.float16)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=causal, implementation=impl,
                                        **kwargs)


def rope_frequencies(H: int, theta: float, scaling: tuple | None = None) -> jax.Array:
    """RoPE's ``H/2`` inverse frequencies ``theta**(-2i/H)`` (fp32); ``scaling`` = Llama 3.1's
    ``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``: wavelengths longer than
    ``original / low_freq_factor`` are stretched by ``factor``, shorter than ``original / high_freq_factor`` kept,
    and the band between interpolated (HF's ``rope_type='llama3'``)."""
    inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if scaling is None:
        return inv_freq_H2
    factor, low, high, original = (float(v) for v in scaling)
    wavelen = 2 * math.pi / inv_freq_H2
    scaled = jnp.where(wavelen > original / low, inv_freq_H2 / factor, inv_freq_H2)
    smooth = (original / wavelen - low) / (high - low)
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return jnp.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope(x_BxTxNxH, theta: float, positions_BxT=None, scaling: tuple | None = None) -> jax.Array:
    """Rotary position embedding (Su et al.; the half-split layout of Llama/GPT-NeoX), computed in fp32.

    Pairs dim i with dim i + H/2 and rotates each pair by ``position / theta**(2i/H)``: a query-key dot product
    then depends only on their relative position. Positions are ``0 .. T-1`` unless ``positions_BxT`` gives each
    token's (decoding with a KV cache: see :mod:`models.kv_cache`); ``scaling``: see :func:`rope_frequencies`.
    """
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
    inv_freq_H2 = rope_frequencies(H, theta, scaling)
    if positions_BxT is None:
        angle_TxH2 = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq_H2[None, :]
        cos = jnp.cos(angle_TxH2)[None, :, None, :]
        sin = jnp.sin(angle_TxH2)[None, :, None, :]
    else:
        angle_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
        cos = jnp.cos(angle_BxTxH2)[:, :, None, :]
        sin = jnp.sin(angle_BxTxH2)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
    """Attention with separate Q/K/V projections (Llama, BERT), Megatron-split over heads.

    Q/K/V are column-parallel ('heads' / 'kv_heads' on their output dim), the output projection row-parallel
    ('heads' on its input dim). Grouped-query attention when ``n_kv_head < n_head`` (each K/V head serves
    ``n_head // n_kv_head`` query heads; both head dims split over ``tensor``, so ``tensor`` must divide
    ``n_kv_head``). Optional biases (BERT), RoPE (Llama), causal or bidirectional with a key padding mask.
    With ``kv=(k_old, v_old), ctx`` (decoding, :mod:`models.kv_cache`) it attends over the cache plus the new
    tokens and returns ``(out, (k_new, v_new))``.
    """

    n_head: int
    n_kv_head: int
    dtype: Dtype
    attention: str
    out_init_std: float
    causal: bool = True
    use_bias: bool = False
    rope_theta: float | None = None
    rope_scaling: tuple | None = None   # Llama 3.1's frequency scaling (rope_frequencies)

    @nn.compact
    def __call__(self, x_BxTxD, key_mask_BxT=None, kv=None, ctx=None):
        """``x_BxTxD``: the input, or a tuple of three (the q, k and v projections' own copies of it)."""
        xs = _sublayer_inputs(x_BxTxD, 3)
        d = xs[0].shape[-1]
        N, K = self.n_head, self.n_kv_head
        h = d // N
        init = nn.initializers.normal(0.02)
        zeros = nn.initializers.zeros

        def project(name, n, heads_name, x):
            w = param(self, f"{name}_kernel", (d, n, h), ("embed", heads_name, "kv"), init, self.dtype)
            y = jnp.einsum("btd,dnh->btnh", x, w)
            if self.use_bias:
                y = y + param(self, f"{name}_bias", (n, h), (heads_name, "kv"), zeros, self.dtype)
            return y

        q = project("q", N, "heads", xs[0])
        k, v = project("k", K, "kv_heads", xs[1]), project("v", K, "kv_heads", xs[2])
        if kv is not None:
            return self._cached(xs[0], q, k, v, kv, ctx)
        if self.rope_theta is not None:
            sc = self.rope_scaling
            q, k = rope(q, self.rope_theta, scaling=sc), rope(k, self.rope_theta, scaling=sc)
        q = checkpoint_name(constrain(q, ("batch", "length", "heads", "kv")), "qkv")
        k = checkpoint_name(constrain(k, ("batch", "length", "kv_heads", "kv")), "qkv")
        v = checkpoint_name(constrain(v, ("batch", "length", "kv_heads", "kv")), "qkv")
        o = attend(q, k, v, attention_impl(self.attention), self.causal, key_mask_BxT)
        o = checkpoint_name(constrain(o, ("batch", "length", "heads", "kv")), "attn_out")
        return self._out(o, d)

    def _out(self, o_BxTxNxH, d: int):
        w_o = param(self, "out_kernel", (self.n_head, o_BxTxNxH.shape[-1], d), ("heads", "kv", "embed"),
                    nn.initializers.normal(self.out_init_std), self.dtype)
        out = jnp.einsum("btnh,nhd->btd", o_BxTxNxH, w_o)
        if self.use_bias:
            out = out + param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)
        return out

    def _cached(self, x_BxTxD, q, k, v, kv, ctx):
        """Decode path: RoPE at the tokens' own positions, attention over cache + new keys (no causal flag: the
        context's masks are causal)."""
        if not self.causal:
            raise ValueError("a KV cache is for causal attention; this Attention is bidirectional (BERT)")
        if self.rope_theta is not None:
            pos, sc = ctx.positions_BxT, self.rope_scaling
            q, k = rope(q, self.rope_theta, pos, sc), rope(k, self.rope_theta, pos, sc)
        k = constrain(k, ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))
        o = attend_cached(constrain(q, ("batch", "length", "heads", "kv")), k, v, kv[0], kv[1], ctx)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        return self._out(o, x_BxTxD.shape[-1]), (k, v)


class MultiHeadAttention(nn.Module):
    """GPT-2 attention: fused QKV projection with bias, heads split over ``tensor`` (Megatron column/row)."""

    n_head: int
    dtype: Dtype
    attention: str
    out_init_std: float
    #: return ``(out without its bias, bias [d])`` for the caller to add (the GPT-2 block adds it inside the next
    #: norm's kernel: ``LayerNorm(x, out, delta_bias=bias)``); training path only
    defer_out_bias: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, kv=None, ctx=None):
        """``kv=(k_old, v_old), ctx``: decoding with a KV cache (:mod:`models.kv_cache`), returns
        ``(out, (k_new, v_new))``; the bias folding below holds there too (softmax over cache + new keys).
        ``x_BxTxD``: the input, or a tuple of three (the q, k and v projections' own copies of it)."""
        xs = _sublayer_inputs(x_BxTxD, 3)
        d = xs[0].shape[-1]
        h = d // self.n_head
        init = nn.initializers.normal(0.02)
        w_qkv = param(self, "qkv_kernel", (d, 3, self.n_head, h), ("embed", None, "heads", "kv"), init, self.dtype)
        b_qkv = param(self, "qkv_bias", (3, self.n_head, h), (None, "heads", "kv"), nn.initializers.zeros, self.dtype)
        w_o = param(self, "out_kernel", (self.n_head, h, d), ("heads", "kv", "embed"),
                    nn.initializers.normal(self.out_init_std), self.dtype)
        b_o = param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)

        def project(i, bias=None):   # q, k, v from the fused kernel, each contiguous (no strided qkv slices)
            y = jnp.einsum("btd,dnh->btnh", xs[i], w_qkv[:, i])
            y = y if bias is None else y + bias
            return checkpoint_name(constrain(y, ("batch", "length", "heads", "kv")), "qkv")

        # Only q gets its bias added. softmax over keys is unchanged by k's bias (it adds q.b_k, the same for every
        # key of a query), so b_k has no effect and its gradient is exactly zero; and since each row of
        # attention weights sums to 1, v's bias comes out as o + b_v, folded into the output bias below
        # (b_o + b_v @ W_o). Same function, same param tree (HF GPT-2 weights load unchanged), two fewer
        # [tokens, d] bias passes and bias-gradient reductions per layer: GPT-2 124M on one H200 30.96/31.02 ->
        # 30.58/30.66 ms per step (BENCHMARKS.md, session 4).
        if kv is not None:
            b_out = b_o + jnp.einsum("nh,nhd->d", b_qkv[2], w_o)
            k, v = project(1), project(2)
            o = attend_cached(project(0, b_qkv[0]), k, v, kv[0], kv[1], ctx)
            o = constrain(o, ("batch", "length", "heads", "kv"))
            return jnp.einsum("btnh,nhd->btd", o, w_o) + b_out, (k, v)
        o = causal_attention(project(0, b_qkv[0]), project(1), project(2), attention_impl(self.attention))
        o = checkpoint_name(constrain(o, ("batch", "length", "heads", "kv")), "attn_out")
        b_out = b_o + jnp.einsum("nh,nhd->d", b_qkv[2], w_o)
        out = jnp.einsum("btnh,nhd->btd", o, w_o)
        return (out, b_out) if self.defer_out_bias else out + b_out


class MLP(nn.Module):
    """GPT-2 MLP: fc (column-parallel over ``mlp``) -> GELU(tanh) -> proj (row-parallel).

    bf16/fp16 with the tanh GELU on a GPU: :func:`jzero.kernels.gelu_gemm.mlp` (bias + GELU and GELU' in the
    cuBLASLt GEMM epilogues) where it applies; elsewhere XLA with :func:`gelu_tanh`.
    """

    d_ff: int
    dtype: Dtype
    out_init_std: float
    gelu_approximate: bool = True   # GPT-2's tanh GELU; BERT uses the exact (erf) one
    fused: bool = True   # may use jzero.kernels.gelu_gemm (GPT-2 turns it off under remat: its residuals are unnamed)
    #: return ``(out without the proj bias, proj bias [d])`` for the caller to add (inside the next norm's kernel)
    defer_bias: bool = False

    @nn.compact
    def __call__(self, x_BxTxD):
        x_BxTxD = constrain(x_BxTxD, SUBLAYER_INPUT)
        d = x_BxTxD.shape[-1]
        w1 = param(self, "fc_kernel", (d, self.d_ff), ("embed", "mlp"), nn.initializers.normal(0.02), self.dtype)
        b1 = param(self, "fc_bias", (self.d_ff,), ("mlp",), nn.initializers.zeros, self.dtype)
        w2 = param(self, "proj_kernel", (self.d_ff, d), ("mlp", "embed"),
                   nn.initializers.normal(self.out_init_std), self.dtype)
        b2 = param(self, "proj_bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)
        if self.gelu_approximate and low_precision(self.dtype) and kernels.use(
                "gelu_gemm",
                ("activation checkpointing is on (its saved pre/hidden are not remat-nameable)", self.fused),
                (f"{kernels.LAYOUT_WHY}, or d_model={d} / d_ff={self.d_ff} not multiples of 8",
                 lambda: kernel_gg.supported(SUBLAYER_INPUT, d, self.d_ff)),
                ("its cuBLASLt library is not available (see the warning above)", kernel_gg.available)):
            out = kernel_gg.mlp(x_BxTxD, w1, b1, w2, SUBLAYER_INPUT)
        else:
            pre = jnp.einsum("btd,df->btf", x_BxTxD, w1) + b1
            if self.gelu_approximate and low_precision(self.dtype):   # fp32 keeps jax's autodiff (unchanged)
                hdn = gelu_tanh(pre)
            else:
                hdn = jax.nn.gelu(pre, approximate=self.gelu_approximate)
            hdn = checkpoint_name(constrain(hdn, ("batch", "length", "mlp")), "mlp_hidden")
            out = jnp.einsum("btf,fd->btd", hdn, w2)
        return (out, b2) if self.defer_bias else out + b2


class SwiGLU(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))``, no biases; gate/up column-parallel, down row-parallel.

    bf16/fp16 on a GPU: the backward of ``silu(gate) * up`` is :func:`jzero.kernels.swiglu.swiglu`'s one kernel.
    """

    d_ff: int
    dtype: Dtype
    out_init_std: float

    @nn.compact
    def __call__(self, x_BxTxD):
        x_BxTxD = constrain(x_BxTxD, SUBLAYER_INPUT)
        d = x_BxTxD.shape[-1]
        init = nn.initializers.normal(0.02)
        w_gate = param(self, "gate_kernel", (d, self.d_ff), ("embed", "mlp"), init, self.dtype)
        w_up = param(self, "up_kernel", (d, self.d_ff), ("embed", "mlp"), init, self.dtype)
        gate = jnp.einsum("btd,df->btf", x_BxTxD, w_gate)
        up = jnp.einsum("btd,df->btf", x_BxTxD, w_up)
        hidden_names = ("batch", "length", "mlp")
        if low_precision(self.dtype) and kernels.use(
                "swiglu", ("it is traced inside a shard_map (1-bit optimizers, pipeline stages)", kernel_sw.supported)):
            hdn = kernel_sw.swiglu(gate, up, hidden_names)
        else:
            hdn = jax.nn.silu(gate) * up
        hdn = checkpoint_name(constrain(hdn, hidden_names), "mlp_hidden")
        w_down = param(self, "down_kernel", (self.d_ff, d), ("mlp", "embed"),
                       nn.initializers.normal(self.out_init_std), self.dtype)
        return jnp.einsum("btf,fd->btd", hdn, w_down)


def stack_blocks(block_cls, cfg, x):
    """Run ``cfg.n_layer`` blocks: one ``nn.scan`` (params stacked on a leading 'layers' axis) or a Python loop.

    While the engine has a pipeline active (``jzero.pipeline.activate``, mesh.pipeline > 1) the scanned stack's
    params feed the pipelined loop instead (same params, same result; ``x``'s rows are the step's micro-batches).
    """
    raw_block_cls = block_cls
    if cfg.remat:
        block_cls = nn.remat(block_cls, policy=cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:   # (a scan's carry keeps one layout, so each scanned block adds its own residual)
        scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        blocks = scanned(cfg, name="blocks")
        run = pipeline.active()
        if run is not None and not blocks.is_initializing():
            return pipeline.run_stack(raw_block_cls, cfg, blocks.variables["params"], x, run)
        x, _ = blocks(x, None)
        return x
    # unrolled: a block that can (a ``defer_residual`` field) leaves its MLP output for the next block's input norm
    # to add (Residual); the model's final norm adds the last one (final_norm)
    defer = {"defer_residual": True} if (kernel_ln.defer_residual(raw_block_cls)
                                        and _has_field(raw_block_cls, "defer_residual")) else {}
    for i in range(cfg.n_layer):
        x, _ = block_cls(cfg, name=f"block_{i}", **defer)(x, None)
    return x


def _has_field(cls, name: str) -> bool:
    return dataclasses.is_dataclass(cls) and any(f.name == name for f in dataclasses.fields(cls))


def init_as_scanned(module: nn.Module, key, *inputs) -> dict:
    """``module.init(key, *inputs)``'s variables, unboxed, drawn as its scanned twin draws them.

    Flax derives each parameter's random key from its module path, so an unrolled model (``scan_layers=False``:
    ``block_<i>``) and the scanned one (``blocks``, split per layer by ``nn.scan``) would start from different
    weights under the same ``train.seed``: flipping the flag for speed changed the run. Here an unrolled jzero model
    is initialised as its scanned twin and layer ``i`` of each stacked leaf becomes ``block_<i>``'s, so both
    layouts start from the same weights (a scanned model, or a module without the flag, inits as it is)."""
    cfg = getattr(module, "cfg", None)
    if getattr(cfg, "scan_layers", True) or not dataclasses.is_dataclass(cfg):
        return nn.unbox(module.init(key, *inputs))
    twin = module.clone(cfg=dataclasses.replace(cfg, scan_layers=True))
    variables = dict(nn.unbox(twin.init(key, *inputs)))
    params = dict(variables["params"])
    if "blocks" not in params or any(f"block_{i}" in params for i in range(cfg.n_layer)):
        return nn.unbox(module.init(key, *inputs))   # not a jzero layer stack: its own init
    stacked = params.pop("blocks")
    for i in range(cfg.n_layer):
        params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    variables["params"] = params
    return variables
