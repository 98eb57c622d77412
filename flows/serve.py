"""Every flow as a Prefect deployment: served from one process, or on a work pool.

`cnnflow serve`: the Prefect UI (or API, or a schedule) starts train, continue, evaluate, predict and
retrain runs; they execute in subprocesses of this process, with its working directory and
environment, so they land in the same MLflow store as CLI runs. Schedules stay active when the
process stops (`pause_on_shutdown=False`), so a restart resumes them.

`cnnflow deploy --pool NAME`: the same deployments, named after the pool, registered on a Prefect
work pool; any machine with cnnflow installed runs them with `prefect worker start --pool NAME`
(flows are found by module path: no image, no code storage). Their runs report to the MLflow store
given to `deploy`, which workers elsewhere must reach: a tracking server.

Both set up the automations that mark a dead worker's run Crashed and resubmit a crashed training
(flows/orchestration/healing.py, settings `jobs.*`).
"""

from __future__ import annotations

import os

from cnnflow.components.errors import DataError
from cnnflow.flows.orchestration.healing import RESUMABLE_TAG, install_automations, job_environment
from cnnflow.flows.orchestration.pool import needs_server
from cnnflow.flows.setup.config import compose_config, fields_of

DEPLOYMENTS = ("train", "continue", "evaluate", "predict", "retrain", "search")


def deployment_names(experiment: str, pool: str | None = None) -> dict[str, str]:
    """Each flow's deployment name, saying what it runs: `cnnflow serve experiment=celeba` gives
    train/celeba, retrain/celeba, search/celeba, continue/any-run, evaluate/any-model and predict/any-model; on a
    work pool every flow's deployment is named after the pool (train/gpu: "train on the gpu pool")."""
    if pool:
        return dict.fromkeys(DEPLOYMENTS, pool)
    return {"train": experiment, "retrain": experiment, "continue": "any-run", "evaluate": "any-model",
            "predict": "any-model", "search": experiment}


def deployments(experiment: str, overrides: list[str], pool: str | None = None) -> list:
    """The RunnerDeployments: train/continue/evaluate/predict on demand, retrain on retrain.cron. The
    train and retrain forms start from the served settings: those with a field of their own fill it in
    (data_path, epochs, ...), the others are the form's `overrides`."""
    from prefect.deployments.runner import EntrypointType

    from cnnflow.flows.inference import evaluate_flow, predict_flow
    from cnnflow.flows.retrain import checked_sizes, retrain_flow, schedule_name
    from cnnflow.flows.search.flow import search_flow
    from cnnflow.flows.train import continue_flow, train_flow

    cfg = compose_config(experiment, overrides)
    try:  # where the data is reachable from here, a retraining sequence it cannot give fails now
        checked_sizes(cfg, overrides)
    except DataError:
        pass
    module = EntrypointType.MODULE_PATH  # runs import cnnflow, wherever it is installed
    tags = ["cnnflow"]
    names = deployment_names(experiment, pool)
    fields, rest = fields_of(overrides)
    made = [
        train_flow.to_deployment(names["train"], parameters={"experiment": experiment, **fields, "overrides": rest},
                                 entrypoint_type=module, tags=tags + [RESUMABLE_TAG],
                                 description="Train a model: choose a recipe, change the fields you need (None: the "
                                             "recipe's value), anything else as key=value overrides. One MLflow run."),
        continue_flow.to_deployment(names["continue"], entrypoint_type=module, tags=tags,
                                    description="Train a run for more epochs, in the same MLflow run."),
        evaluate_flow.to_deployment(names["evaluate"], entrypoint_type=module, tags=tags,
                                    description="Evaluate a logged or registered model on a split (an MLflow run)."),
        predict_flow.to_deployment(names["predict"], entrypoint_type=module, tags=tags,
                                   description="Predict the labels of image files on the machine that runs it."),
        retrain_flow.to_deployment(names["retrain"],
                                   parameters={"experiment": experiment,
                                               **{k: v for k, v in fields.items() if k != "train_size"}, "overrides": rest},
                                   cron=cfg["retrain"]["cron"], entrypoint_type=module, tags=tags + ["schedule", RESUMABLE_TAG],
                                   description=f"Retrain {schedule_name(cfg)} on growing subsets "
                                               f"{cfg['retrain']['sizes']}, promoting only improvements."),
        search_flow.to_deployment(names["search"], parameters={"experiment": experiment, "pool": pool,
                                                               "overrides": overrides + ["search=default"]},
                                  entrypoint_type=module, tags=tags + [RESUMABLE_TAG],
                                  description="Search hyperparameters with pruning: add the space to overrides in "
                                              "Hydra's sweep grammar, e.g. model.width=int(interval(16,64)); the "
                                              "search.* settings set the budget. Run again to continue a study."),
    ]
    for deployment, step in zip(made, (train_flow, continue_flow, evaluate_flow, predict_flow, retrain_flow,
                                       search_flow)):
        deployment.entrypoint = f"{__name__}.{step.fn.__name__}"  # a Prefect flow: see __getattr__ below
    return made


def __getattr__(name: str):
    """`cnnflow.flows.serve.<flow function>` is that flow's Prefect object: what a deployment's
    entrypoint must name (cnnflow's flow objects make Prefect's only when needed, flows/orchestration/engine.py)."""
    from cnnflow.flows import inference, retrain, train
    from cnnflow.flows.search import flow as search

    for module in (train, inference, retrain, search):
        step = getattr(module, name, None)
        if step is not None and hasattr(step, "kind") and step.kind == "flow":
            return step.prefect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_all(experiment: str, overrides: list[str]) -> None:
    from prefect import serve

    needs_server("cnnflow serve", pool=False)
    jobs = compose_config(experiment, overrides)["jobs"]
    install_automations(jobs)
    os.environ.update(job_environment(jobs))  # the runs are this process's children
    serve(*deployments(experiment, overrides), pause_on_shutdown=False)


def deploy_all(pool: str, experiment: str, overrides: list[str]) -> list[str]:
    """Registers the six flows as deployments `<flow>/<pool>` on the work pool `pool` (made as a
    "cnnflow" pool, flows/orchestration/worker.py, when it does not exist) and returns their names. Runs get MLFLOW_TRACKING_URI
    set to this command's store; `experiment` and `overrides` are train's and retrain's defaults."""
    import logging

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from cnnflow.flows.orchestration.worker import Worker
    from cnnflow.flows.tracking import store

    needs_server("cnnflow deploy")
    cfg = compose_config(experiment, overrides)
    uri = store.absolute(store.use_store(cfg))
    if not uri.startswith(("http://", "https://")):
        logging.getLogger("cnnflow").warning(
            f"the MLflow store is {uri}: only workers on this machine reach it; for workers elsewhere, start an "
            f"MLflow tracking server and set MLFLOW_TRACKING_URI=http://HOST:5000 (docs/scaling.md)")
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
            if existing.type != Worker.type:
                logging.getLogger("cnnflow").warning(
                    f"work pool {pool} has the type {existing.type}: its workers stopped with SIGTERM kill their "
                    f"trainings, found only {cfg['jobs']['crash_after']} s later (jobs.crash_after); a pool that "
                    f"cnnflow deploy makes (type {Worker.type}) hands them back at once (docs/scaling.md: Operations)")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=Worker.type,
                                                   base_job_template=Worker.get_default_base_job_template()))
    install_automations(cfg["jobs"])
    names = []
    for deployment in deployments(experiment, overrides, pool=pool):
        deployment.job_variables = {"env": {"MLFLOW_TRACKING_URI": uri, **job_environment(cfg["jobs"])}}
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names
