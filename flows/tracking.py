"""MLflow bookkeeping shared by the flows: where the store is, and what every run records."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cnnflow.components.errors import InfrastructureError, RunError, first_line
from cnnflow.flows.config import flatten, to_yaml

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # a file in the working directory
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
_MAX_PARAM_LENGTH = 6000
_PARAM_KEY_FORBIDDEN = re.compile(r"[^\w\-. :/]")  # MLflow refuses other characters in param names


def tracking_uri(cfg: dict[str, Any]) -> str:
    """The config's store, else $MLFLOW_TRACKING_URI, else mlflow.db in the working directory."""
    return cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_store(cfg: dict[str, Any], must_exist: bool = False) -> str:
    """Point MLflow at the store, after checking (within seconds) that it can be used; a new SQLite
    store is created under a lock, so two processes starting at once both get a working one.
    `must_exist`: commands that only read (runs, evaluate, predict) never create an empty store."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    uri = tracking_uri(cfg)
    check_store(uri, must_exist)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        import logging

        for chatty in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(chatty).setLevel(logging.WARNING)
        with store_lock("create"):
            _create_whole(Path(uri.removeprefix("sqlite:///")).expanduser())
            try:
                mlflow.MlflowClient().search_experiments(max_results=1)  # migrates an older store's tables
            except (SQLAlchemyError, MlflowException) as error:
                if "disk is full" in str(error):
                    raise  # the CLI says which disk
                raise InfrastructureError(f"the MLflow store {uri} cannot be opened ({first_line(error)}); if an "
                                          f"upgrade of it was interrupted, restore it from a copy or move it aside; "
                                          f"or {_FIX}") from None
    return uri


def _create_whole(path: Path) -> None:
    """A new SQLite store is made under a name of its own and renamed into place once MLflow has
    created every table: a creation killed half-way leaves no half-made store behind."""
    import mlflow

    if path.exists():
        return
    for abandoned in path.parent.glob(f"{path.name}.creating-*"):  # under the lock: nobody else creates
        abandoned.unlink(missing_ok=True)
    partial = path.with_name(f"{path.name}.creating-{os.getpid()}")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments(max_results=1)
    os.replace(partial, path)


_FIX = "set MLFLOW_TRACKING_URI (or tracking_uri=...) to a store you can use"


def check_store(uri: str, must_exist: bool = False) -> None:
    """One line naming the URI or path and the fix, instead of minutes of retries or a deep traceback."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        if not path.exists() and must_exist:
            raise InfrastructureError(f"no MLflow store here: {path.resolve()} does not exist. Run cnnflow in the "
                                      f"folder you trained in, or {_FIX}")
        _check_writable(path.parent if str(path.parent) else Path("."), f"the MLflow store {path}")
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif "://" not in uri or uri.startswith("file:"):
        _check_writable(Path(uri.removeprefix("file://").removeprefix("file:")), f"the MLflow store {uri}")


def _check_writable(folder: Path, what: str) -> None:
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cnnflow-write-test-"):
            pass
    except OSError as error:
        raise InfrastructureError(f"cannot write {what}: {folder.resolve()}: {error.strerror or error}. Run cnnflow in "
                                  f"a folder you can write to, or {_FIX}") from None


def _check_server(uri: str) -> None:
    """The tracking server answers its health check within a few seconds (MLflow's own client would
    retry for minutes; its retries stay on for a server that blips later, during a training)."""
    import requests

    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=(3, 5))
    except requests.RequestException as error:
        reason = {"ConnectTimeout": "no connection within 3 s", "ReadTimeout": "no answer within 5 s",
                  "ConnectionError": "connection refused"}.get(type(error).__name__, type(error).__name__)
        raise InfrastructureError(f"cannot reach the MLflow tracking server {uri} ({reason}). Start it "
                                  f"(mlflow server --host ... --port ...) or {_FIX}") from None
    if answer.status_code >= 500:
        raise InfrastructureError(f"the MLflow tracking server {uri} answers HTTP {answer.status_code}; check its log, "
                                  f"or {_FIX}")


@contextlib.contextmanager
def store_lock(purpose: str):
    """A lock that every cnnflow process using this store on this machine shares: a file beside a
    SQLite store, else one in the temporary folder named after the store's URI."""
    import mlflow
    import tempfile

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        path = path.with_name(f".{path.name}.{purpose}.lock")
    else:
        path = Path(tempfile.gettempdir()) / f"cnnflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.{purpose}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def experiment_id(cfg: dict[str, Any]) -> str:
    """The MLflow experiment named after the cnnflow experiment (created on first use, once even
    when two processes ask at the same moment)."""
    import mlflow

    name = cfg.get("mlflow_experiment") or cfg["experiment"]
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    with store_lock("create"):
        found = mlflow.get_experiment_by_name(name)
        return found.experiment_id if found else mlflow.create_experiment(name)


