"""Figures people look at before reading numbers: confusion matrices, curves, mistakes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless, under DVC, cron and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.core.files import atomic_write_bytes  # noqa: E402


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], title: str, normalized: bool
) -> Figure:
    """A heatmap with the value in every cell; actual classes on rows, predictions on columns."""
    fig, ax = plt.subplots(figsize=(9, 8))
    fig.subplots_adjust(left=0.16, right=0.98, bottom=0.17, top=0.95)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    label = "share of actual class" if normalized else "images"
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    threshold = (1.0 if normalized else max(float(matrix.max()), 1.0)) / 2
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            ax.text(
                j, i, f"{value:.2f}" if normalized else f"{int(value)}",
                ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black",
            )
    return fig


def learning_curves_figure(history: Sequence[dict]) -> Figure:
    """Loss and accuracy per epoch for train and validation, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for split in ("train", "val"):
        losses = [row.get(f"{split}_loss") for row in history]
        if any(value is not None for value in losses):
            loss_ax.plot(epochs, losses, marker=".", label=split)
            acc_ax.plot(epochs, [row.get(f"{split}_accuracy") for row in history], marker=".",
                        label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def misclassified_figure(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    class_names: Sequence[str],
    limit: int = 36,
) -> Figure:
    """The most confident mistakes: what the model is surest about and still gets wrong."""
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    columns = 6
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    # One tiled image instead of 36 axes: the same picture, drawn in a fraction of the time.
    cell, gap = 28, 12
    tiles = np.zeros((rows * (cell + gap), columns * cell + (columns - 1) * 4), dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(columns * 1.9, rows * 2.3))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    for position, index in enumerate(wrong):
        row, column = divmod(position, columns)
        top, left = row * (cell + gap) + gap, column * (cell + 4)
        tiles[top:top + cell, left:left + cell] = images[index].reshape(cell, cell)
        ax.text(left + cell / 2, top - 1, f"{class_names[y_true[index]]}\n"
                f"→ {class_names[y_pred[index]]} ({confidence[index]:.0%})",
                ha="center", va="bottom", fontsize=7)
    ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=255)
    ax.axis("off")
    fig.suptitle("Most confident mistakes (actual → predicted)")
    return fig


def save(fig: Figure, path: str | Path) -> None:
    """Write a PNG atomically (a half-written figure never replaces a good one).

    No metadata (matplotlib writes its version otherwise): the file holds the picture only.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def close(fig: Figure) -> None:
    """Free a figure once saved: pyplot keeps every open figure alive otherwise."""
    plt.close(fig)
