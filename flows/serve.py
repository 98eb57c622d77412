"""`cnnflow serve`: every flow as a Prefect deployment, served from this one process.

The Prefect UI (or API, or a schedule) then starts train, continue, evaluate, predict and retrain
runs; they execute in subprocesses of this process, with its working directory and environment, so
they land in the same MLflow store as CLI runs. Schedules stay active when the process stops
(`pause_on_shutdown=False`), so a restart resumes them.
"""

from __future__ import annotations

from cnnflow.components.errors import DataError, InfrastructureError
from cnnflow.flows.config import compose_config
from cnnflow.flows.engine import configured_api_url

DEPLOYMENTS = ("train", "continue", "evaluate", "predict", "retrain")


def deployments(experiment: str, overrides: list[str]) -> list:
    """The RunnerDeployments: train/continue/evaluate/predict on demand, retrain on retrain.cron."""
    from prefect.deployments.runner import EntrypointType

    from cnnflow.flows.inference import evaluate_flow, predict_flow
    from cnnflow.flows.retrain import checked_sizes, retrain_flow, schedule_name
    from cnnflow.flows.train import continue_flow, train_flow

    cfg = compose_config(experiment, overrides)
    try:  # where the data is reachable from here, a retraining sequence it cannot give fails now
        checked_sizes(cfg, overrides)
    except DataError:
        pass
    module = EntrypointType.MODULE_PATH  # runs import cnnflow, wherever it is installed
    tags = ["cnnflow"]
    made = [
        train_flow.to_deployment("cnnflow", parameters={"experiment": experiment, "overrides": overrides},
                                 entrypoint_type=module, tags=tags,
                                 description="Train: fill in an experiment and Hydra overrides (key=value)."),
        continue_flow.to_deployment("cnnflow", entrypoint_type=module, tags=tags),
        evaluate_flow.to_deployment("cnnflow", entrypoint_type=module, tags=tags),
        predict_flow.to_deployment("cnnflow", entrypoint_type=module, tags=tags),
        retrain_flow.to_deployment("cnnflow", parameters={"experiment": experiment, "overrides": overrides},
                                   cron=cfg["retrain"]["cron"], entrypoint_type=module, tags=tags + ["schedule"],
                                   description=f"Retrain {schedule_name(cfg)} on growing subsets "
                                               f"{cfg['retrain']['sizes']}, promoting only improvements."),
    ]
    for deployment, step in zip(made, (train_flow, continue_flow, evaluate_flow, predict_flow, retrain_flow)):
        deployment.entrypoint = f"{__name__}.{step.fn.__name__}"  # a Prefect flow: see __getattr__ below
    return made


def __getattr__(name: str):
    """`cnnflow.flows.serve.<flow function>` is that flow's Prefect object: what a deployment's
    entrypoint must name (cnnflow's flow objects make Prefect's only when needed, flows/engine.py)."""
    from cnnflow.flows import inference, retrain, train

    for module in (train, inference, retrain):
        step = getattr(module, name, None)
        if step is not None and hasattr(step, "kind") and step.kind == "flow":
            return step.prefect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_all(experiment: str, overrides: list[str]) -> None:
    from prefect import serve

    if not configured_api_url():
        raise InfrastructureError(
            "cnnflow serve needs a Prefect server: start one with `prefect server start`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)")
    serve(*deployments(experiment, overrides), pause_on_shutdown=False)