def code_version() -> str:
    """The git commit of the code (with +dirty for uncommitted changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{commit}+dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return f"cnnflow-{version('cnnflow')}"


def log_settings(run_id: str, cfg: dict[str, Any], output_dir: Path, features: dict[str, Any]) -> None:
    """All resolved settings as flat params; the composed config (config.yaml) and what the data
    looks like (features.json: image shape, model input, class names), which predict needs."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    params = [Param(_PARAM_KEY_FORBIDDEN.sub("_", key), str(value)[:_MAX_PARAM_LENGTH])
              for key, value in flatten(cfg).items()]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])
    (output_dir / "config.yaml").write_text(to_yaml(cfg))
    (output_dir / "features.json").write_text(json.dumps(features))
    for name in ("config.yaml", "features.json"):
        client.log_artifact(run_id, str(output_dir / name))


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# ------------------------------------------------------------------------------- run life cycle

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


def full_run_id(reference: str) -> str:
    """A run id from a full id or a unique prefix of one (what `cnnflow runs` prints)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        return client.get_run(reference).info.run_id
    except MlflowException:
        pass
    matches = []
    if re.fullmatch(r"[0-9a-f]{4,31}", reference):
        matches = [run.info.run_id for run in mlflow.search_runs(search_all_experiments=True, output_format="list")
                   if run.info.run_id.startswith(reference)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RunError(f"run id {reference!r} is ambiguous: {', '.join(sorted(matches)[:5])}; give more characters")
    raise RunError(f"no run {reference!r} in the MLflow store {mlflow.get_tracking_uri()} (cnnflow runs lists them)")


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


def run_settings(run_id: str) -> tuple[dict[str, Any], Path]:
    """The composed settings a run was trained with, and its output folder (a full run id)."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    run = mlflow.MlflowClient().get_run(run_id)
    output_dir = Path(run.data.tags.get("output_dir", ""))
    if (output_dir / "config.yaml").is_file():
        return yaml.safe_load((output_dir / "config.yaml").read_text()), output_dir
    try:
        return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")), output_dir
    except MlflowException:
        raise RunError(f"run {run_id} has no recorded settings (config.yaml): it ended ({run.info.status}) before "
                       f"its training started. Start a new one with cnnflow train") from None


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


def maybe_register(cfg: dict[str, Any], run_id: str, logger) -> int | None:
    """Register the run's model as a new version of `registry.name` and move `registry.alias` to it,
    when its `registry.metric` beats the value the alias holder had when it was registered."""

    spec = cfg.get("registry") or {}
    name, alias, metric, mode = spec.get("name"), spec.get("alias", "champion"), spec.get("metric"), spec.get("mode")
    if not name:
        return None
    with store_lock("registry"):  # compare and move as one step: of two trainings ending together, the better wins
        return _promote(run_id, name, alias, metric, mode, logger)


def _promote(run_id: str, name: str, alias: str, metric: str, mode: str, logger) -> int | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    run = client.get_run(run_id)
    if metric not in run.data.metrics:
        raise RunError(f"registry.metric={metric!r} is not logged by this run; it logs: {', '.join(sorted(run.data.metrics))}")
    value = run.data.metrics[metric]
    try:
        champion = client.get_model_version_by_alias(name, alias)
        best = float(champion.tags.get(f"metric.{metric}", "nan"))
    except MlflowException:  # no such model or alias yet
        champion, best = None, float("nan")
    beats = champion is None or best != best or (value > best if mode == "max" else value < best)
    previous = f"{name} v{champion.version} ({metric} {best:.4f})" if champion else "none"
    if not beats:
        logger.info(f"registry: {metric} {value:.4f} does not beat {alias} {previous}; {alias} stays")
        set_tags(run_id, {"registry.outcome": f"kept {alias} {previous}"})
        return None
    _ensure_registered_model(client, name)
    version = client.create_model_version(name, run.data.tags["model_uri"], run_id=run_id,
                                          tags={f"metric.{metric}": str(value)})
    client.set_registered_model_alias(name, alias, version.version)
    set_tags(run_id, {"registry.outcome": f"registered {name} v{version.version} as {alias}",
                      "registry.previous_champion": previous})
    logger.info(f"registry: {name} v{version.version} is now {alias!r} ({metric} {value:.4f}; before: {previous})")
    return int(version.version)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)


def run_features(run_id: str, output_dir: Path) -> dict[str, Any]:
    """What the run's data looked like (image shape, model input, class names): features.json."""
    import mlflow

    from mlflow.exceptions import MlflowException

    path = output_dir / "features.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/features.json")
    except MlflowException:
        raise RunError(f"run {run_id} has no features.json (an older cnnflow trained it); "
                            f"train it again to predict with it") from None
