"""Chaos on a cluster in a box (marked `cluster`; run by .ci/run after the default suite): three
workers and four training jobs submitted once; meanwhile one worker is killed with kill -9 in the
middle of an epoch, the MLflow server is down for more than a minute, and the Prefect server too,
the two outages overlapping for half a minute.
Nobody touches anything else. Two jobs have an outage bound shorter than the outages, so they stop
and must resume by themselves. Every job must end as one FINISHED MLflow run with each epoch's
metrics once, one registry version each, and the waiting command must report 4/4."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import kill_tree, start_worker, wait_until, worker_training
from test_outages import PrefectServer, TrackingServer

pytestmark = pytest.mark.cluster

EPOCHS = 50
OUTAGE = 65  # seconds: longer than jobs.crash_after, the shortest it may be


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """An MLflow server, a Prefect server, the pool `chaos` (dead workers' runs Crashed after 60 s,
    models registered as `chaos`) and three workers, each in a temporary folder of its own."""
    root = tmp_path_factory.mktemp("chaos")
    mlflow_server, prefect = TrackingServer(root), PrefectServer(root)
    mlflow_server.start()
    prefect.start()
    prefect.env.update(PREFECT_API_URL=prefect.url, PREFECT_WORKER_QUERY_SECONDS="2", TF_CPP_MIN_LOG_LEVEL="2")
    user = root / "user"
    user.mkdir()
    box = {"root": root, "mlflow": mlflow_server, "prefect": prefect, "user": user, "workers": {},
           "env": dict(prefect.env, MLFLOW_TRACKING_URI=mlflow_server.uri),
           "client": MlflowClient(tracking_uri=mlflow_server.uri)}
    try:
        deployed = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "deploy", "--pool", "chaos",
                                   "jobs.crash_after=60", "registry.name=chaos"], cwd=user, env=box["env"], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert deployed.returncode == 0, deployed.stdout
        box["workers"].update({name: start_worker("chaos", name, root, prefect.env) for name in ("w1", "w2", "w3")})
        yield box
    finally:
        for process in box["workers"].values():
            kill_tree(process.pid)
        for server in (mlflow_server, prefect):
            if server.process and server.process.poll() is None:
                server.stop()
        print({name: (root / f"{name}.log").read_text()[-3000:] for name in ("w1", "w2", "w3")
               if (root / f"{name}.log").exists()})


def _train(box, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "train", "--pool", "chaos", *args],
                            cwd=box["user"], env=box["env"], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _runs(box) -> list:
    client = box["client"]
    experiment = client.get_experiment_by_name("quickstart")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _training(box, count: int) -> list | None:
    started = [run for run in _runs(box) if box["client"].get_metric_history(run.info.run_id, "loss")]
    return started if len(started) >= count else None


def _job(run) -> tuple[str, float]:
    return run.data.tags["seed"], float(run.data.params["train.outage_timeout"])


def test_four_jobs_survive_a_dead_worker_and_both_servers_down_with_nobody_acting(box):
    """Two of the jobs have an outage bound (train.outage_timeout=20) shorter than the outages: they
    stop cleanly (Crashed, not Failed), are scheduled again and resume once the servers answer."""
    waiting = _train(box, ["--multirun", "seed=1,2", "train.outage_timeout=20,600", f"train.epochs={EPOCHS}"])
    wait_until(lambda: _training(box, 3), 300, "three jobs training")
    victim = _training(box, 3)[0]
    # the worker and its training, mid-epoch: a machine gone
    kill_tree(box["workers"].pop(worker_training(victim, box["workers"])).pid)

    box["mlflow"].stop()  # the two outages overlap for half a minute
    time.sleep(OUTAGE - 35)
    box["prefect"].stop()
    prefect_down = time.monotonic()
    time.sleep(35)
    box["mlflow"].start()
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - prefect_down)))
    box["prefect"].start()

    out, _ = waiting.communicate(timeout=900)
    assert waiting.returncode == 0, out
    assert "4/4 jobs succeeded" in out, out
    runs = _runs(box)
    assert sorted(map(_job, runs)) == [("1", 20), ("1", 600), ("2", 20), ("2", 600)]  # one MLflow run per job
    for run in runs:
        assert run.info.status == "FINISHED", _job(run)
        steps = [m.step for m in box["client"].get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(1, EPOCHS + 1)), (_job(run), steps)  # every epoch, once
    restarts = {run.info.run_id: int(run.data.tags.get("restarts", 0)) for run in runs}
    assert restarts[victim.info.run_id] >= 1
    assert all(restarts[run.info.run_id] >= 1 for run in runs if _job(run)[1] == 20), restarts
    versions = box["client"].search_model_versions("name = 'chaos'")
    assert sorted(v.run_id for v in versions) == sorted(restarts)  # one version each
