"""Evaluation numbers agree with counting by hand, to the last digit that floats can carry.

Every expected value below is worked out in the comments from the confusion matrix, not taken
from scikit-learn, so a change of library or of averaging convention shows up here.
"""

import math

import numpy as np
import pytest

from pipeline.core.metrics import evaluate_predictions, top_confusions

NAMES = ["a", "b", "c"]
TIGHT = 1e-12  # relative tolerance: exact fractions, up to rounding


def exact(value: float | list[float]) -> object:
    return pytest.approx(value, rel=TIGHT, abs=TIGHT)


def one_hot(labels, n=3, confidence=0.8):
    proba = np.full((len(labels), n), (1 - confidence) / (n - 1))
    proba[np.arange(len(labels)), labels] = confidence
    return proba


def test_scores_and_confusions() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 0])
    evaluation = evaluate_predictions(y_true, one_hot(y_pred), NAMES)

    # Rows are the actual class, columns the predicted one.
    assert evaluation.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [2, 0, 3]]
    assert evaluation.confusion_normalized.tolist() == [
        exact([2 / 3, 1 / 3, 0]), exact([0, 1, 0]), exact([2 / 5, 0, 3 / 5])]

    # Precision: diagonal / column sums (4, 3, 3); recall: diagonal / row sums (3, 2, 5);
    # F1 = 2PR / (P + R): 2(1/2)(2/3)/(7/6) = 4/7, 2(2/3)(1)/(5/3) = 4/5, 2(1)(3/5)/(8/5) = 3/4.
    table = evaluation.per_class
    assert table["class"].tolist() == NAMES
    assert table["precision"].tolist() == exact([1 / 2, 2 / 3, 1])
    assert table["recall"].tolist() == exact([2 / 3, 1, 3 / 5])
    assert table["f1"].tolist() == exact([4 / 7, 4 / 5, 3 / 4])
    assert table["support"].tolist() == [3, 2, 5]

    scalars = evaluation.scalars
    assert set(scalars) == {
        "accuracy", "log_loss", *(f"{score}_{average}" for score in ("precision", "recall", "f1")
                                  for average in ("macro", "weighted"))}
    assert scalars["accuracy"] == exact(7 / 10)  # (2 + 2 + 3) / 10
    # Macro: the plain mean over the three classes.
    assert scalars["precision_macro"] == exact(13 / 18)  # (1/2 + 2/3 + 1) / 3
    assert scalars["recall_macro"] == exact(34 / 45)  # (2/3 + 1 + 3/5) / 3
    assert scalars["f1_macro"] == exact(99 / 140)  # (80 + 112 + 105) / 140 / 3
    # Weighted by support (3, 2, 5) / 10; weighted recall is always the accuracy.
    assert scalars["precision_weighted"] == exact(47 / 60)  # (3/2 + 4/3 + 5) / 10
    assert scalars["recall_weighted"] == exact(7 / 10)  # (2 + 2 + 3) / 10
    assert scalars["f1_weighted"] == exact(989 / 1400)  # (12/7 + 8/5 + 15/4) / 10
    # Log loss: the mean of -ln p(true class); 7 right at 0.8, 3 wrong with 0.1 on the truth.
    assert scalars["log_loss"] == exact(-(7 * math.log(0.8) + 3 * math.log(0.1)) / 10)
    assert scalars["log_loss"] == pytest.approx(0.8469760138, abs=1e-10)

    # Only mistakes that happened, most frequent first: c->a twice (2 of 5 c), a->b once (1 of 3).
    top = evaluation.top_confusions
    assert top.columns.tolist() == ["actual", "predicted", "count", "share_of_actual"]
    assert top[["actual", "predicted", "count"]].values.tolist() == [["c", "a", 2], ["a", "b", 1]]
    assert top["share_of_actual"].tolist() == exact([2 / 5, 1 / 3])


