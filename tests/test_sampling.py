"""Sampling (jzero.sampling): temperature, top-k and top-p keep exactly the tokens a numpy reference keeps,
HF's order (top-k before top-p); greedy is argmax; sampled frequencies follow the filtered softmax; bad knobs
are one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jzero.errors import ConfigError
from jzero.sampling import SamplingConfig, filter_logits, sample, seed_key

LOGITS = np.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)


def ref_keep(row, temperature, top_k, top_p):
    """numpy reference: indices kept after temperature, top-k, then top-p (smallest set with mass >= top_p)."""
    x = row / temperature
    order = np.argsort(-x, kind="stable")
    kept = order[:top_k] if top_k else order
    p = np.exp(x[kept] - x[kept].max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), top_p - 1e-7) + 1) if top_p < 1 else len(kept)
    return set(kept[:n].tolist())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.7), (0.5, 0, 0.9), (1.0, 3, 1.0), (2.0, 4, 0.6)])
def test_filter_keeps_what_the_reference_keeps(temperature, top_k, top_p):
    out = np.asarray(filter_logits(jnp.asarray(LOGITS[:1]), temperature, top_k, top_p if top_p < 1 else None))
    kept = set(np.flatnonzero(np.isfinite(out[0])).tolist())
    assert kept == ref_keep(LOGITS[0], temperature, top_k, top_p)
    np.testing.assert_allclose(out[0][list(kept)], LOGITS[0][list(kept)] / temperature, rtol=1e-6)


def test_greedy_and_sampled_frequencies():
    cfg = SamplingConfig()
    assert cfg.mode == (True, 0, False)
    assert np.asarray(sample(jnp.asarray(LOGITS), jax.random.key(0), cfg.mode)).tolist() == [5, 0]
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(jnp.asarray(LOGITS[:1]), k, cfg.mode, 1.0, 1.0))(keys))[:, 0]
    assert set(draws.tolist()) == {0, 5}
    want = np.exp(2.0) / (np.exp(2.0) + np.exp(3.0))      # P(token 0) among the top 2
    assert abs((draws == 0).mean() - want) < 0.03


def test_bad_knobs_are_errors():
    for kw, msg in [(dict(temperature=-1), "temperature=-1"), (dict(temperature=1, top_p=0), "top_p=0"),
                    (dict(temperature=1, top_k=-2), "top_k=-2"), (dict(top_p=0.5), "need sampling")]:
        with pytest.raises(ConfigError, match=msg):
            SamplingConfig(**kw)


def test_every_64_bit_seed_has_its_own_key():
    """PRNGKey keeps a seed's low 32 bits (no x64): seeds 0 and 2**32 sampled the same tokens, as did -1 and
    2**32 - 1, while the CLI accepts any 64-bit --seed. A seed below 2**32 keeps PRNGKey(seed)'s key."""
    data = lambda s: tuple(np.asarray(jax.random.key_data(seed_key(s))).tolist())  # noqa: E731
    assert data(7) == tuple(np.asarray(jax.random.key_data(jax.random.PRNGKey(7))).tolist())
    seeds = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 5_000_000_000, 5_000_000_000 % 2 ** 32, -1, -2 ** 63,
             2 ** 63 - 1, 2 ** 64 - 1]
    assert len({data(s) for s in seeds}) == len(seeds) - 1    # -1 and 2**64 - 1 are the same 64 bits
    with pytest.raises(ConfigError, match=r"seed=18446744073709551616: give an integer that fits in 64 bits"):
        seed_key(2 ** 64)
