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
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from cnnflow.components import compat
from cnnflow.components.errors import RunError, ServerOutage, described
from cnnflow.flows.setup import runtime
from cnnflow.flows.setup.settings import flatten
from cnnflow.flows.tracking import names, store
from cnnflow.flows.tracking.outbox import Outbox
from cnnflow.flows.tracking.store import (
    LOCKS_EXPERIMENT,
    code_version,
    experiment_id,
    new_run_folder,
    run_folder,
    set_tags,
    store_lock,
)

# What a continuation may not change: it would no longer be the same training.
FROZEN_SETTINGS = ("data.", "model.", "loss.", "seed", "optimizer.name", "runtime.precision")


def config_hash(cfg: dict[str, Any]) -> str:
    """Identity of a training's settings (tags, the spelling of overrides and how jobs run aside)."""
    identity = {key: value for key, value in cfg.items() if key not in ("tags", "overrides", "resume", "jobs")}
    # a search's trial is its own training, even where another trial drew the same values
    trial = {key: value for key, value in cfg.get("tags", {}).items() if key in (names.SEARCH, names.SEARCH_TRIAL)}
    if trial:
        identity[names.SEARCH_TRIAL] = trial
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- the lease

class HeldElsewhere(RunError):
    """The run's lease has a live holder: `holder` says who, as people read it."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder


class Lease:
    """One trainer per run, across machines that share only the MLflow store.

    MLflow makes one write atomic: a run's param is set once, and setting it again to another value
    fails (tags are last-writer-wins). So holding generation n of a run's lease is having written
    param `lease.n` = "host pid start-time token". A holder is gone when it released the lease (tag
    `lease.released`), when it ran on this host and its process is dead (taken over at once: `kill -9`
    then the same command resumes), or, elsewhere, when its heartbeat (tag `lease.heartbeat.n`, every
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
        self._heartbeat: threading.Thread | None = None

    def holder(self) -> str | None:
        """Who trains the run now, as people read it, or None when nobody does."""
        generation, holder, tags = self._newest()
        return self._live(generation, holder, tags) if holder else None

    def abandoned_by(self) -> str | None:
        """The newest holder ("host pid ...") when it is gone without releasing the lease (kill -9, a
        crash); None when the lease is held, released or was never taken."""
        generation, holder, tags = self._newest()
        if not holder or tags.get(names.LEASE_RELEASED) == str(generation) or self._live(generation, holder, tags):
            return None
        return holder

    def acquire(self, heartbeats: bool = True) -> None:
        """Take the lease, or raise RunError naming its live holder. `heartbeats`: beat from a thread
        of the lease's own (a training's outbox beats instead, in order with its writes)."""
        from mlflow.exceptions import MlflowException

        generation, holder, tags = self._newest()
        live = holder and self._live(generation, holder, tags)
        if live:
            raise HeldElsewhere(f"{live} is training run {self.run_id}; wait for it to end, or stop it first", live)
        try:
            store.mlflow_client().log_param(self.run_id, names.lease_holder(generation + 1), self.me)
        except MlflowException:  # another process wrote this generation first
            raise RunError(f"another process took over run {self.run_id} at this moment; it trains it now") from None
        self.generation = generation + 1
        self.beat()
        if heartbeats:
            self._heartbeat = threading.Thread(target=self._heartbeats, name=f"lease {self.run_id[:8]}", daemon=True)
            self._heartbeat.start()

    def confirm(self) -> bool:
        """Whether this process still holds the lease (one read of the store; raises when the store
        does not answer). A newer generation means another process took over: `lost` is set."""
        if self._newest()[0] != self.generation:
            self.lost.set()
        return not self.lost.is_set()

    def beat(self) -> None:
        # a tag of this generation's own: a beat of a holder displaced while it was on the wire
        # cannot overwrite the new holder's
        set_tags(self.run_id, {names.lease_heartbeat(self.generation): f"{time.time():.0f}"})

    def release(self, outage: bool = False) -> None:
        """Never raises: a store that cannot take it (a full disk) must not hide why the training
        stopped, and a holder whose process ends counts as gone anyway. In an `outage` nothing is
        tried: the lease lapses."""
        import logging

        self._stopped.set()
        if self._heartbeat:
            # in an outage a beat can sit in MLflow's retries for minutes: not waited for (a daemon
            # thread), so a command that ends on an outage ends at once
            self._heartbeat.join(timeout=0 if outage else None)
        if self.generation and not self.lost.is_set() and not outage:
            try:
                set_tags(self.run_id, {names.LEASE_RELEASED: self.generation})
            except Exception as error:
                logging.getLogger(__name__).warning(f"could not release the lease of run {self.run_id} "
                                                    f"({described(error)}); it lapses when this process ends")

    def _newest(self) -> tuple[int, str | None, dict[str, str]]:

        data = store.mlflow_client().get_run(self.run_id).data
        generations = [int(key.removeprefix(names.LEASE)) for key in data.params if key.startswith(names.LEASE)]
        newest = max(generations, default=0)
        return newest, data.params.get(names.lease_holder(newest)), data.tags

    def _live(self, generation: int, holder: str, tags: dict[str, str]) -> str | None:
        import psutil

        if tags.get(names.LEASE_RELEASED) == str(generation):
            return None
        host, pid, started, _ = (holder.split() + ["", "", "0", ""])[:4]
        if host == socket.gethostname():
            try:
                alive = abs(psutil.Process(int(pid)).create_time() - float(started)) < 1  # not a reused pid
            except (psutil.NoSuchProcess, ValueError):
                alive = False
            return f"process {pid} on this machine" if alive else None
        beat_time = tags.get(names.lease_heartbeat(generation))
        if beat_time is None:  # cnnflow before 0.2: one tag "generation time"
            beat_generation, _, beat_time = tags.get(names.LEASE_HEARTBEAT_BEFORE_0_2, "").partition(" ")
            beat_time = beat_time if beat_generation == str(generation) else None
        age = time.time() - float(beat_time or 0)
        if age < self.timeout:
            return f"process {pid} on {host} (its last heartbeat {age:.0f} s ago)"
        return None

    def _heartbeats(self) -> None:
        failing = False
        while not self._stopped.wait(self.timeout / 4):
            try:
                if not self.confirm():
                    return
                self.beat()
                failing = False
            except Exception as error:  # a store that blips: the next beat may pass, within the timeout
                if not failing:  # once per streak: an outage fails every beat
                    logging.getLogger(__name__).warning(f"run {self.run_id}: a lease heartbeat failed ({described(error)}); "
                                                        f"trying again every {self.timeout / 4:g} s")
                failing = True


_held: dict[str, Outbox] = {}


def writer(run_id: str) -> Outbox:
    """The one writer into a run this process holds (flows/tracking/outbox.py)."""
    return _held[run_id]


_LOCK_STALE_SECONDS = 120.0  # a lock whose holder on another machine has not beaten for this long is free


@contextlib.contextmanager
def store_wide_lock(purpose: str, wait: float = 120.0):
    """Held by one thread of one process at a time, among all that share the MLflow store; waits up
    to `wait` seconds for it."""
    lease = Lease(_lock_run(purpose), timeout=_LOCK_STALE_SECONDS)
    deadline = time.monotonic() + wait
    while True:
        try:
            lease.acquire()
            break
        except RunError as busy:
            if time.monotonic() > deadline:
                raise RunError(f"{purpose}: waited {wait:g} s for another process ({busy})") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        lease.release()


def _lock_run(purpose: str) -> str:
    """The run whose lease is the lock: the oldest of those tagged with `purpose` (processes that
    make one at the same moment all settle on the oldest)."""

    client = store.mlflow_client()
    experiment = experiment_id({"experiment": LOCKS_EXPERIMENT})
    query = dict(experiment_ids=[experiment], filter_string=f"tags.`{names.LOCK}` = '{purpose}'",
                 order_by=["attributes.start_time ASC", "attributes.run_id ASC"], max_results=1)
    found = client.search_runs(**query)
    if not found:
        # one creator per machine (threads and processes alike); machines that create one at the
        # same moment settle on the oldest
        with store_lock("create"):
            found = client.search_runs(**query)
            if not found:
                client.create_run(experiment, run_name=purpose, tags={names.LOCK: purpose})
                found = client.search_runs(**query)
    lock = found[0].info
    if lock.status == "RUNNING":  # bookkeeping, not a training: the MLflow UI must not list it as one running
        client.set_terminated(lock.run_id, "FINISHED")
    return lock.run_id


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
                              filter_string=f"tags.{names.CONFIG_HASH} = '{config_hash(cfg)}' and attributes.status != 'FINISHED'")
    for run in runs:
        run_id = run.info.run_id
        holder = Lease(run_id, cfg["train"]["lease_timeout"]).holder()
        if holder:
            raise HeldElsewhere(f"run {run_id} has these settings and {holder} is training it; wait for it to end (this "
                                f"command then resumes or finds it done), or add resume=false to start a separate run", holder)
        from cnnflow.flows.tracking.checkpoints import newest_checkpoint  # and Keras: only for a run to resume

        checkpoint, skipped = newest_checkpoint(run_id, run_folder(run_id, cfg), logger)
        if checkpoint:
            return run_id, checkpoint
        if skipped:
            logger.warning(f"run {run_id} has no usable checkpoint ({'; '.join(skipped)}); starting a new run")
            close_abandoned(run, f"no usable checkpoint ({'; '.join(skipped)[:300]}): a new run trains these settings")
        elif run.info.status in ("RUNNING", "KILLED"):  # stopped before its first checkpoint: nothing to lose
            logger.info(f"run {run_id} stopped before its first checkpoint; training it from the start, in the same run")
            return run_id, None
    return None, None


