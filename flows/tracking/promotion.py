"""Registry promotion: a run's model becomes a new version of `registry.name`, and the alias moves
to it only when it beats the alias holder. The comparison and the move are one step for every
process on every machine that shares the store: of two trainings ending together, the better wins."""

from __future__ import annotations

from typing import Any

from cnnflow.components.errors import RunError
from cnnflow.flows.tracking import names, store
from cnnflow.flows.tracking.lifecycle import store_wide_lock
from cnnflow.flows.tracking.store import set_tags


def maybe_register(cfg: dict[str, Any], run_id: str, logger) -> int | None:
    """Register the run's model as a new version of `registry.name` (every run, so each is there to
    compare and to roll back to), and move `registry.alias` to it when its `registry.metric` beats
    the value the alias holder had when it was registered. Returns the version, or None without a
    registry name."""

    spec = cfg.get("registry") or {}
    name, alias, metric, mode = spec.get("name"), spec.get("alias", "champion"), spec.get("metric"), spec.get("mode")
    if not name:
        return None
    with store_wide_lock(f"registry {name}"):
        return _promote(run_id, name, alias, metric, mode, logger)


def _promote(run_id: str, name: str, alias: str, metric: str, mode: str, logger) -> int | None:
    from mlflow.exceptions import MlflowException

    client = store.mlflow_client()
    run = client.get_run(run_id)
    if metric not in run.data.metrics:
        raise RunError(f"registry.metric={metric!r} is not logged by this run; it logs: {', '.join(sorted(run.data.metrics))}")
    value = run.data.metrics[metric]
    try:
        champion = client.get_model_version_by_alias(name, alias)
        best = float(champion.tags.get(names.registered_metric(metric), "nan"))
    except MlflowException:  # no such model or alias yet
        champion, best = None, float("nan")
    beats = champion is None or best != best or (value > best if mode == "max" else value < best)
    previous = f"{name} v{champion.version} ({metric} {best:.4f})" if champion else "none"
    _ensure_registered_model(client, name)
    # The version serves (the pyfunc `serving`, for `mlflow models serve`); its Keras model is a tag,
    # for evaluate and predict. Runs of cnnflow before `serving` existed register their Keras model.
    keras_model = run.data.tags[names.MODEL_URI]
    source = run.data.tags.get(names.SERVING_URI, keras_model)
    # an MLflow server requires the logged model's id beside a `models:/m-...` source (a local store does not)
    model_id = source.removeprefix("models:/").split("/")[0] if source.startswith("models:/m-") else None
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id,
                                          tags={names.registered_metric(metric): str(value), names.KERAS_MODEL_URI: keras_model})
    set_tags(run_id, {names.REGISTRY_PREVIOUS_CHAMPION: previous})
    if not beats:
        logger.info(f"registry: {name} v{version.version} ({metric} {value:.4f}) does not beat {alias} {previous}; "
                    f"{alias} stays")
        set_tags(run_id, {names.REGISTRY_OUTCOME: f"registered {name} v{version.version}; kept {alias} {previous}"})
        return int(version.version)
    client.set_registered_model_alias(name, alias, version.version)
    set_tags(run_id, {names.REGISTRY_OUTCOME: f"registered {name} v{version.version} as {alias}"})
    logger.info(f"registry: {name} v{version.version} is now {alias!r} ({metric} {value:.4f}; before: {previous})")
    return int(version.version)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)


