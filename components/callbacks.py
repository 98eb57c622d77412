"""Keras callbacks by name, plus the two every training gets: a one-line-per-epoch progress report
(terminal and Prefect UI logs) and per-epoch metrics in the MLflow run."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import keras

from cnnflow.components.registry import register


@register("callback", "early_stopping")
def early_stopping(monitor: str = "val_loss", patience: int = 3, restore_best_weights: bool = True):
    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=restore_best_weights)


@register("callback", "reduce_lr_on_plateau")
def reduce_lr_on_plateau(monitor: str = "val_loss", factor: float = 0.5, patience: int = 2, min_lr: float = 1e-6):
    return keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=factor, patience=patience, min_lr=min_lr)


class EpochProgress(keras.callbacks.Callback):
    """`epoch 3/20  loss 0.0412  accuracy 0.9871  val_loss 0.0390  val_accuracy 0.9880  41.2s`."""

    def __init__(self, epochs: int, logger: logging.Logger | logging.LoggerAdapter, first_epoch: int = 1):
        super().__init__()
        self.epochs, self.logger, self.first_epoch = epochs, logger, first_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        metrics = "  ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
        seconds = time.perf_counter() - self._started
        self.logger.info(f"epoch {epoch + 1}/{self.epochs}  {metrics}  {seconds:.1f}s")


class MlflowMetrics(keras.callbacks.Callback):
    """Logs every epoch's metrics (and its duration) to one MLflow run, step = epoch number from 1."""

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self._first_step_logged = False

    def on_train_batch_begin(self, batch, logs=None):
        """Once: seconds from the process start to the first training step (start-up cost)."""
        if not self._first_step_logged:
            import psutil
            from mlflow import MlflowClient

            self._first_step_logged = True
            MlflowClient().log_metric(self.run_id, "startup_seconds", time.time() - psutil.Process().create_time())

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = dict(logs or {}, epoch_seconds=time.perf_counter() - self._started)
        MlflowClient().log_batch(
            self.run_id, metrics=[Metric(name, float(value), now, epoch + 1) for name, value in values.items()]
        )


def backfill_metrics(run_id: str, history: dict[str, list[float]]) -> int:
    """Log the epochs of `history` that the run lacks (a process killed between its checkpoint and its
    metrics); returns how many epochs were filled in. Keeps the MLflow curve unbroken after a resume."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    missing = []
    for name, values in history.items():
        logged = {metric.step for metric in client.get_metric_history(run_id, name)}
        missing += [Metric(name, value, now, step) for step, value in enumerate(values, start=1) if step not in logged]
    if missing:
        client.log_batch(run_id, metrics=missing)
    return len({metric.step for metric in missing})


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the model with its optimizer state, and the history so far.

    `checkpoint.json` is the commit point: it is replaced atomically and names the model file it
    belongs to, so a training killed at any moment loses at most the epoch in progress.
    """

    def __init__(self, folder, history: dict[str, list[float]] | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.history = {name: list(values) for name, values in (history or {}).items()}

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        model_file = f"checkpoint-epoch{epoch + 1:04d}.keras"
        self.model.save(self.folder / model_file)
        partial = self.folder / "checkpoint.json.partial"
        partial.write_text(json.dumps({"epoch": epoch + 1, "file": model_file, "history": self.history}))
        os.replace(partial, self.folder / "checkpoint.json")
        for old in self.folder.glob("checkpoint-epoch*.keras"):
            if old.name != model_file:
                old.unlink()


def read_checkpoint(folder) -> dict | None:
    """{"epoch": completed epochs, "history": {...}, "path": the model file} of a run folder, or None."""
    state = Path(folder) / "checkpoint.json"
    if not state.is_file():
        return None
    checkpoint = json.loads(state.read_text())
    path = Path(folder) / checkpoint["file"]
    return checkpoint | {"path": str(path)} if path.is_file() else None
