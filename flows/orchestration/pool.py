"""A work pool's jobs seen from the command that submits them: the Prefect server it needs, each job
as a run of the pool's train deployment, and when a run has ended (a crashed one only once the
resubmitting automation had its chance, flows/orchestration/healing.py)."""

from __future__ import annotations

from cnnflow.components.errors import InfrastructureError
from cnnflow.flows.orchestration.engine import configured_api_url, prefect_fails
from cnnflow.flows.setup.config import compose_config, with_fields


def needs_server(command: str, pool: bool = True) -> None:
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

    needs_server("cnnflow train --pool")
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
    (flows/orchestration/healing.py); each restart is said as it starts."""
    import time

    import httpx
    from prefect import get_client

    from cnnflow.components.compat import outage_reason

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
