"""Every private name and every parsed error text of a library that cnnflow relies on, in one place.

Each shim says what it works around and has a test in tests/components/test_compat.py that runs it
against the installed library and fails naming the shim when the library changes. CI runs those
tests on the newest versions the pins allow and on the lowest (README, "Versions tested"). Code
elsewhere calls these functions, never the private names: `tests/test_structure.py` fails on a
private attribute of Keras, TensorFlow, MLflow, Optuna or Prefect used outside this module.

Imports nothing heavy at the top: each library is imported by the shims that use it.
"""

from __future__ import annotations

import re
from typing import Any

from cnnflow.components.errors import first_line

# ----------------------------------------------------------------------------------------- Keras


def swap_keras_seed_source(source: Any) -> Any:
    """Keras draws the seeds of unseeded layers and initializers from the module-level `random` it
    keeps in `keras.src.random.seed_generator.python_random` (no public hook exists). cnnflow puts a
    per-thread stand-in there (flows/setup/runtime.py, own_seed_draws): `source()` makes one unless
    one is there already. Returns what is there afterwards."""
    from keras.src.random import seed_generator

    if not isinstance(seed_generator.python_random, source):
        seed_generator.python_random = source()
    return seed_generator.python_random


def build_for_inputs(model: Any, element_spec: Any) -> None:
    """Makes a compiled model's metric and optimizer variables now, as Keras does when it first
    traces a training step (`Model._symbolic_build`, private): a resume inside an epoch fills them
    from its checkpoint before that first step."""
    model._symbolic_build(data_batch=element_spec)


def learning_rate_schedule(optimizer: Any) -> Any:
    """The schedule an optimizer was built with, or None: Keras keeps it in `_learning_rate`; the
    public `learning_rate` is its value at the current step."""
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if callable(schedule) else None


_CARDINALITY = re.compile(r"expected to contain (\d+) elements but contained only (\d+)")


def cardinality_shortfall(error: BaseException) -> tuple[int, int] | None:
    """(stated, found) when tf.data's `assert_cardinality` failed because a stream held fewer elements
    than stated (a FailedPreconditionError whose only account is its text), else None."""
    counts = _CARDINALITY.search(str(error))
    return (int(counts[1]), int(counts[2])) if counts else None


# ---------------------------------------------------------------------------------------- MLflow


def leave_active_run() -> None:
    """Stops being in the active run without ending it: `mlflow.end_run` always writes a status,
    which a run whose lease another process took must not get. Pops MLflow's private run stack."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    MLFLOW_RUN_ID.unset()
    fluent._active_run_stack.get().pop()


def artifact_repository(artifact_uri: str) -> Any:
    """The artifact store behind a run's artifact URI, for what MlflowClient lacks (deleting a
    checkpoint slot). Not in MLflow's documented API."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri)


def started_system_metrics(run_id: str, sink: Any) -> Any:
    """MLflow's system-metrics monitor for `run_id`, started, logging through `sink` (an object with
    `record_metrics(metrics, step)` and `flush()`) instead of its own client: cnnflow's outbox is the
    one writer into a run. Replaces the monitor's `mlflow_logger`, an attribute of its internals."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True)
    monitor.mlflow_logger = sink
    monitor.start()
    return monitor


def system_metrics_alive(monitor: Any) -> bool:
    """Whether the monitor's sampling thread (its private `_process`) still runs."""
    process = getattr(monitor, "_process", None)
    return bool(process and process.is_alive())


def stop_system_metrics(monitor: Any) -> None:
    """Stops the monitor without its final flush (`finish()` waits for a store that may be gone):
    sets its private `_shutdown_event`."""
    monitor._shutdown_event.set()


def is_database_full(error: BaseException) -> bool:
    """SQLite's "database or disk is full", as MLflow passes it on (wrapped in its own exception,
    with the text alone saying it)."""
    return "database or disk is full" in str(error)


