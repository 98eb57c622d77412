"""Jobs that heal themselves: a dead worker's flow run is marked Crashed, and a crashed training is
resubmitted, with nobody watching.

Prefect does both, set up by `cnnflow deploy` and `cnnflow serve` (idempotently, by name):
- each flow run sends a heartbeat every quarter of `jobs.crash_after` (Prefect's own flow-run
  heartbeats, at least every 30 s), and the automation "cnnflow: crash unheard flow runs" marks a
  run Crashed when none came for `jobs.crash_after` seconds (Prefect's "detect zombie flows"). A
  worker that sees its flow-run process die marks it Crashed at once.
- the automation "cnnflow: resubmit crashed trainings" sets a Crashed run of a resumable deployment
  (train, retrain) back to Scheduled while its run count is at most `jobs.restarts`: the same flow run,
  its parameters unchanged, for any free worker of the pool; the training resumes its MLflow run
  from the artifact store (flows/tracking/checkpoints.py).
The restarted job itself waits a back-off, waits for the MLflow lease of a holder that may still be
alive (cnnflow's lease, not Prefect's heartbeat, decides whether a training is alive), and stops
being resubmitted when two attempts in a row crashed at the same epoch. A worker stopped with
SIGTERM hands its trainings back the same way (flows/orchestration/worker.py): stopped cleanly, Crashed, resubmitted.
"""

from __future__ import annotations

import time
from typing import Any

CRASH_AUTOMATION = "cnnflow: crash unheard flow runs"
RESUBMIT_AUTOMATION = "cnnflow: resubmit crashed trainings"
RESUBMITTED = "cnnflow: resubmitted after a crash"
RESUMABLE_TAG = "cnnflow-resumable"  # on the train and retrain deployments: a rerun resumes, never repeats


def heartbeat_seconds(jobs: dict[str, Any]) -> int:
    return max(30, int(jobs["crash_after"]) // 4)  # Prefect's floor is 30 s


def job_environment(jobs: dict[str, Any]) -> dict[str, str]:
    """What a flow run's process needs in its environment for Prefect to hear it."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds(jobs))}


def install_automations(jobs: dict[str, Any]) -> None:
    """Creates the two automations on the configured Prefect server, or updates them to `jobs`."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    flow_runs = ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]})
    wanted = [
        Automation(
            name=CRASH_AUTOMATION, description=f"A cnnflow flow run not heard for {jobs['crash_after']:g} s is Crashed "
                                               f"(its process or machine died).",
            trigger=EventTrigger(after={"prefect.flow-run.heartbeat"},
                                 expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                                         "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                                         "prefect.flow-run.Crashed"},
                                 match=flow_runs, match_related=ResourceSpecification(_tagged("cnnflow")),
                                 for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                                 within=timedelta(seconds=jobs["crash_after"])),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"cnnflow: no heartbeat for "
                                                                          f"{jobs['crash_after']:g} s")]),
        Automation(
            name=RESUBMIT_AUTOMATION, description=f"A crashed cnnflow training is scheduled again, at most "
                                                  f"{jobs['restarts']} times; it resumes from its last checkpoint.",
            trigger=EventTrigger(expect={"prefect.flow-run.Crashed"},
                                 match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"],
                                                              "prefect.run-count": [str(n) for n in
                                                                                    range(jobs["restarts"] + 1)]}),
                                 match_related=ResourceSpecification(_tagged(RESUMABLE_TAG)),
                                 for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1,
                                 within=timedelta(0)),
            actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                        message=RESUBMITTED)]),
    ]
    for automation in wanted:
        if automation.name == RESUBMIT_AUTOMATION and not jobs["restarts"]:
            automation.enabled = False
        try:
            existing = Automation.read(name=automation.name)
        except ValueError:  # Prefect's "not found"
            automation.create()
            continue
        automation.id = existing.id
        automation.update()


def _tagged(tag: str) -> dict[str, str]:
    return {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"}


# ------------------------------------------------------------------------------ in the restarted job

def restart_number() -> int:
    """0 for a job's first attempt; n for its n-th automatic resubmission (Prefect's run count)."""
    import sys

    if "prefect" not in sys.modules:  # in process: no Prefect, no resubmission
        return 0
    from prefect.runtime import flow_run

    return max(0, (flow_run.run_count or 1) - 1) if flow_run.id else 0


def backoff_seconds(restart: int) -> float:
    return min(120.0, 15.0 * 2 ** (restart - 1))


def wait_before_restart(restart: int, logger) -> None:
    wait = backoff_seconds(restart)
    logger.warning(f"restart {restart} of this job after a crash: resuming in {wait:.0f} s")
    time.sleep(wait)


def outcome_of_earlier_attempt(lease_timeout: float, logger) -> str | None:
    """The MLflow run an earlier attempt of this flow run finished, or None for this attempt to resume
    (or start) the training. While an earlier attempt still holds its run's lease, it waits: a run
    marked Crashed by mistake (its heartbeats lost in a Prefect outage longer than jobs.crash_after)
    trains on, and this attempt takes over only if that one dies."""
    import mlflow
    from prefect.runtime import flow_run

    from cnnflow.flows.tracking.lifecycle import Lease
    from cnnflow.flows.tracking.names import PREFECT_FLOW_RUN

    said = False
    while True:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                  filter_string=f"tags.`{PREFECT_FLOW_RUN}` = '{flow_run.id}'",
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        run = runs[0]
        if run.info.status == "FINISHED":
            return run.info.run_id
        holder = Lease(run.info.run_id, lease_timeout).holder()
        if not holder:
            return None
        if not said:
            logger.warning(f"an earlier attempt of this job, {holder}, still trains run {run.info.run_id}: waiting "
                           f"for it to finish (if it dies, this attempt resumes the run)")
            said = True
        time.sleep(10)
