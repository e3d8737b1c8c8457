"""The batch a train or eval step takes, checked before it reaches the devices: the tree, each leaf's shape and
dtype against the engine's batch spec, and token ids within the vocabulary. One :class:`DataError` line names what
is wrong and what was expected (a float cast would truncate ids, and an id past the vocabulary would train on
another token or turn the loss to NaN, silently)."""

from __future__ import annotations

import jax
import numpy as np

from jzero.errors import DataError


def check_local_batch(local_batch, spec, process_count: int, vocab_size: int | None):
    """This process's train batch as numpy arrays of ``spec``'s dtypes, or a one-line DataError naming what is
    wrong: the tree (an LM batch is one array, a task batch a dict), a leaf's shape (``[accum, rows per process,
    ...]``), a float array where token ids are expected (a cast would truncate them silently), or a token id
    outside ``0..vocab_size-1`` (the embedding lookup would clamp it and train on another token)."""
    tree, leaves = _named_leaves(local_batch, spec, "train", " (an LM batch is one [accum, rows, seq_len+1] int "
                                 "array; a task batch a dict of them)")
    out = []
    for name, x, s in leaves:
        x = np.asarray(x)
        local = (s.shape[0], s.shape[1] // process_count) + tuple(s.shape[2:])
        if x.shape != local:
            raise DataError(f"train batch {name}: shape {x.shape}, expected {local} = [gradient_accumulation_steps, "
                            f"rows per process (train_batch_size / accumulation / processes), "
                            f"{'seq_len + 1' if len(local) == 3 and name == 'tokens' else '...'}]")
        out.append(_checked_ids(x, s.dtype, name, vocab_size, "train"))
    return jax.tree.unflatten(tree, out)


def check_global_batch(batch, spec) -> None:
    """A train batch already on the devices: its tree, shapes and dtypes against ``spec`` (metadata only, no
    sync; its token ids are not read, so they are the caller's to keep in the vocabulary)."""
    for name, x, s in _named_leaves(batch, spec, "train")[1]:
        if x.shape != s.shape or x.dtype != s.dtype:
            raise DataError(f"train batch {name}: {x.dtype}{list(x.shape)}, expected {s.dtype}{list(s.shape)} "
                            "([gradient_accumulation_steps, global rows, ...])")


def check_global_eval_batch(batch, spec, sharding_for) -> None:
    """An eval batch already on the devices: the train batch's leaves (``spec``) without the accumulation axis, same
    dtypes, rows the data axes divide (metadata only, no sync: token ids are the caller's to keep in the
    vocabulary, as for :func:`check_global_batch`)."""
    for name, x, s in _named_leaves(batch, spec, "eval", " (the train batch's structure)")[1]:
        tail = tuple(s.shape[2:])
        if x.ndim != 1 + len(tail) or tuple(x.shape[1:]) != tail or x.dtype != s.dtype:
            raise DataError(f"eval batch {name}: {x.dtype}{list(x.shape)}, expected {s.dtype}"
                            f"[rows, {', '.join(map(str, tail))}] (the train batch's leaves without the "
                            "accumulation axis)")
        n = _shards(sharding_for(x.ndim), 0)
        if x.shape[0] % n:
            raise DataError(f"eval batch {name}: {x.shape[0]} rows do not split over the {n} devices of the data "
                            f"axes; give a multiple of {n} rows")


def check_local_eval_batch(local_batch, spec, process_count: int, vocab_size: int | None, sharding_for):
    """This process's eval batch as numpy arrays: the train batch's leaves (``spec``) without the accumulation
    axis, integer ids in the vocabulary, and as many global rows as the devices splitting them
    (``sharding_for(ndim)``, the rows' sharding) divide; else one DataError line."""
    tree, leaves = _named_leaves(local_batch, spec, "eval", " (the train batch's structure)")
    out = []
    for name, x, s in leaves:
        x = _checked_ids(np.asarray(x), s.dtype, name, vocab_size, "eval")
        tail = tuple(s.shape[2:])
        if x.ndim != 1 + len(tail) or x.shape[1:] != tail:
            raise DataError(f"eval batch {name}: shape {x.shape}, expected (rows, {', '.join(map(str, tail))}) "
                            "(the train batch's leaves without the accumulation axis)")
        n, rows = _shards(sharding_for(x.ndim), 0), x.shape[0] * process_count
        if rows % n:
            raise DataError(f"eval batch {name}: {rows} rows do not split over the {n} devices of the data axes; "
                            f"give a multiple of {n} rows")
        out.append(x)
    return jax.tree.unflatten(tree, out)


def _named_leaves(batch, spec, what: str, hint: str = ""):
    """``(tree, [(name, leaf, spec leaf), ...])`` of ``batch``, after checking it has ``spec``'s tree (a DataError
    naming both otherwise); a leaf's name is its key path, "tokens" for a one-array batch."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(batch)
    if tree != jax.tree.structure(spec):
        raise DataError(f"{what} batch: {_describe_tree(batch)}, expected {_describe_tree(spec)}{hint}")
    return tree, [(jax.tree_util.keystr(path) or "tokens", x, s) for (path, x), s in zip(leaves, jax.tree.leaves(spec))]


def _checked_ids(x: np.ndarray, dtype, name: str, vocab_size: int | None, what: str) -> np.ndarray:
    """``x`` as ``dtype``; integer leaves must be integers, and token ids within the vocabulary."""
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{what} batch {name}: dtype {x.dtype}, expected integer token ids ({np.dtype(dtype)})")
    lo, hi = (int(x.min()), int(x.max())) if vocab_size and name in ("tokens", "['tokens']") and x.size else (0, 0)
    if lo < 0 or (vocab_size and hi >= vocab_size):
        bad = hi if hi >= vocab_size else lo
        raise DataError(f"{what} batch {name}: token id {bad} is outside the model's vocabulary 0..{vocab_size - 1}; "
                        "check the tokenizer against model.vocab_size (or the data's meta.json)")
    return x.astype(dtype, copy=False)


def _describe_tree(tree) -> str:
    """A short name for a batch tree's structure: 'one array', or 'a dict of tokens, mask' (not a PyTreeDef dump)."""
    if isinstance(tree, dict):
        return f"a dict of {', '.join(map(str, tree))}"
    leaves = jax.tree.leaves(tree)
    if len(leaves) == 1 and jax.tree.structure(tree).num_nodes == 1:
        return "one array"
    return f"a {type(tree).__name__} of {len(leaves)} leaves"


def _shards(sharding, dim: int) -> int:
    """How many pieces ``sharding`` cuts dimension ``dim`` into (the product of its mesh axes' sizes there)."""
    entry = sharding.spec[dim] if dim < len(sharding.spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([sharding.mesh.shape[a] for a in names])) if names else 1
