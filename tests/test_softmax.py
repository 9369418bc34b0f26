"""Softmax maths must stay finite and normalised for any finite logits, float32 or float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core.softmax import cross_entropy, log_softmax, softmax

FLOAT_DTYPES = [np.float32, np.float64]


def logit_batches(dtype=np.float64, bound=1e4):
    shapes = st.tuples(st.integers(1, 8), st.integers(1, 12))
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    return arrays(dtype, shapes, elements=elements)


def test_textbook_example():
    assert softmax(np.array([5.0, 2.5, 0.5])).round(1).tolist() == [0.9, 0.1, 0.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_stay_finite(dtype):
    logits = np.array([[1000, -1000, 0], [-1000, -1000, -1000], [1000, 1000, 1000]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow or invalid-value warnings fail the test
        probabilities = softmax(logits)
        log_probabilities = log_softmax(logits)
        loss = cross_entropy(logits, np.array([1, 0, 2]))
    assert probabilities.dtype == dtype and log_probabilities.dtype == dtype
    np.testing.assert_allclose(probabilities[0], [1, 0, 0])
    np.testing.assert_allclose(probabilities[1:], np.full((2, 3), 1 / 3), rtol=1e-6)
    assert np.isfinite(log_probabilities).all()
    assert log_probabilities[0, 1] == pytest.approx(-2000)
    # A confidently wrong prediction costs a large but finite amount, not -log(0) = inf.
    assert loss == pytest.approx((2000 + 2 * np.log(3)) / 3, rel=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtype_is_preserved(dtype):
    logits = np.zeros((2, 3), dtype=dtype)
    assert softmax(logits).dtype == dtype
    assert log_softmax(logits).dtype == dtype


def test_integer_logits_become_float64():
    assert softmax(np.array([[1, 2, 3]])).dtype == np.float64


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches(), shift=st.floats(-1e3, 1e3))
def test_shift_invariance(logits, shift):
    np.testing.assert_allclose(softmax(logits + shift), softmax(logits), atol=1e-12, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(logits=st.one_of(logit_batches(np.float64), logit_batches(np.float32)))
def test_probabilities_lie_in_unit_interval_and_rows_sum_to_one(logits):
    probabilities = softmax(logits)
    assert probabilities.dtype == logits.dtype
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    tolerance = 1e-5 if logits.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=tolerance)


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches())
def test_order_is_preserved(logits):
    probabilities = softmax(logits)
    for row_logits, row_probabilities in zip(logits, probabilities, strict=True):
        order = np.argsort(row_logits, kind="stable")
        # Strictly larger logits never get a smaller probability (ties may underflow to 0 alike).
        assert np.all(np.diff(row_probabilities[order]) >= 0)
        assert row_probabilities[np.argmax(row_logits)] == row_probabilities.max()


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches(bound=30))
def test_log_softmax_is_log_of_softmax(logits):
    np.testing.assert_allclose(log_softmax(logits), np.log(softmax(logits)), atol=1e-9)


def test_cross_entropy_matches_definition():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    labels = np.array([0, 2])
    expected = -np.mean(np.log(softmax(logits)[[0, 1], labels]))
    assert cross_entropy(logits, labels) == pytest.approx(expected)
    assert cross_entropy(np.zeros((4, 10)), np.arange(4)) == pytest.approx(np.log(10))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 3]), r"\[0, 2\]"),
        (np.array([0, -1]), r"\[0, 2\]"),
        (np.array([0.0, 1.0]), "integer"),
        (np.array([0]), "shape"),
    ],
)
def test_cross_entropy_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        cross_entropy(np.zeros((2, 3)), labels)


def test_rejects_three_dimensional_logits():
    with pytest.raises(ValueError, match="2-D"):
        softmax(np.zeros((2, 2, 2)))
