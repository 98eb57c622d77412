"""A training run's life cycle: started or resumed, held by one trainer, ended with a status.

Which unfinished run a command resumes, what a continuation may change, and its stage numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cnnflow.components.errors import RunError
from cnnflow.flows.config import flatten
from cnnflow.flows.store import code_version, experiment_id, set_tags


# What a continuation may not change: it would no longer be the same training.
FROZEN_SETTINGS = ("data.", "model.", "loss.", "seed", "optimizer.name", "runtime.precision")


def config_hash(cfg: dict[str, Any]) -> str:
    """Identity of a training's settings (tags and the spelling of overrides aside)."""
    identity = {key: value for key, value in cfg.items() if key not in ("tags", "overrides", "resume")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _lock(folder: Path):
    """Held while a process trains in `folder`; the OS releases it if the process dies."""
    handle = open(folder / "run.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another process is training run {folder.name} (in {folder}); wait for it to end, "
                       f"or stop it first") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _locked_elsewhere(folder: Path) -> bool:
    try:
        with _lock(folder):
            return False
    except RunError:
        return True


def find_unfinished(cfg: dict[str, Any], logger) -> tuple[str | None, dict | None]:
    """The newest run of the same settings that stopped before finishing, and its newest usable
    checkpoint; (None, None) to start afresh. What it skips and why goes to `logger`: a damaged
    newest checkpoint (the one before it is used), a run without any usable one. A run of the same
    settings that another process is training is refused (RunError naming resume=false), never
    touched."""
    import mlflow

    from cnnflow.components.callbacks import checkpoints

    found = mlflow.get_experiment_by_name(cfg.get("mlflow_experiment") or cfg["experiment"])
    if not found:
        return None, None
    runs = mlflow.search_runs([found.experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.config_hash = '{config_hash(cfg)}' and attributes.status != 'FINISHED'")
    for run in runs:
        run_id, folder = run.info.run_id, Path(run.data.tags.get("output_dir", "/nonexistent"))
        if not folder.is_dir():
            continue
        if _locked_elsewhere(folder):
            raise RunError(f"run {run_id} has these settings and another process is training it; wait for it to end "
                           f"(this command then resumes or finds it done), or add resume=false to start a separate run")
        skipped = []
        for checkpoint, why in checkpoints(folder):
            if checkpoint:
                for note in skipped:
                    logger.warning(f"run {run_id}: {note}; resuming from {why} instead")
                return run_id, checkpoint
            skipped.append(why)
        if skipped:
            logger.warning(f"run {run_id} has no usable checkpoint ({'; '.join(skipped)}); starting a new run")
    return None, None



@contextlib.contextmanager
def tracked_run(cfg: dict[str, Any], run_id: str | None = None):
    """Start (or resume) an MLflow run and its output folder; yields (run_id, output folder).

    An existing run's lock is taken before its status is touched, so a run that another process
    trains is refused and left as it is. The run ends FINISHED, FAILED on an error, or KILLED on
    Ctrl-C or SIGTERM; the folder (and its checkpoints) stays either way.
    """
    import mlflow

    under_prefect = "prefect" in sys.modules  # in process (flows/engine.py), Prefect is not even imported
    if under_prefect:
        from prefect.exceptions import TerminationSignal
        from prefect.runtime import flow_run
    stops = (KeyboardInterrupt, TerminationSignal) if under_prefect else (KeyboardInterrupt,)
    with contextlib.ExitStack() as held:
        if run_id:
            output_dir = Path(mlflow.MlflowClient().get_run(run_id).data.tags["output_dir"])
            output_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(_lock(output_dir))
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id(cfg))
        status = "FAILED"
        try:
            if not run_id:
                run_id = run.info.run_id
                output_dir = (Path(cfg["output_dir"]) / cfg["experiment"] / run_id).resolve()
                set_tags(run_id, {"cnnflow.experiment": cfg["experiment"], "seed": cfg["seed"],
                                  "output_dir": output_dir, "code_version": code_version(),
                                  "config_hash": config_hash(cfg), **cfg.get("tags", {})})
                output_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(_lock(output_dir))
            if under_prefect and flow_run.id:  # the two UIs point at each other's record
                set_tags(run_id, {"prefect.flow_run_id": flow_run.id})
            yield run_id, output_dir
            status = "FINISHED"
        except stops:
            status = "KILLED"
            raise
        finally:
            _end_run(status)


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


