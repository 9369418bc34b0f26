"""The promotion rule: without a test, strictly better by more than min_improvement, ties keep
the champion; with one (the gate), a gain that is also significant on the same test images."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.paired_tests import (
    BOOTSTRAP_METRICS,
    ScoredPredictions,
    digest_of_test_set,
    mcnemar,
    paired_bootstrap,
)
from pipeline.core.promotion import decide, decide_paired


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


# --- The gate: paired tests on the same test images -------------------------------------------



def contingency(n11: int, n01: int, n10: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """(champion correct, challenger correct) per image for a hand-made 2x2 table."""
    champion = np.repeat([True, False, True, False], [n11, n01, n10, n00])
    challenger = np.repeat([True, True, False, False], [n11, n01, n10, n00])
    return champion, challenger


def test_mcnemar_p_value_is_scipys_exact_binomial_test() -> None:
    champion, challenger = contingency(8000, 15, 5, 1980)
    found = mcnemar(champion, challenger)
    assert (found.n01, found.n10) == (15, 5)
    assert found.p_value == binomtest(15, 20, 0.5, alternative="two-sided").pvalue
    assert found.p_value == pytest.approx(0.04138946533203125)  # 2 * P(X <= 5), X ~ B(20, 1/2)
    assert mcnemar(*contingency(10, 0, 0, 5)).p_value == 1.0  # no discordant image


def test_a_handful_of_images_is_noise_and_a_clear_gain_is_not() -> None:
    noise = mcnemar(*contingency(8626, 6, 5, 1363))  # 0.8632 vs 0.8631, as in issue 17
    kept = decide_paired(0.8632, 0.8631, "test_accuracy", noise)
    assert not kept.promote and "not significant" in kept.reason and "n01=6 n10=5" in kept.reason
    assert kept.statistics == {"test": "mcnemar", "n01": 6, "n10": 5,
                               "p_value": noise.p_value, "alpha": 0.05}
    clear = mcnemar(*contingency(8000, 300, 100, 1600))
    assert decide_paired(0.83, 0.81, "test_accuracy", clear).promote
    # Significant, but below the smallest gain worth a new champion.
    small = decide_paired(0.83, 0.81, "test_accuracy", clear, min_improvement=0.03)
    assert not small.promote and "min_improvement" in small.reason
    # More images lost than won is never a promotion, whatever the p-value.
    assert not decide_paired(0.81, 0.83, "test_accuracy",
                             mcnemar(*contingency(8000, 100, 300, 1600))).promote


def predictions(correct: np.ndarray, p_true: np.ndarray, seed: int = 0) -> ScoredPredictions:
    labels = np.random.default_rng(seed).integers(0, 10, len(correct))
    predicted = np.where(correct, labels, (labels + 1 + seed % 9) % 10)
    return ScoredPredictions(labels, predicted, p_true, "d")


def test_bootstrap_recomputes_each_metric_as_scikit_learn() -> None:
    """The gain on the full test set (no resampling) is exactly the difference of the metrics
    the evaluate stage logs."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 2000)
    a_pred = np.where(rng.random(2000) < 0.8, labels, rng.integers(0, 10, 2000))
    b_pred = np.where(rng.random(2000) < 0.85, labels, rng.integers(0, 10, 2000))
    a_p, b_p = rng.uniform(0.05, 1, 2000), rng.uniform(0.05, 1, 2000)
    a, b = ScoredPredictions(labels, a_pred, a_p, "d"), ScoredPredictions(labels, b_pred, b_p, "d")

    def score(metric: str, predicted: np.ndarray, p_true: np.ndarray) -> float:
        if metric == "accuracy":
            return skm.accuracy_score(labels, predicted)
        if metric == "log_loss":
            return float(np.mean(-np.log(p_true)))
        kind, average = metric.split("_")
        function = {"f1": skm.f1_score, "precision": skm.precision_score,
                    "recall": skm.recall_score}[kind]
        return function(labels, predicted, average=average, zero_division=0)

    for metric in BOOTSTRAP_METRICS:
        greater = metric != "log_loss"
        interval = paired_bootstrap(a, b, metric, greater, 0.05, 200, n_classes=10)
        expected = score(metric, b_pred, b_p) - score(metric, a_pred, a_p)
        assert interval.gain == pytest.approx(expected if greater else -expected, abs=1e-12)
        assert interval.low <= interval.gain <= interval.high


def test_bootstrap_is_deterministic_and_tells_noise_from_a_gain() -> None:
    base = np.arange(10_000) < 8631
    moved = base.copy()
    moved[:5], moved[8631:8637] = False, True  # 6 images won, 5 lost
    p = np.full(10_000, 0.7)
    champion, challenger = predictions(base, p), predictions(moved, p)
    first = paired_bootstrap(champion, challenger, "accuracy", True, 0.05, 1000)
    assert first == paired_bootstrap(champion, challenger, "accuracy", True, 0.05, 1000)
    assert first.low < 0 < first.high
    assert not decide_paired(0.8632, 0.8631, "test_accuracy", first).promote
    better = predictions(np.arange(10_000) < 8800, p)
    clear = paired_bootstrap(champion, better, "accuracy", True, 0.05, 1000)
    assert clear.low > 0
    assert decide_paired(0.88, 0.8631, "test_accuracy", clear).promote
    # Log loss: lower is better, the gain is the champion's loss minus the challenger's.
    sharper = predictions(base, np.full(10_000, 0.8))
    loss = paired_bootstrap(champion, sharper, "log_loss", False, 0.05, 1000)
    assert loss.gain == pytest.approx(np.log(0.8) - np.log(0.7)) and loss.low > 0


def test_the_test_set_digest_follows_the_pixels_and_labels() -> None:
    X, y = np.zeros((3, 784), np.uint8), np.array([0, 1, 2])
    digest = digest_of_test_set(X, y)
    assert digest == digest_of_test_set(X.copy(), y.copy()) and len(digest) == 64
    X2 = X.copy()
    X2[1, 5] = 1
    assert digest_of_test_set(X2, y) != digest
    assert digest_of_test_set(X, np.array([0, 1, 3])) != digest


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("test", "ttest", "mlflow.promotion.test='ttest' is invalid: expected one of mcnemar, "
                      "bootstrap, none"),
    ("alpha", 1.5, "mlflow.promotion.alpha=1.5 is invalid"),
    ("bootstrap_samples", 10, "mlflow.promotion.bootstrap_samples=10 is invalid"),
])
def test_a_bad_gate_setting_is_one_line_naming_the_key(key: str, value: object,
                                                       expected: str) -> None:
    from pipeline.support import config

    with pytest.raises(config.ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        config.PromotionConfig(**{key: value})


def test_mcnemar_compares_accuracies_only() -> None:
    from pipeline.support import config

    with pytest.raises(config.ConfigError, match="McNemar compares accuracies"):
        config.PromotionConfig(metric="test_log_loss", test="mcnemar")
    assert config.PromotionConfig(metric="test_log_loss", test="bootstrap").test == "bootstrap"
