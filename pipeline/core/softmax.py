"""Numerically stable softmax, log-softmax and cross-entropy for batches of logits.

Every function subtracts the row maximum before exponentiating, so logits such as 1000 or -1000
neither overflow nor produce NaN, and the dtype of the input (float32 or float64) is preserved so
the estimator can stay in float32 end to end.
"""

from __future__ import annotations

import numpy as np


def _as_float_batch(logits: np.ndarray) -> np.ndarray:
    """Keep float32/float64 as given (no silent upcast); anything else becomes float64."""
    logits = np.asarray(logits)
    if logits.dtype not in (np.float32, np.float64):
        logits = logits.astype(np.float64)
    if logits.ndim not in (1, 2):
        raise ValueError(f"logits must be 1-D or 2-D (samples x classes), got shape {logits.shape}")
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities; exact even where softmax itself underflows to 0."""
    logits = _as_float_batch(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities that sum to 1; a 1-D input is treated as a single row."""
    logits = _as_float_batch(logits)
    probabilities = logits - logits.max(axis=-1, keepdims=True)
    np.exp(probabilities, out=probabilities)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return probabilities


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of integer `labels` (0..n_classes-1) under `logits`.

    Computed from log-softmax rather than log(softmax) so a confidently wrong row costs a large
    finite amount instead of log(0) = -inf.
    """
    logits = _as_float_batch(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (samples x classes), got shape {logits.shape}")
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match the logits, got {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")
    if labels.size == 0:
        raise ValueError("cross_entropy needs at least one sample")
    log_probabilities = log_softmax(logits)
    picked = log_probabilities[np.arange(labels.size), labels]
    return float(-picked.mean(dtype=np.float64))