def outage_reason(error: BaseException) -> str:
    """What failed, as an operator reads it, from the text of the error MLflow's client, requests
    and urllib3 raise (their types differ by store and version; their words do not): unreachable,
    a timeout, HTTP 5xx, a full disk."""
    text = str(error)
    lowered = text.lower()
    if "no space left" in lowered or "disk is full" in lowered or "errno 28" in lowered:
        return "its disk is full"
    status = re.search(r"too many (5\d\d) error responses|error code (5\d\d)|\b(5\d\d) (?:server|internal)", lowered)
    if status:
        code = next(group for group in status.groups() if group)
        return f"it answers HTTP {code} (a failing server, or its artifact store full or unwritable: see its log)"
    if "timed out" in lowered or "timeout" in lowered:
        return "it does not answer (timeout)"
    if "connection refused" in lowered or "failed to establish" in lowered or "max retries" in lowered \
            or "connection" in lowered:
        return "it is unreachable"
    return first_line(error)


# ---------------------------------------------------------------------------------------- Optuna


def trial_id(study: Any, number: int) -> int:
    """A trial's storage id from its number (Optuna's `study._storage`, `study._study_id`): the judge
    reports to trials that another process asked for."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def stored_trial(study: Any, trial_id: int) -> Any:
    """The trial as stored now (a FrozenTrial), read by its storage id without loading the whole study."""
    return study._storage.get_trial(trial_id)


def set_trial_user_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """A user attribute on a trial the study holds as a FrozenTrial (Optuna's public setter is on
    the live Trial of the process that asked for it)."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def set_intermediate_value(study: Any, trial: Any, step: int, value: float) -> None:
    """An intermediate value on a FrozenTrial (the last epoch's, which has no verdict to report it)."""
    study._storage.set_trial_intermediate_value(trial._trial_id, step, value)


# --------------------------------------------------------------------------------------- Prefect

# The coroutine of Prefect's BaseWorker that each poll of the pool calls; cnnflow's worker overrides
# it to check the pool for crashed runs first (flows/orchestration/worker.py). Not documented.
WORKER_POLL = "get_and_submit_flow_runs"


def worker_pool_name(worker: Any) -> str:
    """The work pool a worker serves (BaseWorker keeps it in `_work_pool_name`)."""
    return worker._work_pool_name


def worker_logger(worker: Any) -> Any:
    """The logger a worker's own lines go to (BaseWorker's `_logger`: prefect.workers.<type>.<name>)."""
    return worker._logger


# What Prefect's event client and log upload print on every failed send while its server is down;
# cnnflow says the outage once instead (flows/orchestration/engine.py).
PREFECT_OUTAGE_TEXTS = ("Unable to connect to", "EventsWorker' failed to process item")
PREFECT_OUTAGE_LOGGERS = ("prefect.events.clients", "prefect._internal.concurrency", "prefect.flow_runs")


def is_prefect_outage_noise(text: str) -> bool:
    return any(part in text for part in PREFECT_OUTAGE_TEXTS)


def is_termination_signal(error: BaseException) -> bool:
    """Prefect's TerminationSignal (SIGTERM inside a flow run), known by its name: Prefect does not
    export the class."""
    return type(error).__name__ == "TerminationSignal"


# ----------------------------------------------------------------------------------------- Hydra

_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'")
_MERGE = re.compile(r"Error merging override ([^=]+)=(.*)")
_MISSING_CONFIG = re.compile(r"Could not (?:find|load) '(\w+)/([^']*)'")


def unknown_override_key(error: BaseException) -> str | None:
    """The key of an override Hydra refused as not in the config (its text alone says so)."""
    found = _NOT_IN_STRUCT.search(str(error))
    return found[1] if found and "not in struct" in str(error.__cause__) else None


def merge_failure(error: BaseException) -> tuple[str, str] | None:
    """(key, value) of an override whose value has the wrong shape for its key."""
    found = _MERGE.match(str(error))
    return (found[1], found[2]) if found else None


def missing_group_option(message: str) -> tuple[str, str] | None:
    """(group, option) when Hydra found no config file for `group=option`."""
    found = _MISSING_CONFIG.search(message)
    return (found[1], found[2]) if found else None
