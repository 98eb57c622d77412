"""Keras callbacks by name, plus those every training gets: a one-line-per-epoch progress report
(terminal and Prefect UI logs), per-epoch metrics for the MLflow run, checkpoints, divergence."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

import keras
import numpy as np

from cnnflow.components.argtypes import NonNegativeFloat, NonNegativeInt, OpenFraction
from cnnflow.components.errors import DataError
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


# Checkpoints kept in a run folder: the newest, and the one before it until the newest is complete.
KEEP_CHECKPOINTS = 2


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the model with its optimizer state (`checkpoint-epochNNNN.keras`), then its
    state file (`checkpoint-epochNNNN.json`: epoch, history), the commit point. Inside an epoch, every
    `minutes`: the position (`checkpoint-epochNNNN-batchMMMMMM.npz` and `.json`).

    Each file is on disk (fsync of file and folder) before the next step, the state file is written
    atomically, and older checkpoints are deleted only once the new one is complete and its model
    file reads back whole. A training killed at any moment, even by a power cut, loses at most the
    epoch in progress (or the minutes since its last position). An epoch in which `divergence` saw
    the training diverge is not checkpointed: there is nothing to resume from garbage weights.
    `on_saved(model file, state)` is told of each complete epoch checkpoint, `on_position(arrays,
    state)` of each complete position (the flow copies both to the run's artifact store). The state
    holds what the model file does not: the history, and the position of every random stream in the
    model (dropout's), so a resumed training draws what the uninterrupted one would have drawn. An
    epoch the data ran out in before its `steps` is a DataError, never a checkpoint.

    A position inside an epoch is every variable of the training (weights, optimizer, random
    streams, the epoch's running metrics) copied in memory between two batches; a thread writes it
    while training goes on. `resume` = (its .npz, batches done) puts a training back there at the
    start of its first epoch, when Keras has built the optimizer and metrics and reset the metrics.
    """

    def __init__(self, folder, history: dict[str, list[float]] | None = None,
                 divergence: StopOnDivergence | None = None, on_saved=None, minutes: float = 0.0,
                 steps: int = 0, base: str = "", resume: tuple[str, int] | None = None, log=None, on_position=None):
        """`log(metrics, step)` gets, for each epoch with positions, what they cost: `positions`,
        `position_seconds` (what training waited for: the copy in memory, a write still in progress)
        and `position_write_cpu_seconds` (the writing thread's CPU time)."""
        super().__init__()
        self.folder = Path(folder)
        self.history = {name: list(values) for name, values in (history or {}).items()}
        self.divergence = divergence
        self.on_saved = on_saved
        self.minutes, self.steps, self.base, self.resume, self.log = minutes, steps, base, resume, log
        self.on_position = on_position
        self._writing: threading.Thread | None = None
        self._failed: OSError | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._done, self._taken = epoch, 0, time.monotonic()
        self._cost = {"positions": 0, "position_seconds": 0.0, "position_write_cpu_seconds": 0.0}
        if self.resume:
            arrays, self._done = self.resume
            restore_position(self.model, arrays)
            self.resume = None

    def on_train_batch_end(self, batch, logs=None):
        self._done += 1
        self._raise_failed_write()
        if not self.minutes or time.monotonic() - self._taken < 60 * self.minutes or self._done >= self.steps:
            return  # an epoch's last batch is checkpointed whole at its end
        if self.divergence and self.divergence.diverged:
            return
        started = time.perf_counter()
        self.finish_writing()  # one at a time: a slow disk delays a position, never reorders two
        self._taken = time.monotonic()
        if not (self.folder / self.base).exists():
            self._write_base()
        state = {"epoch": self._epoch, "batch": self._done, "history": self.history, "random": random_state(self.model),
                 "file": self.base}
        snapshot = [np.array(part) for part in position_parts(self.model)]
        self._writing = threading.Thread(target=self._write_position, args=(snapshot, json.loads(json.dumps(state))),
                                         name="cnnflow-checkpoint")
        self._writing.start()
        self._cost["positions"] += 1
        self._cost["position_seconds"] += time.perf_counter() - started

    def _write_base(self) -> None:
        """The model file a position's arrays fill, written at the first position of a training whose
        untrained model was handed over in memory (flows/train.py): any values will do, all are filled."""
        partial = self.folder / f"partial-{self.base}"
        self.model.save(partial)
        _sync(partial)
        os.replace(partial, self.folder / self.base)
        _sync(self.folder)

    def _write_position(self, snapshot: list[np.ndarray], state: dict) -> None:
        stem = f"checkpoint-epoch{state['epoch'] + 1:04d}-batch{state['batch']:06d}"
        started = time.thread_time()
        try:
            write_durably(self.folder / f"{stem}.npz", lambda handle: np.savez(handle, *snapshot))
            write_durably(self.folder / f"{stem}.json", json.dumps({**state, "arrays": f"{stem}.npz"}))
            _remove_positions(self.folder, keep=stem)
            if self.on_position:
                self.on_position(self.folder / f"{stem}.npz", state)
        except OSError as error:  # said by the training's thread, at its next batch
            self._failed = error
        self._cost["position_write_cpu_seconds"] += time.thread_time() - started  # read once the thread is joined

    def finish_writing(self, quietly: bool = False) -> None:
        """Wait for the position being written, if any (at an epoch's end, and when training stops);
        raise its failure unless `quietly` (training has stopped for another reason, which is the one to say)."""
        if self._writing:
            self._writing.join()
            self._writing = None
        if not quietly:
            self._raise_failed_write()

    def _raise_failed_write(self) -> None:
        if self._failed:
            failed, self._failed = self._failed, None
            raise failed

    def on_train_end(self, logs=None):
        self.finish_writing()

    def on_epoch_end(self, epoch, logs=None):
        self.finish_writing()
        if self.log and self._cost["positions"]:
            self.log(self._cost, epoch + 1)
        logs = logs or {}
        if (self.divergence and self.divergence.diverged) or not all(math.isfinite(float(v)) for v in logs.values()):
            return
        if self._done < self.steps:  # Keras ends training with a warning only: it must not pass as a finished epoch
            raise DataError(f"epoch {epoch + 1} ended after {self._done} of its {self.steps} steps: the data source "
                            f"yielded fewer training images than the split holds (an incomplete or damaged copy of "
                            f"the data?); nothing of this epoch is kept")
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        stem = f"checkpoint-epoch{epoch + 1:04d}"
        state = {"epoch": epoch + 1, "history": self.history, "random": random_state(self.model)}
        self.model.save(self.folder / f"{stem}.keras")
        _sync(self.folder / f"{stem}.keras")
        problem = _damage(self.folder / f"{stem}.keras")
        if problem:
            raise OSError(f"the checkpoint just written, {self.folder / stem}.keras, does not read back: {problem}")
        write_durably(self.folder / f"{stem}.json", json.dumps({**state, "file": f"{stem}.keras"}))
        self.base = f"{stem}.keras"
        _remove_positions(self.folder)  # the complete epoch is further on than any position inside it
        states = _state_files(self.folder)
        for old in states[KEEP_CHECKPOINTS:]:
            old.unlink()
        kept = {_model_file_of(state) for state in states[:KEEP_CHECKPOINTS]}
        for model_file in self.folder.glob("checkpoint-epoch*.keras"):
            if model_file.name not in kept:
                model_file.unlink()
        if self.on_saved:
            self.on_saved(self.folder / f"{stem}.keras", state)


