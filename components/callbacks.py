"""Keras callbacks by name, plus those every training gets: a one-line-per-epoch progress report
(terminal and Prefect UI logs), per-epoch metrics for the MLflow run, checkpoints, divergence."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TextIO

import keras

from cnnflow.components.argtypes import NonNegativeFloat, NonNegativeInt, OpenFraction
from cnnflow.components.registry import register


@register("callback", "early_stopping")
def early_stopping(monitor: str = "val_loss", patience: NonNegativeInt = 3, restore_best_weights: bool = True):
    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=restore_best_weights)


@register("callback", "reduce_lr_on_plateau")
def reduce_lr_on_plateau(monitor: str = "val_loss", factor: OpenFraction = 0.5, patience: NonNegativeInt = 2,
                         min_lr: NonNegativeFloat = 1e-6):
    return keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=factor, patience=patience, min_lr=min_lr)


class EpochProgress(keras.callbacks.Callback):
    """Progress as people follow it: within an epoch, a live bar in a terminal or a log line every
    10% elsewhere (the Prefect UI's log), each with steps, images/s and the time left; then one line
    per epoch, `epoch 3/20  loss 0.0412  accuracy 0.9871  val_loss 0.0390  val_accuracy 0.9880  41.2s`."""

    def __init__(self, epochs: int, logger: logging.Logger | logging.LoggerAdapter, batch_size: int,
                 stream: TextIO | None = None):
        super().__init__()
        self.epochs, self.logger, self.batch_size = epochs, logger, batch_size
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._started, self._drawn, self._next_tenth = epoch + 1, time.perf_counter(), 0.0, 1

    def on_train_batch_end(self, batch, logs=None):
        steps, done = self.params.get("steps"), batch + 1
        if not steps or done >= steps:
            return
        elapsed = time.perf_counter() - self._started
        where = (f"{done}/{steps} steps  {done * self.batch_size / elapsed:,.0f} images/s  "
                 f"{elapsed / done * (steps - done):.0f}s left")
        if self.live and time.perf_counter() - self._drawn >= 0.5:
            self._drawn = time.perf_counter()
            bar = "#" * (20 * done // steps)
            self.stream.write(f"\r  epoch {self._epoch}/{self.epochs} [{bar:.<20}] {where} ")
            self.stream.flush()
        elif not self.live and 10 * done >= self._next_tenth * steps:
            self.logger.info(f"epoch {self._epoch}/{self.epochs}  {100 * done // steps}%  {where}")
            self._next_tenth = 10 * done // steps + 1

    def on_epoch_end(self, epoch, logs=None):
        if self.live:
            self.stream.write("\r" + " " * 100 + "\r")  # the bar gives way to the epoch's line
        metrics = "  ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
        seconds = time.perf_counter() - self._started
        self.logger.info(f"epoch {epoch + 1}/{self.epochs}  {metrics}  {seconds:.1f}s")


class EpochMetrics(keras.callbacks.Callback):
    """Hands every epoch's metrics (and its duration, and the CPU seconds of all the process's threads,
    which a shared CPU quota does not blur) to `log(metrics, step)`, step = epoch number
    from 1; once, before the first step, the seconds from the process start (start-up cost). The
    flow's `log` queues them for the MLflow run without waiting on the store."""

    def __init__(self, log):
        super().__init__()
        self.log = log
        self._first_step_logged = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self._first_step_logged:
            import psutil

            self._first_step_logged = True
            self.log({"startup_seconds": time.time() - psutil.Process().create_time()}, 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.log(dict(logs or {}, epoch_seconds=time.perf_counter() - self._started,
                      epoch_cpu_seconds=time.process_time() - self._cpu_started), epoch + 1)


_LOSS_FLOOR = 0.01


class WarnAtChance(keras.callbacks.Callback):
    """One warning line when validation accuracy sits at chance (what always answering the most
    common validation class scores) while training accuracy has risen at least halfway from chance
    to 1: a model that fits its training images and predicts nothing on others (batch-norm
    statistics that lag the weights, a leak between the training images' labels and their files)."""

    def __init__(self, chance: float, logger: logging.Logger | logging.LoggerAdapter):
        super().__init__()
        self.chance, self.logger, self.warned = chance, logger, False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.warned or "accuracy" not in logs or "val_accuracy" not in logs:
            return
        trained, validated = float(logs["accuracy"]), float(logs["val_accuracy"])
        if validated <= self.chance + 0.05 * (1 - self.chance) and trained >= self.chance + 0.5 * (1 - self.chance):
            self.warned = True
            self.logger.warning(f"epoch {epoch + 1}: val_accuracy {validated:.4f} is at chance ({self.chance:.4f}, always "
                                f"the most common class) while training accuracy rose to {trained:.4f}: the model "
                                f"does not carry over to images it has not trained on (docs/troubleshooting.md)")


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite (Keras' TerminateOnNaN), or
    grew to more than `max_loss_factor` times the first batch's: such a model is garbage even where
    its numbers stay finite. `diverged` says where, so the flow can fail the run with the epoch and
    the learning rate."""

    def __init__(self, max_loss_factor: float | None = None, first_loss: float | None = None):
        """`first_loss`: a resumed training's first loss (its first epoch's), so that a resume near
        convergence, where the loss is near 0, does not take its own noise for divergence."""
        super().__init__()
        self.max_loss_factor = max_loss_factor
        self.diverged: dict | None = None
        self._first_loss: float | None = first_loss

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or self.diverged is not None:
            return
        loss = float(loss)
        if self._first_loss is None and math.isfinite(loss):
            self._first_loss = abs(loss)
        # a warm start may begin near 0: growth from there to 0.01 x max_loss_factor is no divergence
        scale = max(self._first_loss or 0.0, _LOSS_FLOOR)
        exploded = self.max_loss_factor and self._first_loss is not None and loss > self.max_loss_factor * scale
        if not math.isfinite(loss) or exploded:
            rate = self.model.optimizer.learning_rate
            self.diverged = {"epoch": self._epoch, "batch": batch + 1, "loss": float(loss),
                             "learning_rate": float(rate(self.model.optimizer.iterations) if callable(rate) else rate)}
            self.model.stop_training = True
