"""jzero.remat: every policy gives no-remat's loss and gradients; 'full' needs less scratch memory than 'none';
'offload_named' really moves the named activations to host memory; DeepSpeed's PyTorch-only keys are errors.

Reference for the section keys and defaults: DeepSpeed ``deepspeed/runtime/activation_checkpointing/config.py``
(partition_activations, contiguous_memory_optimization, cpu_checkpointing False, number_checkpoints None,
synchronize_checkpoint_boundary False, profile False).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name
from pydantic import ValidationError

from jzero.errors import ConfigError
from jzero.remat import ActivationCheckpointingConfig, as_config, remat_policy

D = 16


class Block(nn.Module):
    """Attention-ish mixing plus an MLP, with two named activations ('q', 'mlp')."""

    @nn.compact
    def __call__(self, x, _):
        q = checkpoint_name(nn.Dense(D, use_bias=False)(x), "q")
        k = nn.Dense(D, use_bias=False)(x)
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
        x = x + jnp.einsum("bts,bsd->btd", a, x)
        h = checkpoint_name(jnp.tanh(nn.Dense(4 * D)(x)), "mlp")
        return x + nn.Dense(D)(h), None


def scanned(cfg):
    """The block scanned twice, rematerialised per ``cfg`` as the models do (``nn.remat`` with remat_policy's)."""
    prevent_cse, policy = remat_policy(cfg)
    block = Block if policy is None else nn.remat(Block, policy=policy, prevent_cse=prevent_cse)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()


X = jax.random.normal(jax.random.key(1), (2, 8, D))


def loss_fn(model):
    return lambda p: jnp.mean(model.apply(p, X, None)[0] ** 2)


CASES = [("full", []), ("save_dots", []), ("save_dots_no_batch", []), ("save_named", ["q", "mlp"]),
         ("offload_named", ["mlp"])]


def test_every_policy_matches_no_remat_and_full_saves_memory():
    base = scanned(ActivationCheckpointingConfig())
    params = jax.jit(base.init)(jax.random.key(0), X, None)

    def compiled(*policies):  # one program computing loss and grads under each policy
        fns = [jax.value_and_grad(loss_fn(scanned(ActivationCheckpointingConfig(policy=p, save_names=n))))
               for p, n in policies]
        return jax.jit(lambda prm: [f(prm) for f in fns]).lower(params).compile()

    c_none, c_full = compiled(("none", [])), compiled(("full", []))
    [(loss0, grads0)] = c_none(params)
    results = c_full(params) + compiled(*CASES[1:])(params)
    for (policy, _), (loss, grads) in zip(CASES, results):
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=policy)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-6, atol=1e-6, err_msg=policy)
    temp_none = c_none.memory_analysis().temp_size_in_bytes
    temp_full = c_full.memory_analysis().temp_size_in_bytes
    print(f"temp bytes: none {temp_none}, full {temp_full}")  # measured on CPU: none 65848, full 33264
    assert temp_full < temp_none


def test_offload_named_moves_named_activations_to_host():
    cfg = ActivationCheckpointingConfig(cpu_checkpointing=True, save_names=["mlp"])  # DeepSpeed's key selects it
    assert cfg.effective_policy == "offload_named"
    model = scanned(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), X, None)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn(model)))(params))
    assert "<host>" in jaxpr and "device_put" in jaxpr
    plain = str(jax.make_jaxpr(jax.grad(loss_fn(scanned(ActivationCheckpointingConfig(policy="full")))))(params))
    assert "<host>" not in plain


def test_remat_policy_mapping():
    cp = jax.checkpoint_policies
    assert remat_policy(ActivationCheckpointingConfig()) == (False, None)
    assert remat_policy(ActivationCheckpointingConfig(policy="full")) == (False, cp.nothing_saveable)
    assert remat_policy(ActivationCheckpointingConfig(policy="save_dots"), in_scan=False) == (True, cp.dots_saveable)
    assert remat_policy(ActivationCheckpointingConfig(policy="save_dots_no_batch"))[1] is \
        cp.dots_with_no_batch_dims_saveable

    def f(w):
        return jnp.sum(jnp.sin(checkpoint_name(jnp.sin(w), "h")))

    prevent_cse, policy = remat_policy(ActivationCheckpointingConfig(policy="save_named", save_names=["h"]),
                                       in_scan=False)
    g = jax.checkpoint(f, policy=policy, prevent_cse=prevent_cse)
    np.testing.assert_allclose(np.asarray(jax.grad(g)(jnp.arange(3.0))), np.asarray(jax.grad(f)(jnp.arange(3.0))))


@pytest.mark.parametrize("kwargs, match", [
    ({"partition_activations": True}, "activation_checkpointing.partition_activations=True"),
    ({"contiguous_memory_optimization": True}, "memory-allocator"),
    ({"number_checkpoints": 4}, "number_checkpoints"),
    ({"synchronize_checkpoint_boundary": True}, "jax.profiler"),
    ({"profile": True}, "jax.profiler"),
    ({"policy": "save_named"}, "save_names"),
    ({"policy": "full", "save_names": ["q"]}, "save_names is only read"),
    ({"policy": "full", "cpu_checkpointing": True}, "cpu_checkpointing=true means policy 'offload_named'"),
    ({"policy": "selective"}, "policy"),
    ({"cpu_checkpoint": True}, "extra"),
])
def test_bad_section_is_an_error(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        ActivationCheckpointingConfig(**kwargs)


def test_dicts_and_other_models_of_the_section_are_accepted():
    from pydantic import BaseModel

    class Section(BaseModel):  # e.g. the same section declared in jzero.config
        policy: str = "none"
        save_names: list[str] = []
        cpu_checkpointing: bool = False

    section = Section(cpu_checkpointing=True, save_names=["mlp"])  # policy left unset: cpu_checkpointing picks
    assert as_config(section).effective_policy == "offload_named" and remat_policy(section)[1] is not None
    assert remat_policy({"policy": "full"}) == (False, jax.checkpoint_policies.nothing_saveable)
    with pytest.raises(ConfigError, match=r"activation_checkpointing.profile: .*jax.profiler"):
        remat_policy({"profile": True})


def test_save_names_jzeros_models_do_not_have_are_refused():
    """'nosuchname' would match no checkpoint_name and save nothing (full remat, silently)."""
    import jzero
    from jzero.config import load_config

    cfg = load_config(base={"train_batch_size": 8, "model": {"preset": "gpt2-tiny"}, "data": {"seq_len": 16},
                            "activation_checkpointing": {"policy": "save_named", "save_names": ["qkv", "nosuchname"]}})
    with pytest.raises(ConfigError) as e:
        jzero.initialize(cfg)
    assert str(e.value) == ("activation_checkpointing.save_names: 'nosuchname' names no activation of jzero's models; "
                            "use some of qkv, attn_out, mlp_hidden (a model you pass to initialize may name its own)")