def position_variables(model) -> list:
    """Every variable a training's next step depends on, in a fixed order: the model's (weights and
    random streams), the optimizer's, and the running metrics of the epoch."""
    found, seen = [], set()
    for variable in [*model.variables, *model.optimizer.variables, *model.metrics_variables]:
        if id(variable) not in seen:
            seen.add(id(variable))
            found.append(variable)
    return found


def position_parts(model) -> list:
    """`position_variables`, with each variable a distribution strategy keeps per replica split into
    its replicas' own parts: a metric's running totals differ between replicas, and their sum read
    whole would be put back as equal halves, other bits than the training never stopped."""
    parts = []
    for variable in position_variables(model):
        replicas = getattr(getattr(variable, "value", variable), "values", None)  # tf.distribute's per-replica parts
        parts.extend(replicas if isinstance(replicas, tuple) else [variable])
    return parts


def restore_position(model, arrays: str) -> None:
    """Assign the values an `EpochCheckpoint` position saved to `model`'s variables."""
    parts = position_parts(model)
    with np.load(arrays) as saved:
        values = [saved[f"arr_{index}"] for index in range(len(saved.files))]
    shapes = [tuple(part.shape) for part in parts]
    if [value.shape for value in values] != shapes:
        raise ValueError(f"{arrays} holds {len(values)} arrays that do not fit the model's {len(shapes)} variables")
    for part, value in zip(parts, values):
        part.assign(value)


