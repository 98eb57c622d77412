"""Chaos on a cluster in a box (marked `cluster`; run by .ci/run after the default suite): three
workers and four training jobs submitted once; meanwhile one worker is killed with kill -9 in the
middle of an epoch, the Prefect server is down for more than a minute, then the MLflow server.
Nobody touches anything else. Every job must end as one FINISHED MLflow run with each epoch's
metrics once, one registry version each, and the waiting command must report 4/4."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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


def test_four_jobs_survive_a_dead_worker_and_both_servers_down_with_nobody_acting(tmp_path):
    mlflow_server, prefect = TrackingServer(tmp_path), PrefectServer(tmp_path)
    mlflow_server.start()
    prefect.start()
    prefect.env.update(PREFECT_API_URL=prefect.url, PREFECT_WORKER_QUERY_SECONDS="2", TF_CPP_MIN_LOG_LEVEL="2")
    user_env = dict(prefect.env, MLFLOW_TRACKING_URI=mlflow_server.uri)
    user = tmp_path / "user"
    user.mkdir()
    workers = {}
    try:
        deployed = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "deploy", "--pool", "chaos",
                                   "jobs.crash_after=60", "registry.name=chaos"], cwd=user, env=user_env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert deployed.returncode == 0, deployed.stdout
        workers = {name: _worker(name, tmp_path, prefect) for name in ("w1", "w2", "w3")}
        waiting = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "train", "--multirun", "--pool", "chaos",
                                    "seed=1,2,3,4", f"train.epochs={EPOCHS}"], cwd=user, env=user_env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        client = MlflowClient(tracking_uri=mlflow_server.uri)

        def jobs():
            experiment = client.get_experiment_by_name("quickstart")
            return client.search_runs([experiment.experiment_id]) if experiment else []

        def training(count: int):
            runs = jobs()
            started = [run for run in runs if client.get_metric_history(run.info.run_id, "loss")]
            return started if len(started) >= count else None

        wait_until(lambda: training(3), 300, "three jobs training")
        victim = training(3)[0]
        trainer = int(victim.data.params["lease.1"].split()[1])
        name = next(name for name, process in workers.items()
                    if trainer in [child.pid for child in __import__("psutil").Process(process.pid).children(True)])
        kill_tree(workers.pop(name).pid)  # the worker and its training, mid-epoch: a machine gone

        prefect.stop()
        time.sleep(OUTAGE)
        prefect.start()
        mlflow_server.stop()
        time.sleep(OUTAGE)
        mlflow_server.start()

        out, _ = waiting.communicate(timeout=900)
        assert waiting.returncode == 0, out
        assert "4/4 jobs succeeded" in out, out
        runs = jobs()
        assert sorted(run.data.tags["seed"] for run in runs) == ["1", "2", "3", "4"]  # one run per job
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags["seed"]
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, EPOCHS + 1))
        assert int(client.get_run(victim.info.run_id).data.tags["restarts"]) >= 1
        versions = client.search_model_versions("name = 'chaos'")
        assert sorted(v.run_id for v in versions) == sorted(run.info.run_id for run in runs)  # one version each
    finally:
        for process in workers.values():
            kill_tree(process.pid)
        for server in (mlflow_server, prefect):
            if server.process and server.process.poll() is None:
                server.stop()
        print({name: (tmp_path / f"{name}.log").read_text()[-3000:] for name in ("w1", "w2", "w3")
               if (tmp_path / f"{name}.log").exists()})
