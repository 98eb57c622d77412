"""A training's checkpoints, all of them: their format in a run folder, their local writes (the
`EpochCheckpoint` callback: after every epoch, and positions inside one) and their transport to
and from the run's artifact store (slots overwritten in turn, the newest complete one resumed).

In a run folder: `checkpoint-epochNNNN.keras` (the model with its optimizer state) and its state
file `checkpoint-epochNNNN.json` (epoch, history, random streams), the commit point; a position
inside an epoch is `checkpoint-epochNNNN-batchMMMMMM.npz` (its arrays) and `.json`, naming the model
file the arrays fill. In the artifact store: `checkpoints/slot-<k>/` and `checkpoints/position-<k>/`
with the same files, the state file last.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import keras
import numpy as np

from cnnflow.components import compat
from cnnflow.components.callbacks import StopOnDivergence
from cnnflow.components.durable import sync_folder, write_durably
from cnnflow.components.errors import DataError, described
from cnnflow.flows.tracking import store
from cnnflow.flows.tracking.outbox import Outbox, Write
from cnnflow.flows.tracking.store import log_metrics

# ------------------------------------------------------------------- in a run folder

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
        sync_folder(partial)
        os.replace(partial, self.folder / self.base)
        sync_folder(self.folder)

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
        sync_folder(self.folder / f"{stem}.keras")
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


# ------------------------------------------------------------------- checkpoints in the artifact store

CHECKPOINTS = "checkpoints"  # artifact folder: slot-<k>/model.keras, then slot-<k>/state.json (the commit point)


def checkpoint_uploader(outbox: Outbox, folder: Path, every: int, slots: int, last_epoch: int):
    """What EpochCheckpoint calls with each complete local checkpoint: every `every`-th epoch (and
    the last) goes to artifact slot epoch % slots, overwritten in turn (MLflow cannot delete
    artifacts). The model goes first, then the state file with the model's sha256: a slot caught
    half-written does not verify, and the slot before it resumes."""

    def submit(model_file: Path, state: dict) -> None:
        epoch = state["epoch"]
        if epoch % every and epoch != last_epoch:
            return
        started = time.perf_counter()
        staged = _staged(folder, f"epoch{epoch:04d}", {"model.keras": model_file})
        (staged / "state.json").write_text(json.dumps({**state, "sha256": sha256_of(staged / "model.keras")}))
        staging_seconds = time.perf_counter() - started

        def send(confirm) -> None:

            slot, client = f"{CHECKPOINTS}/slot-{epoch % slots}", store.mlflow_client()
            began, cpu_began = time.perf_counter(), time.thread_time()
            client.log_artifact(outbox.run_id, str(staged / "model.keras"), slot)
            confirm()  # the state file commits the slot: never from a displaced holder
            client.log_artifact(outbox.run_id, str(staged / "state.json"), slot)
            # what a checkpoint costs: the part the epoch waits for, and this thread's wall and CPU time
            log_metrics(outbox.run_id, {"checkpoint_stage_seconds": staging_seconds,
                                        "checkpoint_upload_seconds": time.perf_counter() - began,
                                        "checkpoint_upload_cpu_seconds": time.thread_time() - cpu_began}, step=epoch)
            shutil.rmtree(staged, ignore_errors=True)

        outbox.put(Write(f"checkpoint of epoch {epoch}", send, kind="checkpoint", epoch=epoch,
                         discard=lambda: shutil.rmtree(staged, ignore_errors=True)))

    return submit


def position_uploader(outbox: Outbox, folder: Path):
    """What EpochCheckpoint calls with each complete position inside an epoch: its arrays and the model
    file they fill go to artifact slot position-0 or position-1 in turn, so one slot is always whole
    while the other is written, and the state file (with both files' sha256) commits it. The model
    file changes once an epoch: a slot that holds it already is not sent it again."""
    turns, held, digests = itertools.count(), {}, {}  # slot -> sha256 of its model file; file -> sha256

    def digest_of(path: Path) -> str:
        identity = (path.name, path.stat().st_mtime_ns, path.stat().st_size)
        if identity not in digests:
            digests[identity] = sha256_of(path)
        return digests[identity]

    def submit(arrays: Path, state: dict) -> None:
        epoch, batch = state["epoch"], state["batch"]
        model = Path(folder) / state["file"]
        staged = _staged(folder, f"epoch{epoch + 1:04d}-batch{batch:06d}", {"model.keras": model, "position.npz": arrays})
        committed = {"epoch": epoch, "batch": batch, "history": state["history"], "random": state["random"],
                     "sha256": digest_of(model), "arrays_sha256": sha256_of(staged / "position.npz")}
        (staged / "state.json").write_text(json.dumps(committed))
        slot = f"{CHECKPOINTS}/position-{next(turns) % 2}"

        def send(confirm) -> None:

            client, began, cpu_began = store.mlflow_client(), time.perf_counter(), time.thread_time()
            if held.get(slot) != committed["sha256"]:
                held.pop(slot, None)
                client.log_artifact(outbox.run_id, str(staged / "model.keras"), slot)
                held[slot] = committed["sha256"]
            client.log_artifact(outbox.run_id, str(staged / "position.npz"), slot)
            confirm()  # the state file commits the slot: never from a displaced holder
            client.log_artifact(outbox.run_id, str(staged / "state.json"), slot)
            # what it costs beside the training: one value per position, at the step of its epoch
            log_metrics(outbox.run_id, {"position_upload_seconds": time.perf_counter() - began,
                                        "position_upload_cpu_seconds": time.thread_time() - cpu_began}, step=epoch + 1)
            shutil.rmtree(staged, ignore_errors=True)

        # a newer position or epoch checkpoint makes this one moot while it waits: kind "checkpoint"
        outbox.put(Write(f"position at step {batch} of epoch {epoch + 1}", send, kind="checkpoint", epoch=epoch,
                         discard=lambda: shutil.rmtree(staged, ignore_errors=True)))

    return submit


def _staged(folder: Path, name: str, files: dict[str, Path]) -> Path:
    """A folder of links to `files` (under their artifact names) that an upload sends from: the local
    checkpoint may be pruned or replaced before the upload."""
    staged = Path(folder) / ".upload" / name
    staged.mkdir(parents=True, exist_ok=True)
    for artifact, source in files.items():
        # a crash can leave it staged: a link to a file a resumed training rewrites in place
        (staged / artifact).unlink(missing_ok=True)
        try:
            os.link(source, staged / artifact)
        except OSError:
            shutil.copyfile(source, staged / artifact)
    return staged


def sha256_of(path: Path) -> str:
    from cnnflow.components.data.fingerprint import file_hash

    return file_hash(path).hexdigest()


def _stored_states(run_id: str) -> list[tuple[dict, str]]:
    """The state files of the run's artifact slots that read, newest (epoch, step) first, with their
    slot: an epoch's checkpoint has step 0, a position inside the next epoch its steps done."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        slots = [entry.path for entry in store.mlflow_client().list_artifacts(run_id, CHECKPOINTS) if entry.is_dir]
    except (MlflowException, OSError):
        return []
    states = []
    for slot in slots:
        try:
            state = mlflow.artifacts.load_dict(f"runs:/{run_id}/{slot}/state.json")
            states.append(({"epoch": int(state["epoch"]), "batch": int(state.get("batch", 0)),
                            "history": dict(state["history"]), "sha256": state["sha256"],
                            "arrays_sha256": state.get("arrays_sha256"), "random": state.get("random")}, slot))
        except (MlflowException, OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(states, key=lambda found: _place(found[0]), reverse=True)


def _place(checkpoint: dict) -> tuple[int, int]:
    """How far a checkpoint is: (completed epochs, steps of the next)."""
    return checkpoint["epoch"], checkpoint.get("batch", 0)


def _fetched(run_id: str, state: dict, slot: str, folder: Path) -> dict | None:
    """The slot's checkpoint, downloaded into `folder` under the local names (so the local code reads
    it as its own), or None when a file does not match its state file. A position's model file is
    the one its arrays fill."""
    import mlflow

    epoch, batch = _place(state)
    stem = f"checkpoint-epoch{epoch + 1:04d}-batch{batch:06d}" if batch else f"checkpoint-epoch{epoch:04d}"
    local = {"model.keras": (f"checkpoint-epoch{epoch:04d}-base.keras" if batch else f"{stem}.keras", state["sha256"])}
    if batch:
        local["position.npz"] = (f"{stem}.npz", state["arrays_sha256"])
    download = folder / ".download"
    shutil.rmtree(download, ignore_errors=True)
    try:
        fetched = {artifact: Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{slot}/{artifact}",
                                                                      dst_path=str(download))) for artifact in local}
        if any(sha256_of(fetched[artifact]) != digest for artifact, (_, digest) in local.items()):
            return None
        for artifact, (name, _) in local.items():
            os.replace(fetched[artifact], folder / name)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    model = local["model.keras"][0]
    kept = {"epoch": epoch, "file": model, "history": state["history"], "random": state["random"]}
    if batch:
        kept.update(batch=batch, arrays=f"{stem}.npz")
    write_durably(folder / f"{stem}.json", json.dumps(kept))
    checkpoint = {"epoch": epoch, "history": state["history"], "path": str(folder / (kept.get("arrays") or model))}
    return {**checkpoint, "batch": batch} if batch else checkpoint