def _remove_positions(folder: Path, keep: str | None = None) -> None:
    """Delete the positions inside epochs, but `keep` (a stem): the state file first, so a kill
    half-way leaves no state file without its arrays."""
    for state in folder.glob("checkpoint-epoch*-batch*.json"):
        if state.stem != keep:
            state.unlink(missing_ok=True)
            state.with_suffix(".npz").unlink(missing_ok=True)
    for cut_off in folder.glob("checkpoint-epoch*-batch*.npz.partial"):  # its writer was killed
        if not keep or not cut_off.name.startswith(keep):
            cut_off.unlink(missing_ok=True)


def random_state(model) -> list[list[int]]:
    """Where each random stream of the model stands (the seed generators of dropout and random
    layers, in the model's order). Keras' .keras files do not keep them."""
    return [variable.numpy().tolist() for variable in _random_streams(model)]


def restore_random_state(model, state: list[list[int]] | None) -> None:
    """Put the model's random streams where `random_state` found them (a checkpoint from before this
    was recorded has none: its streams start afresh)."""
    streams = _random_streams(model)
    if state is None or len(state) != len(streams):
        return
    for variable, position in zip(streams, state):
        variable.assign(np.asarray(position, dtype=variable.dtype))


def _random_streams(model) -> list:
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def _model_file_of(state: Path) -> str | None:
    try:
        return json.loads(state.read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_durably(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Replace `path` with `content` (text, bytes, or what a function writes to the open file)
    atomically, and make both file and folder entry survive a power cut."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        if callable(content):
            content(handle)
        else:
            handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _sync(path.parent)


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _damage(model_file: Path) -> str | None:
    """Why a saved .keras file (a zip) is unusable, or None: missing, truncated, or a bad checksum."""
    import zipfile

    try:
        with zipfile.ZipFile(model_file) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return "its model file is missing"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"its model file is damaged ({error})"
    return f"its model file is damaged (bad checksum in {bad})" if bad else None


def _state_files(folder: Path) -> list[Path]:
    """State files, newest epoch first (`checkpoint.json` is the single state file of cnnflow <= 0.1)."""
    found = list(Path(folder).glob("checkpoint-epoch*.json")) + [Path(folder) / "checkpoint.json"]
    return sorted((path for path in found if path.is_file()), key=lambda path: (path.name != "checkpoint.json", path.name),
                  reverse=True)


def checkpoints(folder) -> list[tuple[dict | None, str]]:
    """Every checkpoint of a run folder, newest first, as (checkpoint or None, why it is unusable).

    A usable checkpoint is {"epoch": completed epochs, "history": {...}, "path": its model file}; a
    position inside an epoch also has "batch" (batches done of the next epoch), and its "path" is
    its arrays (.npz), whose state file names the model file they fill.
    """
    found = []
    for state in _state_files(Path(folder)):
        try:
            checkpoint = json.loads(state.read_text())
            epoch, file, history = int(checkpoint["epoch"]), checkpoint["file"], dict(checkpoint["history"])
            batch, arrays = int(checkpoint.get("batch", 0)), checkpoint.get("arrays")
        except (OSError, ValueError, KeyError, TypeError) as error:
            found.append((None, f"{state.name} is damaged ({type(error).__name__})"))
            continue
        problem = _damage(Path(folder) / file) or (arrays and _damage(Path(folder) / arrays))
        label = f"the checkpoint of epoch {epoch + 1} at step {batch}" if arrays else f"the checkpoint of epoch {epoch}"
        usable = {"epoch": epoch, "history": history, "path": str(Path(folder) / (arrays or file))}
        found.append((None, f"{label} is unusable: {problem}") if problem else
                     ({**usable, "batch": batch} if arrays else usable, label))
    return found


def read_checkpoint(folder) -> dict | None:
    """The newest usable checkpoint of a run folder, or None."""
    return next((checkpoint for checkpoint, _ in checkpoints(folder) if checkpoint), None)


def state_of(model_path) -> dict:
    """The state saved with a checkpoint's model file: its epoch, history and random streams."""
    path = Path(model_path)
    state = path.with_suffix(".json")
    return json.loads((state if state.is_file() else path.parent / "checkpoint.json").read_text())
