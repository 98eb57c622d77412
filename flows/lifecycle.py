"""A training run's life cycle: started or resumed, held by one trainer, ended with a status.

A run's state lives in MLflow, not on one disk: every epoch's checkpoint (the model with its
optimizer state, and the history) goes to the run's artifacts beside its settings, features and
split, so any machine that reaches the store can resume, continue, evaluate or predict; a local
folder is only a cache. One trainer per run is ensured by a lease recorded in the run itself.
Also here: which unfinished run a command resumes, what a continuation may change, its stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cnnflow.components.errors import RunError
from cnnflow.flows.config import flatten
from cnnflow.flows.store import code_version, experiment_id, log_metrics, run_folder, set_tags

# What a continuation may not change: it would no longer be the same training.
FROZEN_SETTINGS = ("data.", "model.", "loss.", "seed", "optimizer.name", "runtime.precision")


def config_hash(cfg: dict[str, Any]) -> str:
    """Identity of a training's settings (tags and the spelling of overrides aside)."""
    identity = {key: value for key, value in cfg.items() if key not in ("tags", "overrides", "resume")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- the lease

class Lease:
    """One trainer per run, across machines that share only the MLflow store.

    MLflow makes one write atomic: a run's param is set once, and setting it again to another value
    fails (tags are last-writer-wins). So holding generation n of a run's lease is having written
    param `lease.n` = "host pid start-time token". A holder is gone when it released the lease (tag
    `lease.released`), when it ran on this host and its process is dead (taken over at once: `kill -9`
    then the same command resumes), or, elsewhere, when its heartbeat (tag `lease.heartbeat`, every
    timeout/4) is older than `timeout` seconds. Of two processes taking over together, only the one
    whose `lease.n+1` write lands wins; a holder that finds a newer generation stops its training.
    (Clocks of the machines must agree to well within the timeout.)
    """

    def __init__(self, run_id: str, timeout: float):
        import psutil

        self.run_id, self.timeout = run_id, timeout
        self.me = f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.2f} {uuid.uuid4().hex[:8]}"
        self.generation = 0
        self.lost = threading.Event()
        self._stopped = threading.Event()

    def holder(self) -> str | None:
        """Who trains the run now, as people read it, or None when nobody does."""
        generation, holder, tags = self._newest()
        return self._live(generation, holder, tags) if holder else None

    def acquire(self) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        generation, holder, tags = self._newest()
        live = holder and self._live(generation, holder, tags)
        if live:
            raise RunError(f"{live} is training run {self.run_id}; wait for it to end, or stop it first")
        try:
            MlflowClient().log_param(self.run_id, f"lease.{generation + 1}", self.me)
        except MlflowException:  # another process wrote this generation first
            raise RunError(f"another process took over run {self.run_id} at this moment; it trains it now") from None
        self.generation = generation + 1
        self._beat()
        threading.Thread(target=self._heartbeats, name=f"lease {self.run_id[:8]}", daemon=True).start()

    def release(self) -> None:
        """Never raises: a store that cannot take it (a full disk) must not hide why the training
        stopped, and a holder whose process ends counts as gone anyway."""
        import logging

        self._stopped.set()
        if self.generation and not self.lost.is_set():
            try:
                set_tags(self.run_id, {"lease.released": self.generation})
            except Exception as error:
                logging.getLogger(__name__).warning(f"could not release the lease of run {self.run_id} "
                                                    f"({str(error).splitlines()[0][:150]}); it lapses when this process ends")

    def _newest(self) -> tuple[int, str | None, dict[str, str]]:
        from mlflow import MlflowClient

        data = MlflowClient().get_run(self.run_id).data
        generations = [int(key.split(".", 1)[1]) for key in data.params if key.startswith("lease.")]
        newest = max(generations, default=0)
        return newest, data.params.get(f"lease.{newest}"), data.tags

    def _live(self, generation: int, holder: str, tags: dict[str, str]) -> str | None:
        import psutil

        if tags.get("lease.released") == str(generation):
            return None
        host, pid, started, _ = (holder.split() + ["", "", "0", ""])[:4]
        if host == socket.gethostname():
            try:
                alive = abs(psutil.Process(int(pid)).create_time() - float(started)) < 1  # not a reused pid
            except (psutil.NoSuchProcess, ValueError):
                alive = False
            return f"process {pid} on this machine" if alive else None
        beat_generation, _, beat_time = tags.get("lease.heartbeat", "").partition(" ")
        age = time.time() - float(beat_time or 0)
        if beat_generation == str(generation) and age < self.timeout:
            return f"process {pid} on {host} (its last heartbeat {age:.0f} s ago)"
        return None

    def _beat(self) -> None:
        set_tags(self.run_id, {"lease.heartbeat": f"{self.generation} {time.time():.0f}"})

    def _heartbeats(self) -> None:
        import logging

        while not self._stopped.wait(self.timeout / 4):
            try:
                if self._newest()[0] != self.generation:
                    self.lost.set()
                    return
                self._beat()
            except Exception as error:  # a store that blips: the next beat may pass, within the timeout
                logging.getLogger(__name__).warning(f"lease heartbeat of run {self.run_id} failed: {error}")


