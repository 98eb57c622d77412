"""Outages of a real MLflow tracking server and of a real Prefect server during a training (marked
`cluster`; run by .ci/run after the default suite): the server is stopped for real and started again
on the same port and store. A short outage is ridden out: the training goes on, says when the outage
starts and ends, and every epoch's metrics reach the run once, in order (and the Prefect flow run
ends Completed). An outage past train.outage_timeout ends the training in one line with exit code 5,
its run neither FAILED nor lost, and the same command resumes it. A search waits out an outage
between its trials and goes on with the same trial; past the bound it stops in one line, and the
same command continues its study with no trial counted twice."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from conftest import free_port, kill_tree, make_idx_folder, start_server, wait_until
from conftest import tiny_overrides as tiny_fast

# The chapter's 3.3M-parameter model: these trainings must outlast an outage of the servers (fast_cnn's
# 60 tiny epochs ended within the 15 s a test keeps the Prefect server down).
tiny_overrides = functools.partial(tiny_fast, model="mnist_cnn")

pytestmark = pytest.mark.cluster


class Server:
    """A server process on a fixed port and store, stopped and started at will."""

    def __init__(self, command: list[str], health: str, env: dict, log: Path):
        self.command, self.health, self.env, self.log = command, health, env, log
        self.process = None

    def start(self) -> None:
        self.process = start_server(self.command, self.health, self.env, self.log)

    def stop(self) -> None:
        kill_tree(self.process.pid)
        self.process.wait()


class TrackingServer(Server):
    """`mlflow server` with its own SQLite store and artifact folder."""

    def __init__(self, root: Path):
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        super().__init__([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
                          str(root / "artifacts"), "--workers", "1"], f"{self.uri}/health",
                         {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, root / "mlflow.log")


def _running(server: Server):
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tracking_server(tmp_path):
    yield from _running(TrackingServer(tmp_path))


def _train(folder: Path, overrides: list[str], **settings: str) -> subprocess.Popen:
    """`cnnflow train experiment=mnist` in `folder`, with no MLflow or Prefect settings but `settings`."""
    folder.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **settings)
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "train", "experiment=mnist", *overrides],
                            cwd=folder, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _train_against(folder: Path, server: TrackingServer, overrides: list[str]) -> subprocess.Popen:
    # a sample a second: MLflow's default (10 s) can outlast a tiny training and log no system metric
    return _train(folder, overrides, MLFLOW_TRACKING_URI=server.uri, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")


def _the_run(server: TrackingServer):
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return runs[0] if runs else None


def _wait_for_epochs(server: TrackingServer, count: int, process: subprocess.Popen) -> str:
    """The run's id once `count` epochs of it are in the store."""
    def logged():
        assert process.poll() is None, process.stdout.read()
        run = _the_run(server)
        return run and len(_epochs_logged(server, run.info.run_id)) >= count

    wait_until(logged, 240, f"{count} epochs in the run")
    return _the_run(server).info.run_id


def _epochs_logged(server: TrackingServer, run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri=server.uri).get_metric_history(run_id, "loss")]


def _finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        return process.communicate(timeout=timeout)[0]
    finally:
        kill_tree(process.pid)


