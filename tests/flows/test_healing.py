"""Crashed jobs heal (flows/orchestration/healing.py): the automations are made once and follow the settings, and a
job that dies twice at one epoch is not resumed again. A dead worker's job marked Crashed,
resubmitted and resumed for real: tests/test_cluster.py."""

from __future__ import annotations

import mlflow
import pytest

from cnnflow.components.errors import RunError
from cnnflow.flows.orchestration.healing import CRASH_AUTOMATION, RESUBMIT_AUTOMATION, install_automations
from cnnflow.flows.tracking.lifecycle import record_restart


def test_the_automations_are_made_once_and_follow_the_settings(prefect_harness):
    from prefect import get_client

    install_automations({"crash_after": 300, "restarts": 3})
    install_automations({"crash_after": 120, "restarts": 2})
    with get_client(sync_client=True) as client:
        crash = client.read_automations_by_name(CRASH_AUTOMATION)
        resubmit = client.read_automations_by_name(RESUBMIT_AUTOMATION)
    assert len(crash) == 1 and len(resubmit) == 1
    assert crash[0].trigger.within.total_seconds() == 120
    assert crash[0].actions[0].message == "cnnflow: no heartbeat for 120 s"
    # resubmitted while its run count (attempts so far) is at most 2: the third crash stays Crashed
    assert sorted(resubmit[0].trigger.match.root["prefect.run-count"]) == ["0", "1", "2"]
    install_automations({"crash_after": 120, "restarts": 0})
    with get_client(sync_client=True) as client:
        assert not client.read_automations_by_name(RESUBMIT_AUTOMATION)[0].enabled


def test_a_job_that_dies_twice_at_one_epoch_is_not_resumed_again(mlflow_store):
    with mlflow.start_run() as run:
        pass
    record_restart(run.info.run_id, 3, restart=1)
    record_restart(run.info.run_id, 5, restart=2)  # progress since: resumed
    with pytest.raises(RunError, match="crashed twice in a row at epoch 6"):
        record_restart(run.info.run_id, 5, restart=3)
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["restart_epochs"] == "3,5" and tags["restarts"] == "2"


def test_a_job_handed_back_by_a_stopped_worker_is_not_counted_as_a_crash_at_its_epoch(mlflow_store):
    with mlflow.start_run() as run:
        pass
    record_restart(run.info.run_id, 5, restart=1)
    record_restart(run.info.run_id, 5, restart=2, handed_back=True)  # a worker stopped with SIGTERM
    record_restart(run.info.run_id, 5, restart=3)  # one crash at epoch 6 since the last crash restart
    with pytest.raises(RunError, match="crashed twice in a row at epoch 6"):
        record_restart(run.info.run_id, 5, restart=4)
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags["restart_epochs"] == "5,5h,5"


@pytest.mark.smoke
def test_a_cnnflow_worker_heals_what_the_automations_missed_or_cannot_see(prefect_harness):
    """flows/orchestration/worker.py: around a restart of the Prefect server the automations miss things: a run
    that went unheard, a run whose process died as it started (Pending, no heartbeat to miss), a
    Crashed event; the pool's workers apply the automations' rules to all three."""
    import asyncio
    from datetime import datetime, timedelta, timezone

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Crashed, Pending, Running

    from cnnflow.flows.orchestration.healing import RESUMABLE_TAG
    from cnnflow.flows.orchestration.worker import CHECK_SECONDS, MISSED, Worker

    async def scenario():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="heal", type=Worker.type,
                                                         base_job_template=Worker.get_default_base_job_template()))
            flow_id = await client.create_flow_from_name("train")
            deployment_id = await client.create_deployment(flow_id, "heal", work_pool_name="heal",
                                                           tags=[RESUMABLE_TAG], entrypoint="flows/train.py:train_flow")
            crashed = await client.create_flow_run_from_deployment(deployment_id)
            await client.set_flow_run_state(crashed.id, Running(), force=True)
            await client.set_flow_run_state(crashed.id, Crashed(message="dead"), force=True)
            stuck = await client.create_flow_run_from_deployment(deployment_id)
            await client.set_flow_run_state(stuck.id, Pending(), force=True)
            unheard = await client.create_flow_run_from_deployment(deployment_id)
            await client.set_flow_run_state(unheard.id, Running(), force=True)

            async def state(flow_run):
                return (await client.read_flow_run(flow_run.id)).state

            def later(seconds: float):
                return datetime.now(timezone.utc) + timedelta(seconds=seconds)

            async with Worker(work_pool_name="heal") as worker:
                await asyncio.to_thread(install_automations, {"crash_after": 120, "restarts": 0})
                await worker._heal_pool(now=later(60))
                assert (await state(stuck)).type.value == "PENDING"  # not for long enough yet
                assert (await state(unheard)).type.value == "RUNNING"
                worker._unheard_since = later(10).timestamp()  # the worker lost the server: heartbeats were lost
                await worker._heal_pool(now=later(121))
                assert (await state(unheard)).type.value == "RUNNING"
                worker._unheard_since = 0.0
                await worker._heal_pool(now=later(121))
                assert (await state(stuck)).message == "cnnflow: pending for more than 120 s (its process never started)"
                assert (await state(unheard)).message == "cnnflow: no heartbeat for 120 s"
                assert (await state(crashed)).type.value == "CRASHED"  # the rule says never: the workers neither
                await asyncio.to_thread(install_automations, {"crash_after": 120, "restarts": 1})
                await worker._heal_pool()
                assert (await state(crashed)).type.value == "CRASHED"  # just crashed: the automation's turn
                await worker._heal_pool(now=later(CHECK_SECONDS + 1))
                assert ((await state(crashed)).name, (await state(crashed)).message) == ("AwaitingRetry", MISSED)

    asyncio.run(scenario())
