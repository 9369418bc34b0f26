"""Paired comparison of two models scored on the same test images: is the gain more than noise?

Both models saw the same 10,000 images, so their errors are paired: the exact McNemar test
looks only at the images on which they disagree (n01: the champion wrong and the challenger
right; n10: the reverse); under "equally accurate" each such image is a fair coin. For other
metrics (log loss, F1) a paired bootstrap resamples images, the same images for both models,
and gives a confidence interval of the gain. Seeded: the same inputs give the same decision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError

PROBABILITY_FLOOR = 1e-15  # as the evaluate stage clips probabilities before its log loss
BOOTSTRAP_SEED = 0
CHUNK = 250  # bootstrap samples weighed at once: 250 x 10,000 weights = 20 MB


@dataclass(frozen=True)
class ScoredPredictions:
    """What a model answered on each test image: enough to compare two models image by image."""

    labels: np.ndarray  # (n,) true classes
    predicted: np.ndarray  # (n,) predicted classes
    p_true: np.ndarray  # (n,) probability given to the true class
    digest: str  # of the test set these were scored on (`digest_of_test_set`)


def digest_of_test_set(X: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the test images and labels as arrays: the same pixels give the same digest,
    whatever file they came in."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(X), np.ascontiguousarray(y)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class McNemar:
    n01: int  # champion wrong, challenger right
    n10: int  # champion right, challenger wrong
    p_value: float


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> McNemar:
    """Exact two-sided McNemar test: a binomial test of n01 among the n01 + n10 discordant
    images with p = 0.5 (no discordant image: p-value 1)."""
    from scipy.stats import binomtest

    champion_correct = np.asarray(champion_correct, dtype=bool)
    challenger_correct = np.asarray(challenger_correct, dtype=bool)
    n01 = int(np.count_nonzero(~champion_correct & challenger_correct))
    n10 = int(np.count_nonzero(champion_correct & ~challenger_correct))
    if n01 + n10 == 0:
        return McNemar(n01, n10, 1.0)
    return McNemar(n01, n10, float(binomtest(n01, n01 + n10, 0.5).pvalue))


# The metrics the bootstrap can recompute from ScoredPredictions, by the name the evaluate stage
# logs them under (without the split prefix).
BOOTSTRAP_METRICS = ("accuracy", "log_loss", "f1_macro", "f1_weighted", "precision_macro",
                     "recall_macro")


def _columns(labels: np.ndarray, predicted: np.ndarray, p_true: np.ndarray,
             n_classes: int) -> np.ndarray:
    """Per-image columns whose (weighted) sums give every metric of BOOTSTRAP_METRICS:
    true-class and predicted-class indicators, true positives, correct, -log p(true)."""
    actual = np.eye(n_classes)[labels]
    guessed = np.eye(n_classes)[predicted]
    correct = (labels == predicted).astype(float)[:, None]
    loss = -np.log(np.clip(p_true, PROBABILITY_FLOOR, 1.0))[:, None]
    return np.hstack([actual, guessed, actual * guessed, correct, loss])


def _metric(sums: np.ndarray, n_classes: int, metric: str) -> np.ndarray:
    """The metric from column sums (rows: samples), as scikit-learn with zero_division=0."""
    k = n_classes
    support, guessed, tp = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:3 * k]
    total = support.sum(axis=1)
    if metric == "accuracy":
        return sums[:, 3 * k] / total
    if metric == "log_loss":
        return sums[:, 3 * k + 1] / total
    zeros = np.zeros_like(tp)
    precision = np.divide(tp, guessed, out=zeros.copy(), where=guessed > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    both = support + guessed
    f1 = np.divide(2 * tp, both, out=zeros.copy(), where=both > 0)
    per_class = {"precision": precision, "recall": recall, "f1": f1}[metric.split("_")[0]]
    if metric.endswith("_weighted"):
        return (per_class * support).sum(axis=1) / total
    return per_class.mean(axis=1)


@dataclass(frozen=True)
class BootstrapInterval:
    gain: float  # on the test set itself, in the direction where > 0 is better
    low: float
    high: float
    level: float  # e.g. 0.95
    samples: int


def paired_bootstrap(champion: ScoredPredictions, challenger: ScoredPredictions, metric: str,
                     greater_is_better: bool, alpha: float, samples: int,
                     n_classes: int | None = None, seed: int = BOOTSTRAP_SEED
                     ) -> BootstrapInterval:
    """Percentile interval (level 1 - alpha) of the challenger's gain over the champion, both
    scored on the same resampled images in each of `samples` resamples."""
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"no bootstrap for metric {metric!r}; expected one of "
                         f"{', '.join(BOOTSTRAP_METRICS)}")
    labels = np.asarray(champion.labels, dtype=np.int64)
    k = n_classes or int(max(labels.max(), champion.predicted.max(),
                             challenger.predicted.max())) + 1
    width = 3 * k + 2
    columns = np.hstack([
        _columns(labels, np.asarray(champion.predicted, dtype=np.int64), champion.p_true, k),
        _columns(labels, np.asarray(challenger.predicted, dtype=np.int64), challenger.p_true,
                 k)])
    sign = 1.0 if greater_is_better else -1.0

    def gains(sums: np.ndarray) -> np.ndarray:
        return sign * (_metric(sums[:, width:], k, metric) - _metric(sums[:, :width], k, metric))

    n = len(labels)
    rng = np.random.default_rng(seed)
    found = []
    for start in range(0, samples, CHUNK):
        rows = min(CHUNK, samples - start)
        picks = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        weights = np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n)
        found.append(gains(weights.astype(float) @ columns))
    resampled = np.concatenate(found)
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
    return BootstrapInterval(float(gains(columns.sum(axis=0)[None, :])[0]), float(low),
                             float(high), 1 - alpha, samples)


# The evaluate stage's record of the test predictions: reports/evaluation/<this>, logged to the
# run as evaluation/<this>, so the register stage of any later run can compare with it.
PREDICTIONS_FILE = "test_predictions.npz"


class PredictionsFileError(PipelineError, ValueError):
    """A test predictions file that does not hold what the evaluate stage wrote: reported in one
    line, and the register stage fails before any alias moves."""


def prediction_arrays(labels: np.ndarray, proba: np.ndarray, digest: str) -> dict[str, np.ndarray]:
    """The compact per-image record (about 100 KB for 10,000 images, before compression)."""
    labels = np.asarray(labels, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    return {"label": labels.astype(np.uint8), "predicted": proba.argmax(axis=1).astype(np.uint8),
            "p_true": proba[np.arange(len(labels)), labels], "digest": np.array(digest)}


def predictions_from_arrays(arrays: dict[str, np.ndarray], name: str) -> ScoredPredictions:
    """ScoredPredictions from `prediction_arrays`'s arrays; PredictionsFileError names `name`."""
    missing = sorted({"label", "predicted", "p_true", "digest"} - set(arrays))
    if missing:
        raise PredictionsFileError(f"{name} lacks {', '.join(missing)}")
    labels, predicted, p_true = arrays["label"], arrays["predicted"], arrays["p_true"]
    if not (labels.ndim == predicted.ndim == p_true.ndim == 1
            and len(labels) == len(predicted) == len(p_true) > 0):
        raise PredictionsFileError(f"{name}: label, predicted and p_true must be 1-D arrays of "
                                   "one length")
    return ScoredPredictions(labels.astype(np.int64), predicted.astype(np.int64),
                           p_true.astype(np.float64), str(arrays["digest"]))
