"""Evaluation numbers agree with scikit-learn and with counting by hand."""

import numpy as np
import pytest

from pipeline.core.metrics import evaluate_predictions

NAMES = ["a", "b", "c"]


def one_hot(labels, n=3, confidence=0.8):
    proba = np.full((len(labels), n), (1 - confidence) / (n - 1))
    proba[np.arange(len(labels)), labels] = confidence
    return proba


def test_scores_and_confusions() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 0])
    evaluation = evaluate_predictions(y_true, one_hot(y_pred), NAMES)
    assert evaluation.scalars["accuracy"] == pytest.approx(0.7)
    assert evaluation.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [2, 0, 3]]
    assert evaluation.confusion_normalized[2].tolist() == pytest.approx([0.4, 0, 0.6])
    assert evaluation.per_class.loc[2, "recall"] == pytest.approx(0.6)
    assert evaluation.per_class["support"].tolist() == [3, 2, 5]
    top = evaluation.top_confusions
    assert top.iloc[0][["actual", "predicted", "count"]].tolist() == ["c", "a", 2]
    assert len(top) == 2  # only mistakes that happened
    assert evaluation.scalars["log_loss"] > 0


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected"):
        evaluate_predictions(np.array([0, 1]), np.ones((2, 2)) / 2, NAMES)
