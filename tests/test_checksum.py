"""jzero.checksum: the same value on the host (NumPy), on one device and sharded over 8 devices; every single-element
change and an element swap are caught."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jzero.checksum import MOD, checksums, host_checksum, mismatches


def reference(a) -> str:
    """The formula in plain Python integers."""
    a = np.ascontiguousarray(a)
    words = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize]).reshape(-1).tolist()
    plain = sum(words) % 2**32
    weighted = sum(w * (i % MOD + 1) for i, w in enumerate(words)) % 2**32
    return f"{plain:08x}:{weighted:08x}"


@pytest.fixture(scope="module")
def tree():
    rng = np.random.default_rng(0)
    return {"f32": rng.standard_normal((16, 24)).astype(np.float32),
            "bf16": rng.standard_normal((8, 3, 5)).astype(jnp.bfloat16),
            "step": np.int32(7), "mask": rng.integers(0, 2, (40,)).astype(bool),
            "key": rng.integers(0, 2**32, (8, 2), dtype=np.uint64).astype(np.uint32)}


def test_host_device_and_sharded_agree_with_the_formula(tree):
    want = {k: reference(v) for k, v in tree.items()}
    assert {k: host_checksum(v) for k, v in tree.items()} == want
    assert checksums(jax.tree.map(jnp.asarray, tree)) == want
    mesh = jax.make_mesh((8,), ("data",))
    spec = lambda v: P("data") if np.ndim(v) and v.shape[0] % 8 == 0 else P()  # noqa: E731
    sharded = {k: jax.device_put(v, NamedSharding(mesh, spec(v))) for k, v in tree.items()}
    assert len(sharded["f32"].sharding.device_set) == 8
    assert checksums(sharded) == want
    assert checksums({"a": {"b": tree["f32"]}}) == {"a.b": want["f32"]}   # names as describe() gives them


def test_every_single_element_change_and_a_swap_are_caught(tree):
    a = tree["bf16"].reshape(-1)
    base = host_checksum(a)
    for i in range(a.size):
        b = a.copy()
        b.view(np.uint16)[i] ^= np.uint16(1 << (i % 16))   # one flipped bit, a different bit each element
        assert host_checksum(b) != base
    swapped = a.copy()
    swapped[[3, 11]] = swapped[[11, 3]]
    assert a[3] != a[11] and host_checksum(swapped).split(":")[0] == base.split(":")[0]   # same plain sum
    assert host_checksum(swapped) != base                                               # caught by position


def test_large_leaves_wrap_modulo_2_32_the_same_on_host_and_device():
    a = np.full((5_000_001,), -1, np.int32)         # every word 0xffffffff: both sums overflow many times over
    assert host_checksum(a) == checksums({"a": jnp.asarray(a)})["a"]
    n = a.size
    plain = (0xFFFFFFFF * n) % 2**32
    weights = sum((i % MOD + 1) for i in range(MOD)) * (n // MOD) + sum(i % MOD + 1 for i in range(n // MOD * MOD, n))
    assert host_checksum(a) == f"{plain:08x}:{(0xFFFFFFFF * weights) % 2**32:08x}"


def test_mismatches_skip_leaves_an_older_checkpoint_has_no_checksum_for():
    assert mismatches({"a": "1:2", "b": "3:4"}, {"a": "1:2", "b": "3:5", "c": "9:9"}) == ["b"]
    assert mismatches({}, {"a": "1:2"}) == []
