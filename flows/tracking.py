"""MLflow bookkeeping shared by the flows: where the store is, and what every run records."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cnnflow.components.registry import UserError
from cnnflow.flows.config import flatten, to_yaml

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # a file in the working directory
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
_MAX_PARAM_LENGTH = 6000
_PARAM_KEY_FORBIDDEN = re.compile(r"[^\w\-. :/]")  # MLflow refuses other characters in param names


def tracking_uri(cfg: dict[str, Any]) -> str:
    """The config's store, else $MLFLOW_TRACKING_URI, else mlflow.db in the working directory."""
    return cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_store(cfg: dict[str, Any]) -> str:
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(cfg: dict[str, Any]) -> str:
    """The MLflow experiment named after the cnnflow experiment (created on first use)."""
    import mlflow

    name = cfg.get("mlflow_experiment") or cfg["experiment"]
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

class TrackingError(UserError):
    """A run that does not exist, cannot be continued, or may not be changed that way."""


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
        raise TrackingError(f"another process is training in {folder}") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _locked_elsewhere(folder: Path) -> bool:
    try:
        with _lock(folder):
            return False
    except TrackingError:
        return True


def find_unfinished(cfg: dict[str, Any]):
    """The newest run of the same settings that stopped before finishing and left a checkpoint."""
    import mlflow

    from cnnflow.components.callbacks import read_checkpoint

    found = mlflow.get_experiment_by_name(cfg.get("mlflow_experiment") or cfg["experiment"])
    if not found:
        return None
    runs = mlflow.search_runs([found.experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.config_hash = '{config_hash(cfg)}' and attributes.status != 'FINISHED'")
    for run in runs:
        folder = Path(run.data.tags.get("output_dir", "/nonexistent"))
        if folder.is_dir() and read_checkpoint(folder) and not _locked_elsewhere(folder):
            return run.info
    return None


@contextlib.contextmanager
def tracked_run(cfg: dict[str, Any], run_id: str | None = None):
    """Start (or resume) an MLflow run and its output folder; yields (run_id, output folder).

    The run ends FINISHED, FAILED on an error, or KILLED on Ctrl-C; the folder (and its checkpoint)
    stays either way.
    """
    import mlflow

    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id(cfg))
    status = "FAILED"
    try:
        run_id = run.info.run_id
        if run.data.tags.get("output_dir"):
            output_dir = Path(run.data.tags["output_dir"])
        else:
            output_dir = (Path(cfg["output_dir"]) / cfg["experiment"] / run_id).resolve()
            set_tags(run_id, {"cnnflow.experiment": cfg["experiment"], "seed": cfg["seed"], "output_dir": output_dir,
                              "code_version": code_version(), "config_hash": config_hash(cfg), **cfg.get("tags", {})})
        output_dir.mkdir(parents=True, exist_ok=True)
        with _lock(output_dir):
            yield run_id, output_dir
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def run_settings(run_id: str) -> tuple[dict[str, Any], Path]:
    """The composed settings a run was trained with, and its output folder."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri({}))
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no run {run_id!r} in the MLflow store {tracking_uri({})}") from None
    output_dir = Path(run.data.tags.get("output_dir", ""))
    if (output_dir / "config.yaml").is_file():
        return yaml.safe_load((output_dir / "config.yaml").read_text()), output_dir
    return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")), output_dir


def refuse_frozen_changes(before: dict[str, Any], after: dict[str, Any]) -> None:
    old, new = flatten(before), flatten(after)
    changed = sorted(key for key in set(old) | set(new)
                     if key.startswith(FROZEN_SETTINGS) and old.get(key) != new.get(key)
                     and (key in old or not key.startswith("runtime.")))  # runs from before runtime.* existed
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise TrackingError(f"a continuation trains the same model on the same data; it cannot change {details}. "
                            f"Start a new training for that (cnnflow train ...)")


def next_stage(run_id: str) -> int:
    from mlflow import MlflowClient

    return int(MlflowClient().get_run(run_id).data.tags.get("stages", "1")) + 1


def maybe_register(cfg: dict[str, Any], run_id: str, logger) -> int | None:
    """Register the run's model as a new version of `registry.name` and move `registry.alias` to it,
    when its `registry.metric` beats the value the alias holder had when it was registered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    spec = cfg.get("registry") or {}
    name, alias, metric, mode = spec.get("name"), spec.get("alias", "champion"), spec.get("metric"), spec.get("mode")
    if not name:
        return None
    if mode not in ("max", "min"):
        raise TrackingError(f"registry.mode={mode!r}; use max or min")
    client = MlflowClient()
    run = client.get_run(run_id)
    if metric not in run.data.metrics:
        raise TrackingError(f"registry.metric={metric!r} is not logged by this run; it logs: {', '.join(sorted(run.data.metrics))}")
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
        raise TrackingError(f"run {run_id} has no features.json (an older cnnflow trained it); "
                            f"train it again to predict with it") from None
