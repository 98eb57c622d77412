"""What a model's outputs mean, in one place: outputs to probabilities to labels.

A model ends in k units for k classes (softmax probabilities, or logits when the loss says
`from_logits`), or in one unit for two classes: the logit (or probability) of class 1. A one-logit
model predicts class 1 when its logit is above 0, which is its probability being above 0.5; Keras'
plain "accuracy" would compare the logit itself with 0.5, so training measures accuracy with
`ONE_LOGIT_THRESHOLD` on the logit. The chapter's CelebA model was compiled with that plain
"accuracy", so the book's 94.47% counts a face as Male only when its logit is above 0.5 (P(Male)
above 0.62); evaluations report that figure too, as `accuracy_at_logit_0.5`, to compare with the book.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ONE_LOGIT_THRESHOLD = 0.0  # on the logit; the same decision as probability 0.5
BOOK_LOGIT_THRESHOLD = 0.5  # what Keras' plain "accuracy" compared a logit with, as in the chapter


def probabilities(outputs, from_logits: bool) -> np.ndarray:
    """(n, k) class probabilities, or (n,) P(class 1) for a one-unit model."""
    from scipy.special import expit, softmax

    outputs = np.asarray(outputs, dtype=np.float32)  # a mixed-precision model may output bfloat16 or float16
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if not from_logits:
        return outputs
    return expit(outputs) if outputs.ndim == 1 else softmax(outputs, axis=1)


def predicted(probabilities: np.ndarray) -> np.ndarray:
    """The predicted class of each example."""
    if probabilities.ndim == 1:
        return (probabilities >= 0.5).astype(np.int64)
    return probabilities.argmax(axis=1)


def labelled(probabilities: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Per example: the predicted class name, its probability, and P(class 1) for one-unit models."""
    rows = []
    for label, probs in zip(predicted(probabilities), probabilities):
        if np.ndim(probs) == 0:
            rows.append({"label": class_names[label], "probability": float(probs if label else 1 - probs),
                         f"p_{class_names[1]}": float(probs)})
        else:
            rows.append({"label": class_names[label], "probability": float(probs[label])})
    return rows


def positive(probabilities: np.ndarray) -> np.ndarray:
    """P(class 1) of each example of a two-class task (one unit, or two softmax units)."""
    return probabilities if probabilities.ndim == 1 else probabilities[:, 1]


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, from_logits: bool = False) -> dict[str, float]:
    """What a two-class task reports besides accuracy: the ROC AUC of P(class 1) (when both classes
    occur), and for a one-logit model the accuracy at the chapter's threshold (logit above 0.5)."""
    metrics = {}
    if from_logits and probabilities.ndim == 1:
        from scipy.special import expit

        book = probabilities > expit(BOOK_LOGIT_THRESHOLD)
        metrics[f"accuracy_at_logit_{BOOK_LOGIT_THRESHOLD}"] = float(np.mean(book == labels.astype(bool)))
    if len(np.unique(labels)) == 2 and (probabilities.ndim == 1 or probabilities.shape[1] == 2):
        from sklearn.metrics import roc_auc_score

        metrics["roc_auc"] = float(roc_auc_score(labels, positive(probabilities)))
    return metrics


def evaluated(model, dataset, labels: np.ndarray, from_logits: bool) -> tuple[dict[str, float], np.ndarray]:
    """Keras' loss and metrics of `model` on `dataset`, with what a two-class task adds (see
    binary_metrics), and the per-example probabilities behind them."""
    from cnnflow.components.data import fewer_images, read_in_full

    with read_in_full():
        metrics = {name: float(value) for name, value in model.evaluate(dataset, return_dict=True, verbose=0).items()}
        chances = probabilities(model.predict(dataset, verbose=0), from_logits)
    if len(chances) != len(labels):  # a stream of unstated size: Keras stops where the data does, with a warning only
        raise fewer_images(len(chances), len(labels))
    return metrics | binary_metrics(labels, chances, from_logits), chances


def is_one_logit(loss: dict[str, Any]) -> bool:
    return loss["name"] == "binary_crossentropy" and bool(loss.get("from_logits"))
