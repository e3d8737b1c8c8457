"""Evaluation metrics on host arrays: accuracy, macro-F1, and entity-level precision/recall/F1 as seqeval defines it.

Entity scoring follows seqeval's default (conlleval-compatible) mode for IOB2 tags (``B-PER``, ``I-PER``, ``O``):
a chunk starts at a ``B-`` tag, at an ``I-`` tag that follows ``O`` or a tag of another type, and ends before the
next tag that cannot continue it. So ``I-PER I-PER`` with no ``B-`` still counts as one PER entity, and
``B-PER I-LOC`` is two entities. Sentences are joined with an ``O`` between them (as seqeval does), an entity is
``(type, start, end)``, and precision/recall/F1 are micro-averaged over all entities (an entity is correct only
when its type and both boundaries match).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

IGNORE = -1


def accuracy(pred, labels, ignore: int = IGNORE) -> float:
    """Fraction of entries where ``pred == labels``, over entries whose label is not ``ignore``."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    valid = labels != ignore
    n = int(valid.sum())
    return float(((pred == labels) & valid).sum() / n) if n else 0.0


def _prf(n_correct: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = n_correct / n_pred if n_pred else 0.0
    r = n_correct / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def macro_f1(pred, labels, n_classes: int, ignore: int = IGNORE) -> float:
    """Unweighted mean over classes of the per-class F1 (classes with no true and no predicted rows skipped)."""
    pred, labels = np.asarray(pred).ravel(), np.asarray(labels).ravel()
    keep = labels != ignore
    pred, labels = pred[keep], labels[keep]
    scores = []
    for c in range(n_classes):
        tp, n_pred, n_true = int(((pred == c) & (labels == c)).sum()), int((pred == c).sum()), int((labels == c).sum())
        if n_pred or n_true:
            scores.append(_prf(tp, n_pred, n_true)["f1"])
    return float(np.mean(scores)) if scores else 0.0


def _split(tag: str) -> tuple[str, str]:
    """``'B-PER'`` -> ``('B', 'PER')``; ``'O'`` -> ``('O', '')``."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def _ends(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Does the chunk that includes the previous token end before this one?"""
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != kind


def _starts(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Does a chunk start at this token?"""
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev_tag in ("E", "S", "O"):
        return True
    return tag != "O" and prev_type != kind


def get_entities(tags: Sequence[str] | Sequence[Sequence[str]]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive token indices) of one tag sequence or a list of them (then
    indices run over the sequences joined with an ``O`` between them)."""
    if tags and not isinstance(tags[0], str):
        tags = [t for seq in tags for t in list(seq) + ["O"]]
    out = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        cur_tag, kind = _split(tag)
        if _ends(prev_tag, cur_tag, prev_type, kind):
            out.append((prev_type, begin, i - 1))
        if _starts(prev_tag, cur_tag, prev_type, kind):
            begin = i
        prev_tag, prev_type = cur_tag, kind
    return out


def entity_scores(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 over entities, plus the same per entity type (with its ``support``)."""
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"{len(true_seqs)} true sequences but {len(pred_seqs)} predicted ones")
    for i, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
        if len(t) != len(p):
            raise ValueError(f"sequence {i}: {len(t)} true tags but {len(p)} predicted ones")
    true = set(get_entities(list(true_seqs)))
    pred = set(get_entities(list(pred_seqs)))
    correct = true & pred
    out = {**_prf(len(correct), len(pred), len(true)), "n_true": len(true), "n_pred": len(pred),
           "n_correct": len(correct), "per_type": {}}
    n_true, n_pred, n_ok = (Counter(e[0] for e in s) for s in (true, pred, correct))
    for kind in sorted(set(n_true) | set(n_pred)):
        out["per_type"][kind] = {**_prf(n_ok[kind], n_pred[kind], n_true[kind]), "support": n_true[kind]}
    return out