def test_a_class_absent_from_the_split_counts_as_zero_in_the_macro_averages() -> None:
    """Class c is neither in y_true nor predicted: precision, recall and F1 0, support 0."""
    y_true = np.array([0, 0, 1, 1])
    proba = np.array([
        [0.7, 0.2, 0.1],  # a, predicted a
        [0.3, 0.6, 0.1],  # a, predicted b
        [0.2, 0.5, 0.3],  # b, predicted b
        [0.1, 0.9, 0.0],  # b, predicted b
    ])
    evaluation = evaluate_predictions(y_true, proba, NAMES)

    assert evaluation.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert evaluation.confusion_normalized.tolist() == [
        exact([1 / 2, 1 / 2, 0]), exact([0, 1, 0]), [0, 0, 0]]  # an empty row stays 0, not NaN
    table = evaluation.per_class
    assert table["precision"].tolist() == exact([1, 2 / 3, 0])
    assert table["recall"].tolist() == exact([1 / 2, 1, 0])
    assert table["f1"].tolist() == exact([2 / 3, 4 / 5, 0])  # 2(1)(1/2)/(3/2), 2(2/3)(1)/(5/3)
    assert table["support"].tolist() == [2, 2, 0]

    scalars = evaluation.scalars
    assert scalars["accuracy"] == exact(3 / 4)
    assert scalars["precision_macro"] == exact(5 / 9)  # (1 + 2/3 + 0) / 3
    assert scalars["recall_macro"] == exact(1 / 2)  # (1/2 + 1 + 0) / 3
    assert scalars["f1_macro"] == exact(22 / 45)  # (2/3 + 4/5 + 0) / 3
    assert scalars["precision_weighted"] == exact(5 / 6)  # (2(1) + 2(2/3)) / 4
    assert scalars["recall_weighted"] == exact(3 / 4)
    assert scalars["f1_weighted"] == exact(11 / 15)  # (2(2/3) + 2(4/5)) / 4
    # -(ln 0.7 + ln 0.3 + ln 0.5 + ln 0.9) / 4; the 0 on c is never the truth, so it costs nothing.
    assert scalars["log_loss"] == exact(
        -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.9)) / 4)
    assert scalars["log_loss"] == pytest.approx(0.5897888611, abs=1e-10)
    assert evaluation.top_confusions[["actual", "predicted", "count"]].values.tolist() == [
        ["a", "b", 1]]


def test_a_certain_mistake_costs_a_finite_log_loss() -> None:
    """Probability 0 on the truth is clipped to 1e-15: a loss of 15 ln 10, not infinity."""
    evaluation = evaluate_predictions(np.array([0]), np.array([[0.0, 1.0, 0.0]]), NAMES)
    assert evaluation.scalars["log_loss"] == pytest.approx(15 * math.log(10), rel=1e-9)
    assert evaluation.scalars["log_loss"] == pytest.approx(34.5387763949, abs=1e-9)
    assert evaluation.scalars["accuracy"] == 0


def test_perfect_predictions() -> None:
    y_true = np.array([0, 1, 2, 2])
    evaluation = evaluate_predictions(y_true, one_hot(y_true, confidence=1.0), NAMES)
    for key, value in evaluation.scalars.items():
        assert value == (pytest.approx(0, abs=1e-12) if key == "log_loss" else exact(1)), key
    assert evaluation.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert evaluation.top_confusions.empty


def test_top_confusions_are_largest_first_and_cut_at_k() -> None:
    confusion = np.array([[5, 3, 0], [1, 4, 2], [0, 0, 6]])  # rows sum to 8, 7, 6
    top = top_confusions(confusion, NAMES, k=2)
    assert top[["actual", "predicted", "count"]].values.tolist() == [
        ["a", "b", 3], ["b", "c", 2]]
    assert top["share_of_actual"].tolist() == exact([3 / 8, 2 / 7])
    every = top_confusions(confusion, NAMES, k=10)
    assert every[["actual", "predicted", "count"]].values.tolist() == [
        ["a", "b", 3], ["b", "c", 2], ["b", "a", 1]]
    assert every["share_of_actual"].tolist() == exact([3 / 8, 2 / 7, 1 / 7])
    assert confusion.tolist() == [[5, 3, 0], [1, 4, 2], [0, 0, 6]]  # the input is not changed


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected"):
        evaluate_predictions(np.array([0, 1]), np.ones((2, 2)) / 2, NAMES)


def test_float32_probabilities_are_scored_without_warnings() -> None:
    """A float32 model's rows sum to 1 within 1e-7; scikit-learn's log loss warned about that."""
    import warnings

    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(10), 200).astype(np.float32)
    y = rng.integers(0, 10, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scored = evaluate_predictions(y, proba, [str(i) for i in range(10)])
    exact = -np.mean(np.log(proba.astype(np.float64)[np.arange(200), y]))
    assert scored.scalars["log_loss"] == pytest.approx(exact, rel=1e-6)
