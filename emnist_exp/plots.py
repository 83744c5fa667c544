"""Figures for runs and reports (matplotlib, headless). Each function returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def learning_curve(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, train against validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ["loss", "accuracy"]):
        for prefix, style in [("", "-o"), ("val_", "-s")]:
            values = history.get(prefix + metric, [])
            ax.plot(range(1, len(values) + 1), values, style, label=(prefix or "train_") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...],
              title: str = "confusion matrix (rows: true, columns: predicted)") -> Figure:
    """A row-normalised confusion matrix over all classes, on a log-ish colour scale."""
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels.astype(int), predicted.astype(int)), 1)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 10))
    image = ax.imshow(np.sqrt(rows), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="sqrt(fraction of the row)")
    fig.tight_layout()
    return fig


def misclassified(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                  classes: tuple[str, ...], limit: int = 48) -> Figure:
    """A grid of wrongly classified images, titled `true -> predicted`."""
    wrong = np.flatnonzero(labels != predicted)[:limit]
    cols = 8
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), wrong):
        ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[labels[i]]} -> {classes[predicted[i]]}", fontsize=9)
    fig.suptitle(f"misclassified test images (first {len(wrong)})")
    fig.tight_layout()
    return fig
