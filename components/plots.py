"""Figures of a finished training. A plot is registered as a function of `Results` (and its config
arguments) that returns a matplotlib Figure; the flow saves it and logs it to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")  # files only: flows run headless, in workers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnflow.components.data.core import Partition  # noqa: E402
from cnnflow.components.argtypes import NonNegativeInt, PositiveInt  # noqa: E402
from cnnflow.components import outputs  # noqa: E402
from cnnflow.components.registry import register  # noqa: E402


@dataclass(frozen=True)
class Results:
    history: dict[str, list[float]]  # Keras metric name -> one value per epoch
    test: Partition  # the test examples, images as stored (decoded on demand for figures)
    probabilities: np.ndarray  # (n, classes) softmax, or (n,) probability of class 1 for one-unit models
    class_names: tuple[str, ...]

    @property
    def labels(self) -> np.ndarray:
        return self.test.labels

    def image(self, index: int) -> np.ndarray:
        return self.test.image(index)

    @property
    def predictions(self) -> np.ndarray:
        return outputs.predicted(self.probabilities)


def saved(kind: str, specs: dict, folder: Path, **provided) -> list[Path]:
    """Each configured figure of `kind` (label -> spec; a null spec is skipped) built with what the
    flow provides, written to folder/<label>.png: a training's plots and a search's alike."""
    from cnnflow.components import registry

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, spec in specs.items():
        if spec:
            figure = registry.build(kind, spec, **provided)
            paths.append(folder / f"{label}.png")
            figure.savefig(paths[-1], dpi=110)
            plt.close(figure)
    return paths


def _show(axis, image: np.ndarray, title: str, color: str = "black") -> None:
    axis.imshow(image.squeeze(), cmap="gray_r" if image.shape[-1] == 1 else None)
    axis.set_title(title, fontsize=9, color=color)
    axis.set_xticks([])
    axis.set_yticks([])


def image_grid(images, titles: list[str], colors: list[str] | None = None, cols: int = 6,
               width: float = 1.7, title: str | None = None) -> plt.Figure:
    """Images in rows of `cols`, each under its title (in its color); every image figure uses it.
    A cell is as tall as its image is at `width` inches plus its title's lines, so two-line titles
    of tall faces do not run into the row above."""
    images = [np.asarray(image) for image in images]
    rows = max(1, -(-len(titles) // cols))
    aspect = images[0].shape[0] / images[0].shape[1] if images else 1.0
    lines = max((text.count("\n") + 1 for text in titles), default=1)
    figure = plt.figure(figsize=(width * cols, rows * (width * aspect + 0.2 * lines + 0.1) + (0.4 if title else 0.0)),
                        layout="constrained")
    if title:
        figure.suptitle(title, fontsize=10)
    for i, (image, text) in enumerate(zip(images, titles)):
        _show(figure.add_subplot(rows, cols, i + 1), image, text, colors[i] if colors else "black")
    return figure


@register("plot", "learning_curves")
def learning_curves(results: Results) -> plt.Figure:
    """Loss and accuracy per epoch, training vs validation."""
    metrics = sorted((name for name in results.history if not name.startswith("val_")), key=lambda n: n != "loss")
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(results.history[metric]) + 1)
        axis.plot(epochs, results.history[metric], "-o", label=f"train {metric}")
        if f"val_{metric}" in results.history:
            axis.plot(epochs, results.history[f"val_{metric}"], "--<", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"Learning curves over {len(results.history[metrics[0]])} epochs: training (solid) and "
                    f"validation (dashed)", fontsize=11)
    figure.tight_layout()
    return figure


@register("plot", "prediction_grid")
def prediction_grid(results: Results, rows: PositiveInt = 2, cols: PositiveInt = 6, show_probability: bool = False) -> plt.Figure:
    """The first rows x cols test images with their predicted labels (red where wrong), or with the
    true label and the predicted probability of the positive class (`show_probability`, binary models)."""
    shown = range(min(rows * cols, len(results.labels)))
    predicted, true = results.predictions, results.labels
    if show_probability:
        titles = [f"true {results.class_names[true[i]]}\nP({results.class_names[1]}) = "
                  f"{outputs.positive(results.probabilities)[i]:.2f}" for i in shown]
    else:
        titles = [f"pred {results.class_names[predicted[i]]}" + (
            "" if predicted[i] == true[i] else f"\ntrue {results.class_names[true[i]]}") for i in shown]
    what = "true label and predicted probability" if show_probability else "predicted label (and the true one)"
    return image_grid((results.image(i) for i in shown), titles,
                      ["black" if predicted[i] == true[i] else "red" for i in shown], cols,
                      2.2 if show_probability else 1.6, title=f"The first {len(shown)} test images: {what} (red where wrong)")


@register("plot", "misclassified_grid")
def misclassified_grid(results: Results, max_images: PositiveInt = 24, cols: PositiveInt = 8) -> plt.Figure:
    """Misclassified test images, most confident mistakes first, with true and predicted labels."""
    wrong = np.flatnonzero(results.predictions != results.labels)
    confidence = results.probabilities.max(axis=1) if results.probabilities.ndim == 2 else np.abs(
        results.probabilities - 0.5)
    wrong = wrong[np.argsort(-confidence[wrong])][:max_images]
    titles = [f"true {results.class_names[results.labels[i]]}\npred {results.class_names[results.predictions[i]]}"
              for i in wrong]
    return image_grid((results.image(i) for i in wrong), titles, ["red"] * len(wrong), cols,
                      title=f"{np.sum(results.predictions != results.labels)} of {len(results.labels)} test "
                            f"images misclassified; the {len(wrong)} most confident mistakes")


@register("plot", "confusion_matrix")
def confusion_matrix(results: Results) -> plt.Figure:
    """Counts of true (rows) vs predicted (columns) classes on the test set."""
    k = len(results.class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (results.labels, results.predictions), 1)
    side = max(4.0, 1.0 + 0.6 * k)  # two classes still leave room for the title and the labels
    figure, axis = plt.subplots(figsize=(side, side - 0.2))
    axis.imshow(counts, cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        axis.text(col, row, str(count), ha="center", va="center", fontsize=8,
                  color="white" if count > counts.max() / 2 else "black")
    axis.set_xticks(range(k), results.class_names, rotation=45, ha="right")
    axis.set_yticks(range(k), results.class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"Confusion matrix of {counts.sum()} test images\n(accuracy {np.trace(counts) / counts.sum():.4f})",
                   fontsize=10)
    figure.tight_layout()
    return figure


@register("plot", "roc_curve")
def roc_curve(results: Results) -> plt.Figure:
    """True vs false positive rate over all thresholds of the positive-class probability, with its AUC."""
    from sklearn.metrics import roc_curve as curve

    false_positive, true_positive, _ = curve(results.labels, outputs.positive(results.probabilities))
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    auc = outputs.binary_metrics(results.labels, results.probabilities)["roc_auc"]
    axis.plot(false_positive, true_positive, label=f"AUC {auc:.4f}")
    axis.plot([0, 1], [0, 1], "--", color="gray", label="chance")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(f"ROC of P({results.class_names[1]}) on {len(results.labels)} test images\n"
                   f"({results.class_names[1]} against {results.class_names[0]})", fontsize=10)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _displayable(image) -> np.ndarray:
    """A transform's output as [0, 1] floats for imshow (uint8, 0..255 floats and [0, 1] floats alike)."""
    image = np.asarray(image, dtype=np.float32)
    return np.clip(image / 255.0 if image.max() > 1.5 else image, 0.0, 1.0)


