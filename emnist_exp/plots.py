"""Figures for runs and reports (matplotlib, headless). Each function returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


# Matplotlib's default cycle: ten colours that stay apart for every trial number mod 10, where MLflow's
# own run colours (picked by hashing the run id from a palette holding six greens) often do not.
TRIAL_COLOURS = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors]


def trial_colour(number: int) -> str:
    """The colour of trial `number` in every chart (MLflow's, via the run's colour tag)."""
    return TRIAL_COLOURS[number % len(TRIAL_COLOURS)]


def learning_curve(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, train against validation, epochs counted from 0 as MLflow's steps are."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ["loss", "accuracy"]):
        for prefix, style in [("", "-o"), ("val_", "-s")]:
            values = history.get(prefix + metric, [])
            ax.plot(range(len(values)), values, style, label=(prefix or "train_") + metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch (the step of epoch_* metrics in MLflow)")
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


def _strip(ax, groups: dict[str, dict[str, list[float]]]) -> None:
    """Every value as a dot over its group's name, val and test side by side, with each mean as a bar."""
    rng = np.random.default_rng(0)  # the same jitter every time: reports stay comparable
    for x, (group, series) in enumerate(groups.items()):
        for offset, (metric, marker) in zip((-0.15, 0.15), (("val", "o"), ("test", "s"))):
            values = np.asarray(series.get(metric, []), dtype=float)
            values = values[np.isfinite(values)]
            if len(values):
                spots = x + offset + rng.uniform(-0.06, 0.06, len(values))
                ax.plot(spots, values, marker, alpha=0.7, color=f"C{0 if metric == 'val' else 1}",
                        label=f"{metric}_accuracy" if x == 0 else None)
                ax.hlines(values.mean(), x + offset - 0.12, x + offset + 0.12, color="k")
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={len(s.get('val', []))})" for g, s in groups.items()])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(alpha=0.3, axis="y")


def on_off(groups: dict[str, dict[str, list[float]]], title: str) -> Figure:
    """Trial accuracies for each setting of one switch (e.g. augmentation off/on); bars are means."""
    fig, ax = plt.subplots(figsize=(5, 4))
    _strip(ax, groups)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_by_param(columns: dict[str, list], val: list[float], test: list[float]) -> Figure:
    """One panel per hyperparameter: each trial's accuracy against its value (log x for rates)."""
    cols = min(4, len(columns)) or 1
    rows = max(1, int(np.ceil(len(columns) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(columns):]:
        ax.axis("off")
    for ax, (name, values) in zip(axes.ravel(), columns.items()):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.plot(values, val, "o", alpha=0.7, label="val_accuracy")
            ax.plot(values, test, "s", alpha=0.7, label="test_accuracy")
            ax.set_xscale("log" if "learning_rate" in name else "linear")
            ax.grid(alpha=0.3)
        else:
            groups = {str(g): {"val": [], "test": []} for g in sorted({str(v) for v in values})}
            for v, a, t in zip(values, val, test):
                groups[str(v)]["val"].append(a)
                groups[str(v)]["test"].append(t)
            _strip(ax, groups)
        ax.set_title(name, fontsize=10)
    axes.ravel()[0].set_ylabel("accuracy")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def ensemble_vs_members(names: list[str], val: list[float], test: list[float], title: str) -> Figure:
    """Validation and test accuracy of each member and of the ensemble (the last bar pair)."""
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    ax.bar(x - 0.2, val, 0.4, label="val_accuracy")
    ax.bar(x + 0.2, test, 0.4, label="test_accuracy")
    for i, (v, t) in enumerate(zip(val, test)):
        for dx, value in ((-0.2, v), (0.2, t)):
            if np.isfinite(value):
                ax.annotate(f"{value:.3f}", (i + dx, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    finite = [v for v in val + test if np.isfinite(v)]
    ax.set_ylim(max(0.0, min(finite, default=0.0) - 0.05), min(1.0, max(finite, default=1.0) + 0.03))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
