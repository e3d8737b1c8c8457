"""Checksums of a train state's leaves, so that a checkpoint whose bytes changed on disk is refused, not trained on.

orbax writes each array as zarr chunks inside OCDBT data files; the OCDBT b-tree nodes carry CRC-32C checksums,
the chunk bytes do not. A flipped bit inside a chunk (a bad disk, a truncated copy that was padded, a bit flip in
transit) restores without any error as a slightly different number: measured on this tree, one flipped byte in a
data file changed an Adam moment by 1.4e-4 and the load succeeded. :func:`jzero.checkpoint.save` therefore stores
``leaf path -> checksum`` in the checkpoint's meta, and every restore recomputes them from what it read.

The checksum of a leaf is two sums over its elements' bits, each as an unsigned 32-bit word (bf16/fp16 widened
from 16 bits, bool/int8 from 8), all arithmetic modulo 2**32:

    plain    = sum(word_i)
    weighted = sum(word_i * (i mod 65521 + 1))        # i: the element's C-order index

written ``"plain:weighted"`` in hex. Integer sums modulo 2**32 do not depend on the order of the additions, so the
value is the same however the array is sharded (a checkpoint restored onto another mesh checks the same numbers),
and the same computed on the devices (one compiled reduction per leaf, no gather) or with NumPy on the host (the
weights alone, :func:`jzero.checkpoint.read_params`). Any change of one element changes ``plain``; the weighted sum
catches most swaps and compensating changes. It is an integrity check against accidents, not a cryptographic hash.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: the modulus of the position weights (the largest prime below 2**16, as in Adler-32)
MOD = 65521
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_HOST_CHUNK = 1 << 22   # elements a host pass handles at once (bounds its temporary arrays)


def _fmt(plain, weighted) -> str:
    return f"{int(plain) & 0xFFFFFFFF:08x}:{int(weighted) & 0xFFFFFFFF:08x}"


def _word_type(dtype) -> type:
    size = np.dtype(dtype).itemsize
    if size not in _WORD:
        raise TypeError(f"checksums cover 1-, 2- and 4-byte elements; a leaf has dtype {np.dtype(dtype).name}")
    return _WORD[size]


def _device_sums(x):
    """``(plain, weighted)`` as uint32 scalars of one device array (any sharding; no reshape, so no gather)."""
    words = jax.lax.bitcast_convert_type(x, _word_type(x.dtype)).astype(jnp.uint32) if x.dtype != jnp.bool_ \
        else x.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= x.shape[d]
    weight = index % jnp.uint32(MOD) + jnp.uint32(1)
    return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32)


_device_all = jax.jit(lambda leaves: [_device_sums(x) for x in leaves])


def host_checksum(a) -> str:
    """The checksum of one host (NumPy) array, equal to :func:`checksums`' of the same values on the devices."""
    a = np.ascontiguousarray(a)
    flat = (a.view(_word_type(a.dtype)) if a.dtype != np.bool_ else a.view(np.uint8)).reshape(-1)
    plain = weighted = 0
    for start in range(0, flat.size, _HOST_CHUNK):
        words = flat[start:start + _HOST_CHUNK].astype(np.uint64)
        index = np.arange(start, start + words.size, dtype=np.uint64) % np.uint64(1 << 32)
        plain += int(words.sum(dtype=np.uint64))
        weighted += int((words * (index % np.uint64(MOD) + np.uint64(1))).sum(dtype=np.uint64))
    return _fmt(plain, weighted)


def _on_device(x) -> bool:
    return isinstance(x, jax.Array) and getattr(x.sharding, "memory_kind", None) in (None, "device")


def checksums(tree) -> dict[str, str]:
    """``{'params.wte': '1a2b3c4d:5e6f7081', ...}`` for every leaf of ``tree`` (names as
    :func:`jzero.checkpoint_meta.describe` gives them).

    Device arrays are summed in one compiled program (one host sync for all of them); arrays in pinned host memory
    (optimizer offload's masters and moments) are brought to the devices one at a time, so the check never needs
    the whole offloaded state on a device; NumPy arrays are summed on the host.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    out: dict[str, str] = {}
    device = [i for i, x in enumerate(leaves) if _on_device(x)]
    if device:
        sums = jax.device_get(_device_all([leaves[i] for i in device]))
        out.update({names[i]: _fmt(*s) for i, s in zip(device, sums)})
    for i, x in enumerate(leaves):
        if names[i] in out:
            continue
        if isinstance(x, jax.Array):   # another memory kind: one leaf at a time through device memory
            moved = jax.device_put(x, x.sharding.with_memory_kind("device"))
            out[names[i]] = _fmt(*jax.device_get(_device_all([moved])[0]))
            del moved
        else:
            out[names[i]] = host_checksum(np.asarray(x))
    return {n: out[n] for n in names}


def mismatches(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """Names of the leaves of ``now`` whose checksum differs from ``saved``'s (leaves ``saved`` lacks are skipped:
    a checkpoint written before checksums existed has none)."""
    return [k for k, v in now.items() if k in saved and saved[k] != v]