def close_abandoned(run, why: str) -> bool:
    """Mark a RUNNING run whose process is gone (kill -9, a crash, a power cut: nothing could end it)
    KILLED, with the tag `cnnflow.closed` saying `why`; whether it did. A KILLED run resumes as a
    RUNNING one does: only the MLflow UI's status changes, from a lie to the truth."""

    if run.info.status != "RUNNING":
        return False
    set_tags(run.info.run_id, {names.CLOSED: f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {why}"[:4000]})
    store.mlflow_client().set_terminated(run.info.run_id, "KILLED")
    return True


def closed_if_abandoned(run, timeout: float = 120.0) -> bool:
    """`close_abandoned` for a RUNNING run whose lease has no live holder (a run without a lease, from
    before leases, is left as it is: nothing says whether its process lives)."""
    if run.info.status != "RUNNING" or not any(key.startswith(names.LEASE) for key in run.data.params):
        return False
    holder = Lease(run.info.run_id, float(run.data.params.get("train.lease_timeout", timeout))).abandoned_by()
    if not holder:
        return False
    host, pid = (holder.split() + ["?", "?"])[:2]
    return close_abandoned(run, f"process {pid} on {host} ended without ending this run (kill -9, a crash or a "
                                f"power cut); the same command resumes it")


def _status(run_id: str) -> str:

    return store.mlflow_client().get_run(run_id).info.status


def run_name(cfg: dict[str, Any]) -> str:
    """What ran, as the MLflow UI lists it: recipe, training images, seed (`celeba-16000-s1`); a
    search's trial by its study and number (`quickstart-1a2b3c4d-trial-3`)."""
    tags = cfg.get("tags", {})
    if names.SEARCH in tags and names.SEARCH_TRIAL in tags:
        return f"{tags[names.SEARCH]}-trial-{tags[names.SEARCH_TRIAL]}"
    return f"{cfg['experiment']}-{cfg['data'].get('train_size') or 'all'}-s{cfg['seed']}"


_START_WAIT = 600.0  # seconds another start may hold the lock (it may be downloading a large checkpoint)


@contextlib.contextmanager
def claimed_run(cfg: dict[str, Any], logger, restart: int = 0):
    """The run this training is: an unfinished one of the same settings resumed (with its newest
    checkpoint), else a new one; yields (run_id, folder, checkpoint or None) inside `tracked_run`.

    Finding the run and taking its lease are one step for every process that shares the store (a
    lock of the experiment): of two identical commands started at the same instant, on one
    machine or two, one trains and the other is refused, naming it. `resume=false` always starts a
    separate run. `restart`: this job's automatic resubmission (flows/orchestration/healing.py), its back-off behind it."""
    experiment = cfg.get("mlflow_experiment") or cfg["experiment"]
    experiment_id(cfg)  # made first: the experiment ids a team knows are not taken by the lock's
    # a crashed job's lease lapses a lease_timeout after its last heartbeat: a restart waits for it
    patience = time.monotonic() + (cfg["train"]["lease_timeout"] + 30 if restart else 0)
    with contextlib.ExitStack() as stack:
        while True:
            try:  # one lock per experiment, not per settings: a handful of bookkeeping runs, not one per training
                with (store_wide_lock(f"start {experiment}", wait=_START_WAIT) if cfg["resume"]
                      else contextlib.nullcontext()):
                    run_id, checkpoint = find_unfinished(cfg, logger) if cfg["resume"] else (None, None)
                    handed_back = bool(restart and run_id) and _status(run_id) == "KILLED"  # stopped cleanly
                    run_id, output_dir = stack.enter_context(tracked_run(cfg, run_id, logger))
                break
            except HeldElsewhere as held:
                if time.monotonic() > patience:
                    raise
                logger.info(f"{held}; waiting for its lease to lapse")
                time.sleep(10)
        if restart and checkpoint:
            record_restart(run_id, checkpoint["epoch"], restart, handed_back)
        yield run_id, output_dir, checkpoint


def record_restart(run_id: str, epoch: int, restart: int, handed_back: bool = False) -> None:
    """Notes the epoch a restart resumed from (`3h`: the job was handed back by a worker stopped with
    SIGTERM, flows/orchestration/worker.py); refuses (RunError) when the previous restart resumed from the same
    epoch and this one follows a crash: the attempt between them crashed before finishing an epoch."""

    earlier = [e for e in store.mlflow_client().get_run(run_id).data.tags.get(names.RESTART_EPOCHS, "").split(",") if e]
    if not handed_back and earlier and earlier[-1] == str(epoch):
        raise RunError(f"run {run_id} crashed twice in a row at epoch {epoch + 1} (restarts {restart - 1} and "
                       f"{restart}); not resumed again: see the worker's log for why its process died, then run "
                       f"the same job again")
    set_tags(run_id, {names.RESTART_EPOCHS: ",".join([*earlier, f"{epoch}h" if handed_back else str(epoch)]),
                      names.RESTARTS: restart})


@contextlib.contextmanager
def tracked_run(cfg: dict[str, Any], run_id: str | None = None, logger=None):
    """Start (or resume) an MLflow run and this machine's folder of it; yields (run_id, folder).

    An existing run's lease is taken before its status is touched, so a run that another process
    trains is refused and left as it is; while held, `writer(run_id)` is the run's one writer. The
    run ends FINISHED, FAILED on an error, or KILLED on Ctrl-C or SIGTERM; its checkpoints stay
    either way. A run whose lease another process took, or whose store failed past
    train.outage_timeout, is left as it is: its status is not this process's to write.
    """
    import mlflow

    under_prefect = "prefect" in sys.modules  # in process (flows/orchestration/engine.py), Prefect is not even imported
    if under_prefect:
        from prefect.exceptions import TerminationSignal
        from prefect.runtime import flow_run
    stops = (KeyboardInterrupt, TerminationSignal) if under_prefect else (KeyboardInterrupt,)
    outbox = None
    with contextlib.ExitStack() as held:
        if run_id:
            outbox = _leased(run_id, cfg, held, logger)
            output_dir = run_folder(run_id, cfg)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id(cfg),
                               run_name=None if run_id else run_name(cfg))
        status = "FAILED"
        try:
            if not run_id:
                run_id = run.info.run_id
                output_dir = new_run_folder(run_id, cfg)
                set_tags(run_id, {names.EXPERIMENT: cfg["experiment"], names.SEED: cfg["seed"],
                                  names.OUTPUT_DIR: output_dir, names.HOST: socket.gethostname(),
                                  names.CODE_VERSION: code_version(), names.CONFIG_HASH: config_hash(cfg),
                                  **cfg.get("tags", {}),
                                  **{f"{names.ENV}{key}": value for key, value in runtime.fingerprint().items()}})
                output_dir.mkdir(parents=True, exist_ok=True)
                outbox = _leased(run_id, cfg, held, logger)
            else:  # the command that resumes it is the run's now (a sweep finds its jobs by these tags)
                set_tags(run_id, cfg.get("tags", {}))
                _say_other_environment(run_id, logger)
            if under_prefect and flow_run.id:  # the two UIs point at each other's record
                set_tags(run_id, {names.PREFECT_FLOW_RUN: flow_run.id})
            yield run_id, output_dir
            status = "FINISHED"
        except stops:
            status = "KILLED"
            raise
        except ServerOutage:
            status = "RESUMABLE"  # stopped by a server it needs, not by its work: left RUNNING
            raise
        finally:
            if outbox:
                outbox.close()
            # A finished training's status is written even in an outage (MLflow's own retries wait
            # minutes for the store); a stopped one's is not, so Ctrl-C is not held up by a dead store.
            if status == "RESUMABLE" or (outbox and (outbox.lease.lost.is_set() or outbox.expired
                                                     or (outbox.in_outage and status != "FINISHED"))):
                _leave_run()  # the run's status is its new holder's, or this one's once the store answers
            else:
                _end_run(status)


def _say_other_environment(run_id: str, logger) -> None:
    """A run going on where it did not start trains on; one line says that its results will not
    repeat bit for bit, and why."""
    tags = store.mlflow_client().get_run(run_id).data.tags
    changes = runtime.fingerprint_changes({key.removeprefix(names.ENV): value for key, value in tags.items()
                                           if key.startswith(names.ENV)})
    if changes:
        (logger or logging.getLogger(__name__)).warning(
            f"run {run_id} goes on in another environment than the one it started in ({'; '.join(changes)}): it "
            f"trains on, but its results will not repeat bit for bit those of a training never stopped")


def _leased(run_id: str, cfg: dict[str, Any], held: contextlib.ExitStack, logger) -> Outbox:
    lease = Lease(run_id, cfg["train"]["lease_timeout"])
    lease.acquire(heartbeats=False)
    outbox = Outbox(lease, cfg["train"]["outage_timeout"], logger)
    _held[run_id] = outbox
    held.callback(_held.pop, run_id, None)
    held.callback(lambda: lease.release(outage=bool(outbox.expired or outbox.in_outage)))
    return outbox


def _leave_run() -> None:
    """Stop being in the active run without ending it (MLflow's end_run always sets a status)."""
    compat.leave_active_run()


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
        reason = "database or disk is full" if compat.is_database_full(error) else text.splitlines()[0][:200]
        logging.getLogger(__name__).warning(f"could not mark the run {status}: {reason}")



def refuse_frozen_changes(before: dict[str, Any], after: dict[str, Any], movable: tuple[str, ...] = ()) -> None:
    """A continuation that would change what is trained is refused; the `movable` keys (where the data
    is, when its fingerprint is checked instead) may change."""
    old, new = flatten(before), flatten(after)
    changed = sorted(key for key in set(old) | set(new)
                     if key.startswith(FROZEN_SETTINGS) and key not in movable and old.get(key) != new.get(key)
                     and (key in old or not key.startswith("runtime.")))  # runs from before runtime.* existed
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise RunError(f"a continuation trains the same model on the same data; it cannot change {details}. "
                            f"Start a new training for that (cnnflow train ...)")


def next_stage(run_id: str) -> int:

    return int(store.mlflow_client().get_run(run_id).data.tags.get(names.STAGES, "1")) + 1


