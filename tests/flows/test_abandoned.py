"""No run stays RUNNING after its process is gone: the next command that finds it trains it again in
place (the same training) or closes it KILLED, saying why; cnnflow's lock runs never show as running."""

import socket
import threading
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from cnnflow.flows import runs
from cnnflow.flows.tracking import lifecycle, store
from cnnflow.flows.setup.config import compose_config
from cnnflow.flows.train import train_flow
from conftest import tiny_overrides

DEAD = f"{socket.gethostname()} 999999999 1.00 deadbeef"  # a pid no process has: the holder is gone


def _abandoned_run(cfg, **tags) -> str:
    """A run as `kill -9` leaves it: RUNNING, its lease held by a process that no longer exists."""
    store.use_store(cfg)
    client = MlflowClient()
    run_id = client.create_run(store.experiment_id(cfg), tags=tags).info.run_id
    client.log_param(run_id, "lease.1", DEAD)
    return run_id


def test_a_training_killed_before_its_first_checkpoint_is_trained_again_in_the_same_run(prefect_harness, mlflow_store,
                                                                                       idx_folder):
    overrides = tiny_overrides(idx_folder)
    cfg = compose_config("mnist", overrides)
    killed = _abandoned_run(cfg, config_hash=lifecycle.config_hash(cfg))

    assert train_flow("mnist", overrides) == killed
    finished = MlflowClient().get_run(killed)
    assert finished.info.status == "FINISHED" and "test_accuracy" in finished.data.metrics
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.config_hash != ''")) == 1
    assert not list(Path.cwd().glob(".*lock")), "the working folder keeps only what the user made"


def test_runs_closes_a_run_whose_process_is_gone_and_says_why(mlflow_store):
    cfg = compose_config("mnist", [])
    gone = _abandoned_run(cfg)
    store.use_store(cfg)
    client = MlflowClient()
    alive = client.create_run(store.experiment_id(cfg)).info.run_id  # held by this very process
    lifecycle.Lease(alive, timeout=120).acquire(heartbeats=False)
    unleased = client.create_run(store.experiment_id(cfg)).info.run_id  # from before leases: nothing says it is gone

    table = runs.runs_table()

    assert f"{gone[:8]}  mnist       KILLED" in table, table
    closed = client.get_run(gone)
    assert closed.info.status == "KILLED" and "process 999999999 on" in closed.data.tags["cnnflow.closed"]
    assert client.get_run(alive).info.status == "RUNNING" and client.get_run(unleased).info.status == "RUNNING"


def test_a_lock_run_is_bookkeeping_never_a_running_run(mlflow_store):
    store.use_store({})
    with lifecycle.store_wide_lock("start mnist"):
        locks = MlflowClient().search_runs([store.experiment_id({"experiment": store.LOCKS_EXPERIMENT})])
        assert [run.info.status for run in locks] == ["FINISHED"]


def test_a_search_trial_whose_process_died_keeps_its_one_child_run(mlflow_store, idx_folder):
    """A search killed in a trial's first epoch: the continued search trains that trial in the run it
    had (not in a second child run with the same search_trial), and the parent run is the same."""
    from cnnflow.flows.search import flow as searching, space
    from cnnflow.flows.search import study as studies
    from cnnflow.flows.tracking import names

    overrides = [*tiny_overrides(idx_folder), "search.trials=1", "search.pruner=none", "model.dropout_rate=choice(0.1,0.3)"]
    plan = space.planned("mnist", overrides)
    store.use_store(plan.cfg)
    study = studies.opened_study(plan)
    trial = studies.new_trial(study, plan, epochs=1)  # what the killed search had begun
    cfg = compose_config("mnist", trial.user_attrs["overrides"])
    killed = _abandoned_run(cfg, config_hash=lifecycle.config_hash(cfg), search=plan.study_name, search_trial="0")

    result = searching.search_flow("mnist", overrides)

    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.search = '{plan.study_name}'")
    assert [run.info.run_id for run in children] == [killed] and result["best_run"] == killed
    assert children[0].info.status == "FINISHED" and children[0].data.tags[names.STATE_TAG] == "complete"
    assert children[0].data.tags["mlflow.parentRunId"] == result["run_id"]


def test_a_trial_stopped_by_ctrl_c_says_so_in_its_run_and_stays_the_studys_to_take_up(mlflow_store, idx_folder,
                                                                                      monkeypatch):
    import pytest

    from cnnflow.flows import train
    from cnnflow.flows.search import flow as searching, space
    from cnnflow.flows.search import study as studies
    from cnnflow.flows.tracking import names

    overrides = [*tiny_overrides(idx_folder), "search.trials=1", "model.dropout_rate=choice(0.1,0.3)"]
    plan = space.planned("mnist", overrides)
    store.use_store(plan.cfg)
    study = studies.opened_study(plan)
    trial = studies.new_trial(study, plan, epochs=1)

    def stopped_before_its_first_checkpoint(experiment, overrides):
        cfg = compose_config(experiment, overrides)
        MlflowClient().create_run(store.experiment_id(cfg), tags={"search": plan.study_name, "search_trial": "0"})
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_flow", stopped_before_its_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        searching._trained_here(study, plan, trial, logger=None)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.search_trial = '0'")
    assert run.data.tags[names.STATE_TAG] == "stopped (Ctrl-C or SIGTERM); the same search command takes it up in this run"
    assert study.trials[0].state.name == "RUNNING"  # the next command takes it up


def test_a_command_ending_on_an_outage_does_not_wait_for_a_heartbeat_stuck_in_retries(mlflow_store, monkeypatch):
    """An outage past its bound ends the command in one line: its lease's heartbeat, which may sit in
    MLflow's retries for minutes against a server that is gone, is not waited for (the lease lapses)."""
    cfg = compose_config("mnist", [])
    store.use_store(cfg)
    lease = lifecycle.Lease(MlflowClient().create_run(store.experiment_id(cfg)).info.run_id, timeout=0.2)
    lease.acquire()  # a beat every 0.05 s
    beating, server_back = threading.Event(), threading.Event()

    def beat_in_retries():
        beating.set()
        server_back.wait(60)

    monkeypatch.setattr(lease, "beat", beat_in_retries)
    assert beating.wait(10), "no heartbeat began"
    releasing = threading.Thread(target=lease.release, kwargs={"outage": True})
    releasing.start()
    releasing.join(timeout=10)
    try:
        assert not releasing.is_alive() and not server_back.is_set(), "release waited for the stuck heartbeat"
    finally:
        server_back.set()
