"""A cluster in a box (marked `cluster`; run by .ci/run after the default suite): an MLflow tracking
server with an artifact store of its own, a Prefect server, a process work pool and two workers,
each in its own temporary folder with no folder in common. What README's "Scaling out" promises:
a sweep spreads over the workers, a training whose worker is killed resumes on the other one from
the artifact store, and a run trained in one folder is continued and evaluated from another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from conftest import free_port, kill_tree, start_server, start_worker, wait_until, worker_training

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    mlflow_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api")
    servers = [
        start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
                 str(root / "artifacts"), "--workers", "1"],
                f"http://127.0.0.1:{mlflow_port}/health", env, root / "mlflow.log"),
        start_server([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                f"http://127.0.0.1:{prefect_port}/api/health", env, root / "prefect.log"),
    ]
    client_env = dict(env, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}")
    # a dead worker's run is Crashed a minute after its last heartbeat (default 5 minutes)
    deployed = _cnnflow(["deploy", "--pool", "box", "jobs.crash_after=60"], root / "deployer", client_env)
    assert deployed.returncode == 0, deployed.stdout
    workers = {name: start_worker("box", name, root, env) for name in ("w1", "w2")}
    yield {"root": root, "env": client_env, "workers": workers, "worker_env": env}
    for process in [*workers.values(), *servers]:
        kill_tree(process.pid)


def _cnnflow(args: list[str], folder: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", *args], cwd=folder, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _client(cluster) -> MlflowClient:
    return MlflowClient(tracking_uri=cluster["env"]["MLFLOW_TRACKING_URI"])


def test_a_sweep_on_a_pool_runs_one_job_on_each_worker(cluster):
    done = _cnnflow(["train", "--multirun", "--pool", "box", "seed=1,2", "train.epochs=1"], cluster["root"] / "user",
                    cluster["env"])
    assert done.returncode == 0, done.stdout
    assert "2/2 jobs succeeded" in done.stdout
    run_ids = [line.split("run ")[-1].strip() for line in done.stdout.splitlines() if line.startswith("  ok ")]
    runs = [_client(cluster).get_run(run_id) for run_id in run_ids]
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    assert sorted(run.data.tags["seed"] for run in runs) == ["1", "2"]
    logs = [(cluster["root"] / f"{name}.log").read_text() for name in ("w1", "w2")]
    assert [sum(f"done: run {run_id}" in log for run_id in run_ids) for log in logs] == [1, 1]  # one each


def test_a_training_whose_worker_is_killed_resumes_on_the_other_worker_by_itself(cluster, monkeypatch):
    """Nobody resubmits: Prefect hears no heartbeat, marks the run Crashed, resubmits it (flows/orchestration/healing.py),
    and the other worker resumes it from the artifact store, at the step of the newest position the
    dead worker uploaded (train.checkpoint_minutes: one every 0.6 s, a few an epoch); the waiting command reports one job."""
    import mlflow

    from cnnflow.flows.tracking import checkpoints

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster["env"]["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(cluster["env"]["MLFLOW_TRACKING_URI"])
    user = cluster["root"] / "user"
    user.mkdir(exist_ok=True)
    waiting = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "train", "--pool", "box", "seed=5",
                                "train.epochs=12", "train.checkpoint_minutes=0.01"], cwd=user,
                               env=cluster["env"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    client = _client(cluster)

    seen = []

    def inside_a_later_epoch():
        runs = client.search_runs(["1"], filter_string="tags.seed = '5'")
        stored = checkpoints._stored_states(runs[0].info.run_id) if runs else []
        # any slot, not only the newest: an epoch of the quickstart takes ~1.5 s, and its end's checkpoint
        # follows a position within a second, so a position is the newest too briefly to be seen
        if any(state["epoch"] >= 2 and state["batch"] for state, _ in stored):
            seen.append(runs[0])
        return seen

    wait_until(inside_a_later_epoch, 300, "a position inside epoch 3 or later in the artifact store")
    run = seen[0]
    worker = worker_training(run, cluster["workers"])
    kill_tree(cluster["workers"][worker].pid)  # the worker and its training: a machine gone
    shutil.rmtree(Path(run.data.tags["output_dir"]).parents[2])  # its temporary folder: as if another machine
    [(newest, _), *_] = checkpoints._stored_states(run.info.run_id)  # an epoch's end may have come between look and kill
    epochs_before = len(client.get_metric_history(run.info.run_id, "loss"))
    assert 2 <= epochs_before < 12

    out, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, out
    assert "1/1 jobs succeeded" in out and f"run {run.info.run_id} (1 restart after crashes)" in out, out
    assert out.count("restart 1 after a crash") == 1, out
    flow_run = out.split("(")[1].split(")")[0]
    states = httpx.get(f"{cluster['env']['PREFECT_API_URL']}/flow_run_states/", params={"flow_run_id": flow_run}).json()
    assert [s["message"] for s in states if s["type"] == "CRASHED"] == ["cnnflow: no heartbeat for 60 s"]  # Prefect's
    other = "w2" if worker == "w1" else "w1"
    log = (cluster["root"] / f"{other}.log").read_text()
    assert "restart 1 of this job after a crash" in log
    inside = f" and {newest['batch']} steps of epoch {newest['epoch'] + 1}" if newest["batch"] else ";"
    assert f"resuming MLflow run {run.info.run_id} after epoch {newest['epoch']}{inside}" in log
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 13))  # each once
    cluster["workers"][worker] = start_worker("box", worker, cluster["root"], cluster["worker_env"])  # as it was


def test_a_worker_stopped_with_sigterm_hands_its_training_back_at_once(cluster):
    """flows/orchestration/worker.py: the training stops cleanly (KILLED), Prefect marks it Crashed and it is
    resubmitted at once, not a heartbeat timeout later; the other worker resumes it."""
    (cluster["root"] / "user").mkdir(exist_ok=True)
    waiting = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "train", "--pool", "box", "seed=6",
                                "train.epochs=10"], cwd=cluster["root"] / "user", env=cluster["env"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    client = _client(cluster)

    def two_epochs():
        runs = client.search_runs(["1"], filter_string="tags.seed = '6'")
        return runs[0] if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 2 else None

    wait_until(two_epochs, 240, "two epochs")
    run = two_epochs()
    worker = worker_training(run, cluster["workers"])
    cluster["workers"][worker].terminate()
    assert cluster["workers"][worker].wait(timeout=40) == 0
    assert client.get_run(run.info.run_id).info.status == "KILLED"  # stopped cleanly, before the worker
    log = (cluster["root"] / f"{worker}.log").read_text()
    assert "handing 1 back to the pool" in log and "still running" not in log

    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out
    assert f"run {run.info.run_id} (1 restart after crashes)" in out, out
    flow_run = out.split("(")[1].split(")")[0]
    states = httpx.get(f"{cluster['env']['PREFECT_API_URL']}/flow_run_states/", params={"flow_run_id": flow_run}).json()
    assert [s["message"] for s in states if s["type"] == "CRASHED"] == ["Execution was aborted by a termination signal."]
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["restart_epochs"].endswith("h")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 11))
    cluster["workers"][worker] = start_worker("box", worker, cluster["root"], cluster["worker_env"])


def test_a_run_trained_in_one_folder_is_continued_and_evaluated_from_another(cluster):
    folder_a, folder_b = cluster["root"] / "a", cluster["root"] / "b"
    env = {k: v for k, v in cluster["env"].items() if k != "PREFECT_API_URL"}  # a CLI user: flows run in process
    trained = _cnnflow(["train", "train.epochs=1", "seed=7"], folder_a, env)
    assert trained.returncode == 0, trained.stdout
    run_id = trained.stdout.split("done: run ")[1].split(",")[0]
    shutil.rmtree(folder_a)
    continued = _cnnflow(["continue", run_id[:8], "--epochs", "1"], folder_b, env)
    assert continued.returncode == 0, continued.stdout
    evaluated = _cnnflow(["evaluate", run_id, "valid"], folder_b, env)
    assert evaluated.returncode == 0, evaluated.stdout
    assert "on valid: accuracy" in evaluated.stdout
    assert [m.step for m in _client(cluster).get_metric_history(run_id, "loss")] == [1, 2]


def test_a_search_on_a_pool_trains_a_trial_on_each_worker_prunes_and_survives_its_command(cluster):
    """The workers share only the servers with the search command: each trial reports its epochs to
    its MLflow run, and the command's verdicts stop the weak ones there. The command is killed while
    trials train; the same command again takes them up and submits nothing twice."""
    import optuna

    for name, process in cluster["workers"].items():  # each worker up, whatever an earlier test left
        if process.poll() is not None:
            cluster["workers"][name] = start_worker("box", name, cluster["root"], cluster["worker_env"])
    user = cluster["root"] / "searcher"
    user.mkdir(exist_ok=True)
    storage = f"sqlite:///{user / 'optuna.db'}"
    study = optuna.create_study(study_name="pool-search", storage=storage, direction="maximize")
    for rate in (0.003, 0.003, 1e-9, 1e-9):  # two good trials side by side, then two that learn nothing
        study.enqueue_trial({"optimizer.learning_rate": rate}, skip_if_exists=False)
    command = ["search", "--pool", "box", "train.epochs=3", "search.trials=4", "search.pruner=median",
               "search.startup_trials=1", "search.name=pool-search", f"search.storage={storage}",
               "optimizer.learning_rate=choice(0.003,1e-9)"]
    client = _client(cluster)
    first = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", *command], cwd=user, env=cluster["env"],
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: client.search_runs(["1"], filter_string="tags.search = 'pool-search' and "
                                                               "tags.`search.report` != ''"), 300, "a trial's first epoch")
    kill_tree(first.pid)  # the search command dies; its trials train on, on the workers
    first.communicate(timeout=30)
    done = _cnnflow(command, user, cluster["env"], timeout=900)  # the same command again
    assert done.returncode == 0, done.stdout
    assert "continuing study pool-search" in done.stdout, done.stdout
    assert "search pool-search: 4 trials (2 pruned)" in done.stdout, done.stdout
    runs = {int(r.data.tags["search_trial"]): r for r in client.search_runs(
        ["1"], filter_string="tags.search = 'pool-search'")}
    assert len(client.search_runs(["1"], filter_string="tags.search = 'pool-search'")) == 4  # none trained twice
    assert [runs[i].data.tags["search.state"].partition(":")[0] for i in range(4)] == [
        "complete", "complete", "pruned at epoch 1", "pruned at epoch 1"]  # a pruned trial's tag goes on with why
    assert [len(client.get_metric_history(runs[i].info.run_id, "loss")) for i in range(4)] == [3, 3, 1, 1]
    logs = [(cluster["root"] / f"{name}.log").read_text() for name in ("w1", "w2")]
    assert all(any(f"done: run {run.info.run_id}" in log for run in runs.values()) for log in logs)  # both trained
    assert len({run.data.tags["mlflow.parentRunId"] for run in runs.values()}) == 1
