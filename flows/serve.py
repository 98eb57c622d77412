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
(flows/healing.py, settings `jobs.*`).
"""

from __future__ import annotations

import os

from cnnflow.components.errors import DataError, InfrastructureError
from cnnflow.flows.config import compose_config, fields_of, with_fields
from cnnflow.flows.engine import configured_api_url, prefect_fails
from cnnflow.flows.healing import RESUMABLE_TAG, install_automations, job_environment

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
    from cnnflow.flows.search import search_flow
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
    entrypoint must name (cnnflow's flow objects make Prefect's only when needed, flows/engine.py)."""
    from cnnflow.flows import inference, retrain, search, train

    for module in (train, inference, retrain, search):
        step = getattr(module, name, None)
        if step is not None and hasattr(step, "kind") and step.kind == "flow":
            return step.prefect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_all(experiment: str, overrides: list[str]) -> None:
    from prefect import serve

    _needs_server("cnnflow serve", pool=False)
    jobs = compose_config(experiment, overrides)["jobs"]
    install_automations(jobs)
    os.environ.update(job_environment(jobs))  # the runs are this process's children
    serve(*deployments(experiment, overrides), pause_on_shutdown=False)


def deploy_all(pool: str, experiment: str, overrides: list[str]) -> list[str]:
    """Registers the six flows as deployments `<flow>/<pool>` on the work pool `pool` (made as a
    "cnnflow" pool, flows/worker.py, when it does not exist) and returns their names. Runs get MLFLOW_TRACKING_URI
    set to this command's store; `experiment` and `overrides` are train's and retrain's defaults."""
    import logging

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from cnnflow.flows.worker import Worker
    from cnnflow.flows import store

    _needs_server("cnnflow deploy")
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


def _needs_server(command: str, pool: bool = True) -> None:
    """A Prefect server configured and answering (for a pool: the one its workers use), or one line
    saying how to get there (exit 5)."""
    url = configured_api_url()
    if not url:
        needed = "the Prefect server the pool's workers use" if pool else \
            "a Prefect server (start one with `prefect server start`)"
        raise InfrastructureError(f"{command} needs {needed}: export PREFECT_API_URL=http://HOST:4200/api (or prefect "
                                  f"config set PREFECT_API_URL=...) and run it again")
    reason = prefect_fails(url)
    if reason:
        raise InfrastructureError(f"{command} needs the Prefect server {url}, and it fails: {reason}. Start it "
                                  f"(prefect server start) or point PREFECT_API_URL at "
                                  f"{'the one the workers use' if pool else 'one that answers'}")


def submitted(pool: str, jobs: list[tuple[str, list[str]]]) -> list:
    """Each (experiment, overrides) job as a run of the pool's train deployment (`cnnflow deploy`);
    the deployment's own settings come first, so a job inherits them as a CLI run inherits a recipe.
    Returns the flow runs, which any free worker of the pool picks up."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    _needs_server("cnnflow train --pool")
    name = f"train/{pool}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise InfrastructureError(f"no deployment {name} on the Prefect server {configured_api_url()}: run cnnflow "
                                      f"deploy --pool {pool} first") from None
    defaults = deployment.parameters or {}
    planned = [{**defaults, "experiment": experiment or defaults.get("experiment", "quickstart"),
                "overrides": list(defaults.get("overrides") or []) + overrides} for experiment, overrides in jobs]
    for parameters in planned:  # a wrong setting in any job stops here, before anything is submitted
        fields = {key: value for key, value in parameters.items() if key not in ("experiment", "overrides")}
        compose_config(parameters["experiment"], with_fields(parameters["overrides"], **fields))
    return [run_deployment(name, parameters=parameters, timeout=0, as_subflow=False) for parameters in planned]


_RESUBMIT_GRACE = 60.0  # seconds a crashed run may wait for the resubmitting automation before it counts as ended


def has_ended(run) -> bool:
    """Completed, failed, cancelled, or crashed and not resubmitted within _RESUBMIT_GRACE."""
    from datetime import datetime, timezone

    if not (run.state and run.state.is_final()):
        return False
    waited = (datetime.now(timezone.utc) - run.state.timestamp).total_seconds()
    return not run.state.is_crashed() or waited > _RESUBMIT_GRACE


def finished(flow_runs: list, every: float = 5.0) -> list:
    """The flow runs once each has ended: completed, failed, cancelled, or crashed and not resubmitted
    (flows/healing.py); each restart is said as it starts."""
    import time

    import httpx
    from prefect import get_client

    from cnnflow.flows.outbox import outage_reason

    attempts, unanswered_since = {run.id: 1 for run in flow_runs}, None
    with get_client(sync_client=True) as client:
        while True:
            try:
                current = [client.read_flow_run(run.id) for run in flow_runs]
            except httpx.HTTPError as error:  # the jobs go on without the server; so does the waiting
                if unanswered_since is None:
                    unanswered_since = time.monotonic()
                    print(f"the Prefect server {configured_api_url()} fails ({outage_reason(error)}); the jobs go on, "
                          f"and this waits for the server (Ctrl-C stops waiting)", flush=True)
                time.sleep(every)
                continue
            if unanswered_since is not None:
                print(f"the Prefect server answers again after {time.monotonic() - unanswered_since:.0f} s", flush=True)
                unanswered_since = None
            for run in current:
                if run.run_count > attempts[run.id]:  # a crashed run resubmitted and running again
                    attempts[run.id] = run.run_count
                    print(f"flow run {run.name}: restart {run.run_count - 1} after a crash", flush=True)
            if all(has_ended(run) for run in current):
                return current
            time.sleep(every)
