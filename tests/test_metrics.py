"""Metrics: accuracy, macro-F1 and seqeval's entity-level scores (default, conlleval-compatible mode, IOB2)."""
import numpy as np
import pytest

from jzero.metrics import accuracy, entity_scores, get_entities, macro_f1


def test_seqeval_readme_example():
    # seqeval's README: f1 0.50; classification_report MISC 0.00 (support 1), PER 1.00 (support 1)
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    s = entity_scores(y_true, y_pred)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    assert s["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_get_entities_follows_conlleval_chunk_rules():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # an I- after O (or after another type) starts a chunk; B-B is two chunks; a type change splits
    assert get_entities(["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-ORG"]) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3), ("ORG", 5, 5)]
    assert get_entities(["B-ORG", "B-ORG", "I-ORG"]) == [("ORG", 0, 0), ("ORG", 1, 2)]
    assert get_entities(["O", "O"]) == []
    # sentences are joined with an O between them: an entity at the end of one does not run into the next
    assert get_entities([["B-PER"], ["I-PER"]]) == [("PER", 0, 0), ("PER", 2, 2)]


def test_entity_scores_count_boundaries_and_types():
    true = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC", "O", "B-LOC"]]    # PER too short, LOC right, ORG typed as LOC
    s = entity_scores(true, pred)
    assert (s["n_true"], s["n_pred"], s["n_correct"]) == (3, 3, 1)
    assert s["f1"] == pytest.approx(1 / 3)
    assert s["per_type"]["LOC"]["precision"] == 0.5 and s["per_type"]["LOC"]["recall"] == 1.0
    assert entity_scores(true, [["O"] * 6])["f1"] == 0.0
    with pytest.raises(ValueError, match="sequence 0: 6 true tags but 2"):
        entity_scores(true, [["O", "O"]])


def test_accuracy_and_macro_f1_skip_ignored_entries():
    labels = np.array([0, 1, 2, 2, -1])
    pred = np.array([0, 1, 1, 2, 0])
    assert accuracy(pred, labels) == 0.75
    # class 0: f1 1; class 1: p 0.5 r 1 -> 2/3; class 2: p 1 r 0.5 -> 2/3
    assert macro_f1(pred, labels, 3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert accuracy(np.zeros(3), -np.ones(3)) == 0.0
