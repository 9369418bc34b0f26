"""The promotion rule: strictly better by more than min_improvement, ties keep the champion."""

import math

from pipeline.core.promotion import decide


def test_first_model_is_promoted() -> None:
    assert decide(0.8, None, "test_accuracy").promote


def test_better_is_promoted_and_tie_or_worse_is_not() -> None:
    assert decide(0.86, 0.85, "test_accuracy").promote
    tie = decide(0.85, 0.85, "test_accuracy")
    assert not tie.promote and "ties" in tie.reason
    worse = decide(0.84, 0.85, "test_accuracy")
    assert not worse.promote and "worse" in worse.reason


def test_lower_is_better_metrics() -> None:
    assert decide(0.40, 0.45, "test_log_loss", greater_is_better=False).promote
    assert not decide(0.50, 0.45, "test_log_loss", greater_is_better=False).promote


def test_min_improvement() -> None:
    small = decide(0.851, 0.850, "test_accuracy", min_improvement=0.005)
    assert not small.promote and "min_improvement" in small.reason
    assert decide(0.856, 0.850, "test_accuracy", min_improvement=0.005).promote


def test_non_finite_candidate_is_never_promoted() -> None:
    assert not decide(math.nan, None, "test_accuracy").promote
    assert not decide(math.inf, 0.5, "test_accuracy").promote