@register("plot", "augmentation_examples")
def augmentation_examples(results: Results, columns: dict[str, list], count: PositiveInt = 5) -> plt.Figure:
    """`count` test images (rows): the original, then each named deterministic transform of it."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    no_seed = tf.zeros(2, tf.int64)
    transforms = {label: (lambda image, _row, transform=compose(specs): transform(image, no_seed))
                  for label, specs in columns.items()}
    return _transformed_grid(results, transforms, count, f"The first {count} test images, each beside "
                                                         f"{len(columns)} fixed transforms of it")


@register("plot", "augmentation_samples")
def augmentation_samples(results: Results, transforms: list, count: PositiveInt = 3, repeats: PositiveInt = 5,
                         seed: NonNegativeInt = 1) -> plt.Figure:
    """The random training pipeline applied `repeats` times to each of `count` test images."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    pipeline = compose(transforms)
    draws = {f"sample {col}": (lambda image, row, col=col: pipeline(
        image, tf.constant([seed, row * repeats + col], tf.int64))) for col in range(1, repeats + 1)}
    names = ", ".join(spec["name"] for spec in transforms) or "none"
    return _transformed_grid(results, draws, count, f"The training augmentation ({names}) drawn {repeats} times "
                                                    f"for each of the first {count} test images")


def _transformed_grid(results: Results, columns: dict, count: int, title: str) -> plt.Figure:
    """A row per test image: the original, then each column's function of it (image, row) -> image."""
    import tensorflow as tf

    figure, axes = plt.subplots(count, len(columns) + 1, figsize=(2.0 * (len(columns) + 1), 2.4 * count + 0.4),
                                squeeze=False, layout="constrained")
    figure.suptitle(title, fontsize=10)
    for row in range(count):
        original = results.image(row)
        _show(axes[row, 0], original, "original" if row == 0 else "")
        for col, (label, function) in enumerate(columns.items(), start=1):
            _show(axes[row, col], _displayable(function(tf.constant(original), row)), label if row == 0 else "")
    return figure