def test_a_tracking_server_down_for_half_a_minute_is_ridden_out(tracking_server, tmp_path, idx_folder):
    epochs = 60
    process = _train_against(tmp_path / "user", tracking_server,
                              tiny_overrides(idx_folder, epochs=epochs) + ["plots=none", "train.checkpoint_every=10"])
    run_id = _wait_for_epochs(tracking_server, 2, process)
    tracking_server.stop()
    time.sleep(30)
    assert process.poll() is None  # trained on
    tracking_server.start()
    out = _finish(process, 600)
    assert process.returncode == 0, out
    assert out.count("fails: it is unreachable. Training goes on") == 1, out
    assert out.count("answers again after") == 1, out
    assert _epochs_logged(tracking_server, run_id) == list(range(1, epochs + 1))  # each once, in order
    run = MlflowClient(tracking_uri=tracking_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert any(key.startswith("system/") for key in run.data.metrics)


def test_positions_uploaded_beside_the_training_ride_out_a_minute_long_outage(tracking_server, tmp_path, monkeypatch):
    """A position every 0.6 s (train.checkpoint_minutes=0.01), several an epoch, goes to the artifact
    store beside the training. The server is down for a minute: the training goes on, its positions
    wait in the outbox, and once the server answers, positions taken after it came back reach the
    store. Then the machine dies (kill -9, its run folder gone): the same command resumes at the newest
    stored position, and its epochs reach the run once each, in order."""
    import shutil

    import mlflow

    from cnnflow.flows.tracking.checkpoints import read_checkpoint
    from cnnflow.flows.tracking import checkpoints

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    mlflow.set_tracking_uri(tracking_server.uri)  # lifecycle reads the artifact store through it
    idx = make_idx_folder(tmp_path / "idx", train=2400)
    overrides = [o for o in tiny_overrides(idx, epochs=1000) if not o.startswith("data.train_size")] + [
        "data.train_size=2000", "data.batch_size=32", "plots=none", "train.checkpoint_minutes=0.01"]
    process = _train_against(tmp_path / "user", tracking_server, overrides)
    run_id = _wait_for_epochs(tracking_server, 1, process)

    def newest_stored() -> tuple[int, int]:
        states = checkpoints._stored_states(run_id)
        return checkpoints._place(states[0][0]) if states else (0, 0)

    wait_until(lambda: newest_stored()[1], 120, "a position inside an epoch in the artifact store")
    before = newest_stored()
    tracking_server.stop()
    time.sleep(60)
    assert process.poll() is None  # trained on
    folder = _the_run_folder(tmp_path / "user", run_id)
    taken_while_down = checkpoints._place(read_checkpoint(folder))  # the newest that reads (one may be replaced)
    assert taken_while_down > before
    tracking_server.start()
    wait_until(lambda: newest_stored() > taken_while_down, 180, "a position taken after the outage in the store")
    os.killpg(process.pid, 9)
    out = _finish(process, 30)
    shutil.rmtree(folder)  # another machine takes the job up
    newest = newest_stored()
    assert out.count("fails: it is unreachable. Training goes on") == 1, out
    assert out.count("answers again after") == 1, out

    again = _train_against(tmp_path / "user", tracking_server, overrides)  # the same command
    wait_until(lambda: len(_epochs_logged(tracking_server, run_id)) >= newest[0] + 2, 300, "two epochs after the resume")
    os.killpg(again.pid, 2)  # Ctrl-C: enough of the 1000 epochs
    out = _finish(again, 120)
    assert again.returncode == 130, out
    inside = f" and {newest[1]} steps of epoch {newest[0] + 1}" if newest[1] else ";"
    assert f"resuming MLflow run {run_id} after epoch {newest[0]}{inside}" in out, out
    logged = _epochs_logged(tracking_server, run_id)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= newest[0] + 2  # each once, in order


def _the_run_folder(user: Path, run_id: str) -> Path:
    [folder] = user.glob(f"outputs/*/{run_id}")
    return folder


def test_an_outage_past_its_bound_ends_in_one_line_and_the_same_command_resumes(tracking_server, tmp_path, idx_folder):
    epochs = 40
    overrides = tiny_overrides(idx_folder, epochs=epochs) + ["plots=none", "train.outage_timeout=5"]
    process = _train_against(tmp_path / "user", tracking_server, overrides)
    run_id = _wait_for_epochs(tracking_server, 2, process)
    tracking_server.stop()
    stopped = time.monotonic()
    out = _finish(process, 120)
    assert process.returncode == 5, out
    assert time.monotonic() - stopped < 60
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith(f"cnnflow: error: the MLflow store {tracking_server.uri} has failed "
                                                    f"for "), out
    assert "longer than train.outage_timeout=5" in out.strip().splitlines()[-1]

    tracking_server.start()
    assert _the_run(tracking_server).info.status == "RUNNING"  # not FAILED: it is resumable
    again = _train_against(tmp_path / "user", tracking_server, overrides)  # the same command
    out = _finish(again, 600)
    assert again.returncode == 0, out
    assert f"resuming MLflow run {run_id} after epoch" in out
    assert _epochs_logged(tracking_server, run_id) == list(range(1, epochs + 1))  # what the store missed, logged again
    assert MlflowClient(tracking_uri=tracking_server.uri).get_run(run_id).info.status == "FINISHED"


def _search(folder: Path, server: TrackingServer, idx: Path, *extra: str) -> subprocess.Popen:
    """`cnnflow search` of three 6-epoch trials against `server` (its Optuna study in `folder`)."""
    folder.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", MLFLOW_TRACKING_URI=server.uri)
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "search", "experiment=mnist",
                             *tiny_overrides(idx, epochs=6), "plots=none", "search.trials=3", "search.pruner=none",
                             "search.name=outage", "model.dropout_rate=choice(0.1,0.2,0.3)", *extra],
                            cwd=folder, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _trials_in(server: TrackingServer, folder: Path) -> tuple[list[str], list]:
    """The study's trial states, and the MLflow runs of its trials."""
    import optuna

    states = [t.state.name for t in optuna.load_study(study_name="outage", storage=f"sqlite:///{folder / 'optuna.db'}").trials]
    client = MlflowClient(tracking_uri=server.uri)
    return states, client.search_runs([client.get_experiment_by_name("mnist").experiment_id],
                                      filter_string="tags.search = 'outage'")


