"""What a flow run shows in the Prefect UI's Artifacts tab: a markdown summary of the MLflow run it
made (test metrics, epochs, registry outcome, a link to the run in the MLflow UI), its learning
curves, and a sweep's table of jobs.

Artifacts exist only where a Prefect server records the flow run; a command that runs in process
(no server configured, flows/orchestration/engine.py) publishes nothing. The MLflow UI's address is known when the
store is a tracking server (it serves the UI too) or when CNNFLOW_MLFLOW_UI names it (for a SQLite
store: `mlflow ui` prints it, http://127.0.0.1:5000 by default).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import mlflow

from cnnflow.flows.orchestration import engine
from cnnflow.flows.tracking import names, store


def mlflow_ui() -> str | None:
    """The MLflow UI's address, when known."""
    address = os.environ.get("CNNFLOW_MLFLOW_UI") or mlflow.get_tracking_uri()
    return address.rstrip("/") if address.startswith(("http://", "https://")) else None


def run_address(run_id: str) -> str | None:
    ui = mlflow_ui()
    if not ui:
        return None
    experiment_id = store.mlflow_client().get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def publish_training(run_id: str, epochs: int, metrics: dict[str, float], output_dir: Path) -> None:
    """The training run's summary and learning curves, as artifacts of the flow run going on."""
    if not engine.recording():
        return
    from prefect.artifacts import create_markdown_artifact

    run = store.mlflow_client().get_run(run_id)
    tags = run.data.tags
    address = run_address(run_id)
    rows = [("store", f"`{mlflow.get_tracking_uri()}`"),
            ("epochs", epochs),
            *[(name, f"{value:.4f}") for name, value in metrics.items()],
            ("best val_accuracy", _best(run_id, "val_accuracy")),
            ("training images", tags.get(names.split_size("train"), "?")),
            ("precision, devices", f"{tags.get(names.PRECISION, '?')}, {tags.get(names.DEVICES, '?')}"),
            ("registry", tags.get(names.REGISTRY_OUTCOME, "not registered (set registry.name)"))]
    curves = output_dir / "figures" / "learning_curves.png"
    link = f"[{run.info.run_name}]({address})" if address else f"{run.info.run_name} (`{run_id}`)"
    markdown = "\n".join([f"# {run.info.run_name}", "", f"| MLflow run | {link} |", "|---|---|",
                          *[f"| {name} | {value} |" for name, value in rows], "", _figure(curves, "learning curves")])
    create_markdown_artifact(markdown, key=_key("training", run.info.run_name),
                             description=f"MLflow run {run_id}: test metrics, registry outcome, learning curves")


def publish_evaluation(model_uri: str, split: str, run_id: str, metrics: dict[str, float]) -> None:
    if not engine.recording():
        return
    from prefect.artifacts import create_markdown_artifact

    address = run_address(run_id)
    where = f"[{run_id}]({address})" if address else f"`{run_id}`"
    lines = [f"# {model_uri} on {split}", "", f"MLflow run {where}", "", "| metric | value |", "|---|---|",
             *[f"| {name} | {value:.4f} |" for name, value in metrics.items()]]
    create_markdown_artifact("\n".join(lines), key=_key("evaluation", split), description=f"{model_uri} on {split}")


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact (predictions, a sweep's jobs); outside a flow run too, under a server."""
    if not engine.recording() or not engine.configured_api_url():
        return
    import warnings

    from prefect.artifacts import create_table_artifact

    with warnings.catch_warnings():  # Prefect 3.9 warns it may stop taking artifacts made outside a run
        warnings.simplefilter("ignore", FutureWarning)
        create_table_artifact(rows, key=_key(key), description=description)


def _figure(path: Path, title: str) -> str:
    """The figure inside the markdown itself: the Prefect UI shows it without reaching the MLflow store."""
    if not path.is_file():
        return f"_{title}: no figure (plots.learning_curves is off)_"
    return f"![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def _best(run_id: str, metric: str) -> str:
    history = store.mlflow_client().get_metric_history(run_id, metric)
    return f"{max(point.value for point in history):.4f}" if history else "-"


def _key(*parts: str) -> str:
    """Prefect's artifact keys: lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() and c.isascii() else "-" for c in text).strip("-")[:100] or "cnnflow"

