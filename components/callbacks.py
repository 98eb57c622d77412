"""Keras callbacks by name, plus the two every training gets: a one-line-per-epoch progress report
(terminal and Prefect UI logs) and per-epoch metrics in the MLflow run."""

from __future__ import annotations

import logging
import time

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