def test_a_search_waits_out_a_tracking_server_outage_between_trials(tracking_server, tmp_path, idx_folder):
    process = _search(tmp_path, tracking_server, idx_folder)
    out = _wait_for_line(process, "search: trial 0 (")  # trial 0 starts ...
    out += _wait_for_line(process, ": complete after 6 epochs")  # ... and is told; trial 1 is about to start
    tracking_server.stop()
    time.sleep(20)
    assert process.poll() is None, out  # waits for the store rather than failing trials
    tracking_server.start()
    out += _finish(process, 600)
    assert process.returncode == 0, out
    assert out.count(f"search: the MLflow store {tracking_server.uri} fails") == 1, out
    assert out.count(f"search: the MLflow store {tracking_server.uri} answers again after") == 1, out
    # no trial failed ("trial 1 (...): failed (why)"); the lease's heartbeat may say it failed meanwhile
    assert "Traceback" not in out and ": failed (" not in out, out
    states, runs = _trials_in(tracking_server, tmp_path)
    assert states == ["COMPLETE"] * 3  # none failed and replaced for the outage
    assert sorted(r.data.tags["search_trial"] for r in runs) == ["0", "1", "2"]  # each trained once
    client = MlflowClient(tracking_uri=tracking_server.uri)
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))


def test_a_search_outage_past_its_bound_ends_in_one_line_and_the_same_command_continues(tracking_server, tmp_path,
                                                                                        idx_folder):
    process = _search(tmp_path, tracking_server, idx_folder, "train.outage_timeout=5")
    out = _wait_for_line(process, ": complete after 6 epochs")
    tracking_server.stop()
    out += _finish(process, 120)
    assert process.returncode == 5, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"cnnflow: error: the MLflow store {tracking_server.uri} has failed for "), out
    assert "longer than train.outage_timeout=5" in last and "the search continues its study" in last, out

    tracking_server.start()
    again = _search(tmp_path, tracking_server, idx_folder, "train.outage_timeout=5")  # the same command
    out = _finish(again, 600)
    assert again.returncode == 0, out
    assert "continuing study outage: 1 trial done" in out, out
    states, runs = _trials_in(tracking_server, tmp_path)
    assert states == ["COMPLETE"] * 3
    assert sorted(r.data.tags["search_trial"] for r in runs) == ["0", "1", "2"]


class PrefectServer(Server):
    """`prefect server start` with its own database."""

    def __init__(self, root: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        super().__init__([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                         f"{self.url}/health", env, root / "prefect.log")

    def flow_run_states(self) -> list[str]:
        return [run["state_type"] for run in httpx.post(f"{self.url}/flow_runs/filter", json={}).json()]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    yield from _running(PrefectServer(tmp_path_factory.mktemp("prefect")))


def _train_under(folder: Path, server: PrefectServer, overrides: list[str]) -> subprocess.Popen:
    """Its flow and task runs go to `server`; its MLflow store is SQLite in `folder`."""
    return _train(folder, overrides, PREFECT_API_URL=server.url)


def _local_run(folder: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("mnist").experiment_id])[0]


def _wait_for_line(process: subprocess.Popen, text: str) -> str:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the training ended before {text!r}:\n{''.join(seen)}")


def test_a_prefect_server_down_mid_training_is_ridden_out(prefect_server, tmp_path, idx_folder):
    before = prefect_server.flow_run_states().count("COMPLETED")
    process = _train_under(tmp_path, prefect_server, tiny_overrides(idx_folder, epochs=60) + ["plots=none"])
    out = _wait_for_line(process, "epoch 2/60  ")
    prefect_server.stop()
    time.sleep(15)
    assert process.poll() is None  # trained on, or waits for the server
    prefect_server.start()
    out += _finish(process, 600)
    assert process.returncode == 0, out
    assert out.count(f"the Prefect server {prefect_server.url} fails: it is unreachable") == 1, out
    assert out.count(f"the Prefect server {prefect_server.url} answers again after") == 1, out
    assert out.index("fails: it is unreachable") < out.index("epoch 60/60"), out  # said in the training step
    assert "Traceback" not in out and "EventsWorker" not in out and "Error logging to API" not in out, out
    client, run = _local_run(tmp_path)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 61))
    assert prefect_server.flow_run_states().count("COMPLETED") == before + 1  # the flow run's end reached Prefect


def test_a_training_that_loses_its_prefect_server_for_good_finishes_its_work_and_exits_0(prefect_server, tmp_path,
                                                                                        idx_folder):
    """Prefect is the orchestrator, not the record: the training tests, draws and registers its model,
    ends its MLflow run FINISHED and exits 0 with one warning; a new command then says in one line,
    within seconds, that the server does not answer (exit 5), and creates nothing."""
    process = _train_under(tmp_path, prefect_server, tiny_overrides(idx_folder, epochs=6))
    out = _wait_for_line(process, "epoch 2/6  ")
    prefect_server.stop()
    try:
        out += _finish(process, 300)
        assert process.returncode == 0, out
        assert "record there is incomplete" in out and "Traceback" not in out, out
        client, run = _local_run(tmp_path)
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics, out
        assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")}, out  # the figures too

        began = time.monotonic()
        again = _train_under(tmp_path, prefect_server, tiny_overrides(idx_folder, epochs=6) + ["seed=2"])
        out = _finish(again, 120)
        assert again.returncode == 5 and time.monotonic() - began < 60, out
        assert out.strip().splitlines()[-1].startswith(f"cnnflow: error: cannot reach the Prefect server "
                                                       f"{prefect_server.url} ("), out
        assert len(client.search_runs([run.info.experiment_id])) == 1  # nothing was created
    finally:
        prefect_server.start()
