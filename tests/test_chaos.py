"""Chaos on a cluster in a box (marked `cluster`; run by .ci/run after the default suite): three
workers and four training jobs submitted once; meanwhile one worker is killed with kill -9 in the
middle of an epoch, the Prefect server is down for more than a minute, then the MLflow server.
Nobody touches anything else. Every job must end as one FINISHED MLflow run with each epoch's
metrics once, one registry version each, and the waiting command must report 4/4."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from conftest import kill_tree, wait_until
from test_outages import PrefectServer, TrackingServer

pytestmark = pytest.mark.cluster

EPOCHS = 50
OUTAGE = 65  # seconds: longer than jobs.crash_after, the shortest it may be


def _worker(name: str, root: Path, prefect: PrefectServer) -> subprocess.Popen:
    (root / name).mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "chaos", "--name", name, "--limit", "1"],
        cwd=root / name, env=prefect.env, stdout=open(root / f"{name}.log", "a"), stderr=subprocess.STDOUT,
        start_new_session=True)


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
        box["workers"].update({name: _worker(name, root, prefect) for name in ("w1", "w2", "w3")})
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


def _runs(box, seeds: list[int]) -> list:
    client = box["client"]
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run for run in runs if int(run.data.tags["seed"]) in seeds]


def _training(box, seeds: list[int], count: int) -> list | None:
    started = [run for run in _runs(box, seeds) if box["client"].get_metric_history(run.info.run_id, "loss")]
    return started if len(started) >= count else None


def _assert_finished_once(box, seeds: list[int], epochs: int) -> list:
    runs = _runs(box, seeds)
    assert sorted(int(run.data.tags["seed"]) for run in runs) == sorted(seeds)  # one MLflow run per job
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags["seed"]
        steps = [m.step for m in box["client"].get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(1, epochs + 1)), (run.data.tags["seed"], steps)
    return runs


def test_four_jobs_survive_a_dead_worker_and_both_servers_down_with_nobody_acting(box):
    seeds = [1, 2, 3, 4]
    waiting = _train(box, ["--multirun", "seed=1,2,3,4", f"train.epochs={EPOCHS}"])
    wait_until(lambda: _training(box, seeds, 3), 300, "three jobs training")
    victim = _training(box, seeds, 3)[0]
    trainer = int(victim.data.params["lease.1"].split()[1])
    name = next(name for name, process in box["workers"].items()
                if trainer in [child.pid for child in psutil.Process(process.pid).children(recursive=True)])
    kill_tree(box["workers"].pop(name).pid)  # the worker and its training, mid-epoch: a machine gone

    box["prefect"].stop()
    time.sleep(OUTAGE)
    box["prefect"].start()
    box["mlflow"].stop()
    time.sleep(OUTAGE)
    box["mlflow"].start()

    out, _ = waiting.communicate(timeout=900)
    assert waiting.returncode == 0, out
    assert "4/4 jobs succeeded" in out, out
    runs = _assert_finished_once(box, seeds, EPOCHS)
    assert int(box["client"].get_run(victim.info.run_id).data.tags["restarts"]) >= 1
    versions = box["client"].search_model_versions("name = 'chaos'")
    assert sorted(v.run_id for v in versions) == sorted(run.info.run_id for run in runs)  # one version each


def test_a_job_stopped_by_an_outage_past_its_bound_resumes_by_itself_once_the_server_is_back(box):
    """Past train.outage_timeout the training stops (Crashed, not Failed), is scheduled again, and its
    later attempts, after their back-off, resume it once the MLflow server answers."""
    waiting = _train(box, ["seed=9", "train.epochs=20", "train.outage_timeout=10"])
    wait_until(lambda: _training(box, [9], 1), 300, "the job training")
    box["mlflow"].stop()
    time.sleep(40)
    box["mlflow"].start()
    out, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, out
    assert "1/1 jobs succeeded" in out and "restart" in out, out
    [run] = _assert_finished_once(box, [9], 20)
    assert int(run.data.tags["restarts"]) >= 1