_held: dict[str, Lease] = {}


def check_lease(run_id: str) -> None:
    """Stops a training whose lease another process took over (this one was thought gone)."""
    lease = _held.get(run_id)
    if lease and lease.lost.is_set():
        raise RunError(f"run {run_id} was taken over by another process (no heartbeat from this one for "
                       f"{lease.timeout:g} s: train.lease_timeout); this one stops")


# ------------------------------------------------------------------- checkpoints in the artifact store

CHECKPOINTS = "checkpoints"  # artifact folder: slot-<k>/model.keras, then slot-<k>/state.json (the commit point)


class CheckpointUploads:
    """Copies a training's checkpoints to its artifact store in a background thread, so the epoch does
    not wait for the upload. Every `every`-th epoch (and the last) is written to slot epoch % slots:
    MLflow cannot delete artifacts, so slots are overwritten in turn. The model goes first, then the
    state file with the model's sha256: a slot caught half-written (the process killed during its
    upload) does not verify, and the slot before it resumes. Only the newest pending checkpoint is
    uploaded; `close` waits for it."""

    def __init__(self, run_id: str, folder: Path, every: int, slots: int, last_epoch: int):
        self.run_id, self.folder, self.every, self.slots, self.last_epoch = run_id, Path(folder), every, slots, last_epoch
        self.failure: str | None = None
        self._pending: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._upload_all, name=f"checkpoint uploads {run_id[:8]}", daemon=True)
        self._thread.start()

    def submit(self, epoch: int, model_file: Path, history: dict[str, list[float]]) -> None:
        """Called when the local checkpoint of `epoch` is complete."""
        if epoch % self.every and epoch != self.last_epoch:
            return
        started = time.perf_counter()
        staged = self.folder / ".upload" / f"epoch{epoch:04d}"
        staged.mkdir(parents=True, exist_ok=True)
        try:
            os.link(model_file, staged / "model.keras")  # the local checkpoint may be pruned before the upload
        except OSError:
            shutil.copyfile(model_file, staged / "model.keras")
        state = {"epoch": epoch, "history": history, "sha256": _sha256(staged / "model.keras")}
        (staged / "state.json").write_text(json.dumps(state))
        self._pending.put((staged, time.perf_counter() - started))

    def close(self) -> None:
        import logging

        self._pending.put(None)
        self._thread.join()
        if self.failure:
            logging.getLogger(__name__).warning(f"run {self.run_id}: the newest checkpoint is only in {self.folder}, not in "
                                                f"the artifact store ({self.failure})")

    def _upload_all(self) -> None:
        from mlflow import MlflowClient

        closing = False
        while not closing:
            waiting = [self._pending.get()]
            while not self._pending.empty():
                waiting.append(self._pending.get())
            closing = None in waiting
            *moot, newest = [item for item in waiting if item is not None] or [None]
            for older, _ in moot:  # a newer checkpoint waits: the older ones are moot
                shutil.rmtree(older, ignore_errors=True)
            if newest is None:
                continue
            staged, staging_seconds = newest
            epoch = json.loads((staged / "state.json").read_text())["epoch"]
            slot = f"{CHECKPOINTS}/slot-{epoch % self.slots}"
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                client = MlflowClient()
                client.log_artifact(self.run_id, str(staged / "model.keras"), slot)
                client.log_artifact(self.run_id, str(staged / "state.json"), slot)
                # what a checkpoint costs: the part the epoch waits for, and this thread's wall and CPU time
                log_metrics(self.run_id, {"checkpoint_stage_seconds": staging_seconds,
                                          "checkpoint_upload_seconds": time.perf_counter() - started,
                                          "checkpoint_upload_cpu_seconds": time.thread_time() - cpu_started}, step=epoch)
                self.failure = None
            except Exception as error:
                self.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"
            finally:
                shutil.rmtree(staged, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored_states(run_id: str) -> list[tuple[dict, str]]:
    """The state files of the run's artifact slots that read, newest epoch first, with their slot."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        slots = [entry.path for entry in mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINTS) if entry.is_dir]
    except (MlflowException, OSError):
        return []
    states = []
    for slot in slots:
        try:
            state = mlflow.artifacts.load_dict(f"runs:/{run_id}/{slot}/state.json")
            states.append(({"epoch": int(state["epoch"]), "history": dict(state["history"]), "sha256": state["sha256"]}, slot))
        except (MlflowException, OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(states, key=lambda found: found[0]["epoch"], reverse=True)


def _fetched(run_id: str, state: dict, slot: str, folder: Path) -> dict | None:
    """The slot's checkpoint, downloaded into `folder` under the local names (so the local code reads
    it as its own), or None when its model does not match its state file."""
    import mlflow

    from cnnflow.components.callbacks import write_durably

    stem = f"checkpoint-epoch{state['epoch']:04d}"
    download = folder / ".download"
    shutil.rmtree(download, ignore_errors=True)
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{slot}/model.keras",
                                                           dst_path=str(download)))
        if _sha256(fetched) != state["sha256"]:
            return None
        os.replace(fetched, folder / f"{stem}.keras")
    finally:
        shutil.rmtree(download, ignore_errors=True)
    write_durably(folder / f"{stem}.json", json.dumps({"epoch": state["epoch"], "file": f"{stem}.keras",
                                                       "history": state["history"]}))
    return {"epoch": state["epoch"], "history": state["history"], "path": str(folder / f"{stem}.keras")}


def newest_checkpoint(run_id: str, folder: Path, logger) -> tuple[dict | None, list[str]]:
    """The newest usable checkpoint of a run: this machine's, or a newer one from the artifact store
    (downloaded into `folder`); and why newer ones are unusable (said in `logger` when one is used)."""
    from cnnflow.components.callbacks import checkpoints

    skipped, here = [], None
    for checkpoint, why in checkpoints(folder) if folder.is_dir() else []:
        if checkpoint:
            here = checkpoint, why
            break
        skipped.append(why)
    for state, slot in _stored_states(run_id):
        if here and state["epoch"] <= here[0]["epoch"]:
            break
        stored = f"the checkpoint of epoch {state['epoch']} in the artifact store"
        checkpoint = _fetched(run_id, state, slot, folder)
        if checkpoint:
            here = checkpoint, stored
            break
        skipped.append(f"{stored} is incomplete (its upload was cut off)")
    if here:
        for note in skipped:
            logger.warning(f"run {run_id}: {note}; resuming from {here[1]} instead")
    return (here[0] if here else None), skipped


# ---------------------------------------------------------------------------------- resume, run

def find_unfinished(cfg: dict[str, Any], logger) -> tuple[str | None, dict | None]:
    """The newest run of the same settings that stopped before finishing, and its newest usable
    checkpoint; (None, None) to start afresh. What it skips and why goes to `logger`: a damaged
    newest checkpoint (the one before it is used), a run without any usable one. A run of the same
    settings that another process is training is refused (RunError naming resume=false), never
    touched."""
    import mlflow

    found = mlflow.get_experiment_by_name(cfg.get("mlflow_experiment") or cfg["experiment"])
    if not found:
        return None, None
    runs = mlflow.search_runs([found.experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.config_hash = '{config_hash(cfg)}' and attributes.status != 'FINISHED'")
    for run in runs:
        run_id = run.info.run_id
        holder = Lease(run_id, cfg["train"]["lease_timeout"]).holder()
        if holder:
            raise RunError(f"run {run_id} has these settings and {holder} is training it; wait for it to end (this "
                           f"command then resumes or finds it done), or add resume=false to start a separate run")
        checkpoint, skipped = newest_checkpoint(run_id, run_folder(run_id, cfg), logger)
        if checkpoint:
            return run_id, checkpoint
        if skipped:
            logger.warning(f"run {run_id} has no usable checkpoint ({'; '.join(skipped)}); starting a new run")
    return None, None


def run_name(cfg: dict[str, Any]) -> str:
    """What ran, as the MLflow UI lists it: recipe, training images, seed (`celeba-16000-s1`)."""
    return f"{cfg['experiment']}-{cfg['data'].get('train_size') or 'all'}-s{cfg['seed']}"


@contextlib.contextmanager
def tracked_run(cfg: dict[str, Any], run_id: str | None = None):
    """Start (or resume) an MLflow run and this machine's folder of it; yields (run_id, folder).

    An existing run's lease is taken before its status is touched, so a run that another process
    trains is refused and left as it is. The run ends FINISHED, FAILED on an error, or KILLED on
    Ctrl-C or SIGTERM; its checkpoints stay either way.
    """
    import mlflow

    under_prefect = "prefect" in sys.modules  # in process (flows/engine.py), Prefect is not even imported
    if under_prefect:
        from prefect.exceptions import TerminationSignal
        from prefect.runtime import flow_run
    stops = (KeyboardInterrupt, TerminationSignal) if under_prefect else (KeyboardInterrupt,)
    lease = None
    with contextlib.ExitStack() as held:
        if run_id:
            lease = _leased(run_id, cfg, held)
            output_dir = run_folder(run_id, cfg)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id(cfg),
                               run_name=None if run_id else run_name(cfg))
        status = "FAILED"
        try:
            if not run_id:
                run_id = run.info.run_id
                output_dir = (Path(cfg["output_dir"]) / cfg["experiment"] / run_id).resolve()
                set_tags(run_id, {"cnnflow.experiment": cfg["experiment"], "seed": cfg["seed"],
                                  "output_dir": output_dir, "host": socket.gethostname(), "code_version": code_version(),
                                  "config_hash": config_hash(cfg), **cfg.get("tags", {})})
                output_dir.mkdir(parents=True, exist_ok=True)
                lease = _leased(run_id, cfg, held)
            else:  # the command that resumes it is the run's now (a sweep finds its jobs by these tags)
                set_tags(run_id, cfg.get("tags", {}))
            if under_prefect and flow_run.id:  # the two UIs point at each other's record
                set_tags(run_id, {"prefect.flow_run_id": flow_run.id})
            yield run_id, output_dir
            status = "FINISHED"
        except stops:
            status = "KILLED"
            raise
        finally:
            if lease and lease.lost.is_set():
                _leave_run()  # the run's status is its new holder's now
            else:
                _end_run(status)


def _leased(run_id: str, cfg: dict[str, Any], held: contextlib.ExitStack) -> Lease:
    lease = Lease(run_id, cfg["train"]["lease_timeout"])
    lease.acquire()
    _held[run_id] = lease
    held.callback(_held.pop, run_id, None)
    held.callback(lease.release)
    return lease


def _leave_run() -> None:
    """Stop being in the active run without ending it (MLflow's end_run always sets a status)."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    MLFLOW_RUN_ID.unset()
    fluent._active_run_stack.get().pop()


def _end_run(status: str) -> None:
    """End the active run; when the run already failed, a store that cannot take the status (a full
    disk) must not hide why it failed."""
    import logging

    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as error:
        if status == "FINISHED":
            raise
        text = str(error)
        reason = "database or disk is full" if "database or disk is full" in text else text.splitlines()[0][:200]
        logging.getLogger(__name__).warning(f"could not mark the run {status}: {reason}")



def refuse_frozen_changes(before: dict[str, Any], after: dict[str, Any]) -> None:
    old, new = flatten(before), flatten(after)
    changed = sorted(key for key in set(old) | set(new)
                     if key.startswith(FROZEN_SETTINGS) and old.get(key) != new.get(key)
                     and (key in old or not key.startswith("runtime.")))  # runs from before runtime.* existed
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise RunError(f"a continuation trains the same model on the same data; it cannot change {details}. "
                            f"Start a new training for that (cnnflow train ...)")


def next_stage(run_id: str) -> int:
    from mlflow import MlflowClient

    return int(MlflowClient().get_run(run_id).data.tags.get("stages", "1")) + 1