def newest_checkpoint(run_id: str, folder: Path, logger) -> tuple[dict | None, list[str]]:
    """The newest usable checkpoint of a run: this machine's, or a newer one from the artifact store
    (downloaded into `folder`); and why newer ones are unusable (said in `logger` when one is used)."""
    skipped, here = [], None
    for checkpoint, why in checkpoints(folder) if folder.is_dir() else []:
        if checkpoint:
            here = checkpoint, why
            break
        skipped.append(why)
    for state, slot in _stored_states(run_id):
        if here and _place(state) <= _place(here[0]):
            break
        inside = f" at step {state['batch']}" if state["batch"] else ""
        stored = f"the checkpoint of epoch {state['epoch'] + bool(inside)}{inside} in the artifact store"
        checkpoint = _fetched(run_id, state, slot, folder)
        if checkpoint:
            here = checkpoint, stored
            break
        skipped.append(f"{stored} is incomplete (its upload was cut off)")
    if here:
        for note in skipped:
            logger.warning(f"run {run_id}: {note}; resuming from {here[1]} instead")
    return (here[0] if here else None), skipped


def tidy_finished(run_id: str, folder: Path, epochs_done: int, keep: int, logger) -> int:
    """What a finished training no longer needs, removed; returns the bytes freed. Positions inside
    epochs go (here and in the artifact store: only a stopped training resumes from one), and so do
    the untrained model and all but the newest `keep` epoch checkpoints (the newest is what `continue`
    needs). This machine's copy of a kept checkpoint goes too when the artifact store is a folder on
    this machine that holds it whole: the same file twice. Nothing goes before the store holds the
    last epoch's checkpoint."""
    stored = _stored_states(run_id)
    epoch_slots = [slot for state, slot in stored if not state["batch"]]
    if not epoch_slots or stored[0][0]["epoch"] != epochs_done:
        logger.warning(f"run {run_id}: the artifact store does not hold the checkpoint of epoch {epochs_done} yet; "
                       f"its checkpoints are kept as they are")
        return 0
    freed = 0
    gone = [slot for state, slot in stored if state["batch"]] + epoch_slots[keep:]
    artifact_uri = store.mlflow_client().get_run(run_id).info.artifact_uri
    repository = compat.artifact_repository(artifact_uri)
    for slot in gone:
        try:
            freed += sum(entry.file_size or 0 for entry in repository.list_artifacts(slot))
            repository.delete_artifacts(slot)
        except Exception as error:  # a store that cannot delete (NotImplementedError, a refusal) keeps them
            logger.warning(f"run {run_id}: could not delete {slot} from the artifact store ({described(error)}); kept")
            break
    held_here = artifact_uri.startswith(("file:", "/")) and bool(keep)
    epochs = sorted(folder.glob("checkpoint-epoch[0-9][0-9][0-9][0-9].keras"))
    local = epochs if held_here or not keep else epochs[:-keep]
    doomed = [file for model in local for file in (model, model.with_suffix(".json"))]
    doomed += list(folder.glob("checkpoint-epoch*-batch*")) + list(folder.glob("checkpoint-epoch*-base.keras"))
    doomed += [folder / "untrained.keras"] + [file for file in (folder / ".upload").rglob("*") if file.is_file()]
    for file in doomed:
        if file.is_file():
            freed += file.stat().st_size
            file.unlink()
    shutil.rmtree(folder / ".upload", ignore_errors=True)
    from cnnflow.components.data.caching import readable_size

    logger.info(f"finished: {readable_size(freed)} of checkpoints no longer needed removed (train.keep_checkpoints="
                f"{keep}: the newest epoch's is kept{' in the artifact store' if held_here else ''} for continue)")
    return freed
