"""Classification metrics in the shapes the evaluate stage records: scalars, tables, matrices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import metrics as skm


@dataclass(frozen=True)
class Evaluation:
    """Everything measured on one split; `scalars` is flat, ready for a metrics file."""

    scalars: dict[str, float]
    per_class: pd.DataFrame
    confusion: np.ndarray
    top_confusions: pd.DataFrame

    @property
    def confusion_table(self) -> pd.DataFrame:
        """The confusion matrix named by class: rows actual, columns predicted."""
        names = self.per_class["class"].tolist()
        table = pd.DataFrame(self.confusion, index=names, columns=names)
        table.index.name = "actual \\ predicted"
        return table

    @property
    def confusion_normalized(self) -> np.ndarray:
        """Row-normalised: (i, j) is the share of class i predicted as j; recall on the diagonal."""
        totals = self.confusion.sum(axis=1, keepdims=True)
        zeros = np.zeros(self.confusion.shape)
        return np.divide(self.confusion, totals, out=zeros, where=totals > 0)


def evaluate_predictions(
    y_true: np.ndarray, proba: np.ndarray, class_names: list[str], top_k: int = 10
) -> Evaluation:
    """Score probabilities (n, n_classes) against integer labels 0..n_classes-1."""
    y_true = np.asarray(y_true).astype(np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = len(class_names)
    if proba.ndim != 2 or proba.shape != (len(y_true), n_classes):
        raise ValueError(
            f"probabilities have shape {proba.shape}, expected ({len(y_true)}, {n_classes})"
        )
    labels = np.arange(n_classes)
    y_pred = proba.argmax(axis=1)

    scalars: dict[str, float] = {"accuracy": float(np.mean(y_pred == y_true))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        scalars[f"precision_{average}"] = float(precision)
        scalars[f"recall_{average}"] = float(recall)
        scalars[f"f1_{average}"] = float(f1)
    # float32 models give rows that sum to 1 within 1e-7, which scikit-learn warns about:
    # clip (no log(0)), then renormalise, as scikit-learn itself did before version 1.5.
    clipped = np.clip(proba, 1e-15, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    scalars["log_loss"] = float(skm.log_loss(y_true, clipped, labels=labels))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
        },
        index=pd.Index(labels, name="label"),
    )

    confusion = skm.confusion_matrix(y_true, y_pred, labels=labels)
    return Evaluation(scalars, per_class, confusion, top_confusions(confusion, class_names, top_k))


def top_confusions(confusion: np.ndarray, class_names: list[str], k: int) -> pd.DataFrame:
    """The k most frequent (actual, predicted) mistakes, largest first."""
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = np.argsort(off_diagonal, axis=None, kind="stable")[::-1][:k]
    rows = []
    for index in flat:
        actual, predicted = np.unravel_index(index, confusion.shape)
        count = int(off_diagonal[actual, predicted])
        if count == 0:
            break
        rows.append(
            {
                "actual": class_names[actual],
                "predicted": class_names[predicted],
                "count": count,
                "share_of_actual": count / max(int(confusion[actual].sum()), 1),
            }
        )
    return pd.DataFrame(rows, columns=["actual", "predicted", "count", "share_of_actual"])
