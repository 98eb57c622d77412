"""Figures of a finished training. A plot is registered as a function of `Results` (and its config
arguments) that returns a matplotlib Figure; the flow saves it and logs it to MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: flows run headless, in workers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnflow.components.registry import register  # noqa: E402


@dataclass(frozen=True)
class Results:
    history: dict[str, list[float]]  # Keras metric name -> one value per epoch
    images: np.ndarray  # test images as stored (uint8, (n, h, w, c))
    labels: np.ndarray  # true classes, (n,)
    probabilities: np.ndarray  # (n, classes) softmax, or (n,) probability of class 1 for one-unit models
    class_names: tuple[str, ...]

    @property
    def predictions(self) -> np.ndarray:
        if self.probabilities.ndim == 1:
            return (self.probabilities >= 0.5).astype(np.int64)
        return self.probabilities.argmax(axis=1)


def _show(axis, image: np.ndarray, title: str, color: str = "black") -> None:
    axis.imshow(image.squeeze(), cmap="gray_r" if image.shape[-1] == 1 else None)
    axis.set_title(title, fontsize=9, color=color)
    axis.set_xticks([])
    axis.set_yticks([])


@register("plot", "learning_curves")
def learning_curves(results: Results) -> plt.Figure:
    """Loss and accuracy per epoch, training vs validation."""
    metrics = [name for name in results.history if not name.startswith("val_")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(results.history[metric]) + 1)
        axis.plot(epochs, results.history[metric], "-o", label=f"train {metric}")
        if f"val_{metric}" in results.history:
            axis.plot(epochs, results.history[f"val_{metric}"], "--<", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


@register("plot", "prediction_grid")
def prediction_grid(results: Results, rows: int = 2, cols: int = 6) -> plt.Figure:
    """The first rows x cols test images with their predicted labels (red where wrong)."""
    count = min(rows * cols, len(results.labels))
    figure = plt.figure(figsize=(1.6 * cols, 1.9 * rows))
    for i in range(count):
        predicted, true = results.predictions[i], results.labels[i]
        title = f"pred {results.class_names[predicted]}"
        _show(figure.add_subplot(rows, cols, i + 1), results.images[i], title, "black" if predicted == true else "red")
    figure.tight_layout()
    return figure


@register("plot", "misclassified_grid")
def misclassified_grid(results: Results, max_images: int = 24, cols: int = 8) -> plt.Figure:
    """Misclassified test images, most confident mistakes first, with true and predicted labels."""
    wrong = np.flatnonzero(results.predictions != results.labels)
    confidence = results.probabilities.max(axis=1) if results.probabilities.ndim == 2 else np.abs(
        results.probabilities - 0.5)
    wrong = wrong[np.argsort(-confidence[wrong])][:max_images]
    rows = max(1, -(-len(wrong) // cols))
    figure = plt.figure(figsize=(1.7 * cols, 2.0 * rows))
    figure.suptitle(f"{np.sum(results.predictions != results.labels)} of {len(results.labels)} test images "
                    f"misclassified (showing {len(wrong)})", fontsize=10)
    for i, index in enumerate(wrong):
        title = f"true {results.class_names[results.labels[index]]}\npred {results.class_names[results.predictions[index]]}"
        _show(figure.add_subplot(rows, cols, i + 1), results.images[index], title, "red")
    figure.tight_layout()
    return figure


@register("plot", "confusion_matrix")
def confusion_matrix(results: Results) -> plt.Figure:
    """Counts of true (rows) vs predicted (columns) classes on the test set."""
    k = len(results.class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (results.labels, results.predictions), 1)
    figure, axis = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    axis.imshow(counts, cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        axis.text(col, row, str(count), ha="center", va="center", fontsize=8,
                  color="white" if count > counts.max() / 2 else "black")
    axis.set_xticks(range(k), results.class_names, rotation=45, ha="right")
    axis.set_yticks(range(k), results.class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"test accuracy {np.trace(counts) / counts.sum():.4f}")
    figure.tight_layout()
    return figure
