"""MLflow bookkeeping shared by the flows: where the store is, and what every run records."""

from __future__ import annotations

import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

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


def log_settings(run_id: str, cfg: dict[str, Any], output_dir: Path) -> None:
    """All resolved settings as flat params, and the composed config as config.yaml."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    params = [Param(_PARAM_KEY_FORBIDDEN.sub("_", key), str(value)[:_MAX_PARAM_LENGTH])
              for key, value in flatten(cfg).items()]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])
    config_file = output_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    client.log_artifact(run_id, str(config_file))


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
