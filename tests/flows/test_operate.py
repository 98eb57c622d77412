"""Operating cnnflow: scheduled retraining on growing subsets, the runs table, and `cnnflow serve`
against a real Prefect server started here on loopback."""

import signal
import subprocess
import sys
from datetime import datetime, timezone

import mlflow
import pytest
from mlflow import MlflowClient

from cnnflow.flows.retrain import checked_sizes, finished_runs, next_subset_size, retrain_flow, sequence_points
from cnnflow.flows.runs import runs_table
from cnnflow.components.errors import RunError, SettingsError
from cnnflow.flows.setup.config import compose_config
from conftest import deployment, make_idx_folder, wait_until

SIZES = [16000, 32000, 64000, "full"]


def test_next_subset_size_grows_then_stays_full():
    assert [next_subset_size(SIZES, n) for n in range(6)] == [16000, 32000, 64000, "full", "full", "full"]
    with pytest.raises(SettingsError, match=r"retrain.sizes=\[\]: should be a list of counts"):
        compose_config("mnist", ["retrain.sizes=[]"])


def test_the_sequence_is_read_back_from_finished_runs(mlflow_store):
    cfg = {"experiment": "faces", "retrain": {"schedule": "weekly"}}
    mlflow.set_experiment("faces")
    sizes_seen = []
    for status in ("FINISHED", "FAILED", "FINISHED", "FINISHED"):  # three simulated runs finish, one fails
        size = next_subset_size(SIZES, len(finished_runs(cfg, "weekly")))
        sizes_seen.append(size)
        with mlflow.start_run(tags={"retrain_schedule": "weekly", "retrain_subset_size": str(size)}):
            pass
        if status != "FINISHED":
            MlflowClient().set_terminated(mlflow.last_active_run().info.run_id, status)
    assert sizes_seen == [16000, 32000, 32000, 64000]  # the failed run is retried at the same size
    assert next_subset_size(SIZES, len(finished_runs(cfg, "weekly"))) == "full"


@pytest.mark.slow
def test_retrain_flow_trains_the_next_size_and_tags_the_sequence(prefect_harness, mlflow_store, tmp_path, capsys):
    idx = make_idx_folder(tmp_path / "idx")
    overrides = [f"data.path={idx}", "data.source=idx", "data.valid_size=40", "data.shuffle_buffer=100",
                 "train.epochs=1", "retrain.sizes=[60,120]"]
    first, second = retrain_flow("mnist", overrides), retrain_flow("mnist", overrides)
    tags = [MlflowClient().get_run(run_id).data.tags for run_id in (first, second)]
    assert [t["split.train_size"] for t in tags] == ["60", "120"]
    assert [t["retrain_sequence"] for t in tags] == ["1", "2"] and tags[0]["retrain_schedule"] == "mnist-retrain"
    assert tags[0]["retrain_previous_champion"] == "none"
    assert tags[0]["registry.outcome"] == "registered mnist v1 as champion"
    assert tags[1]["retrain_previous_champion"].startswith("mnist v1")
    # the sequence's figure, in the newest run: validation accuracy against training images, run by run
    points = sequence_points(finished_runs(compose_config("mnist", overrides), "mnist-retrain"))
    accuracies = [MlflowClient().get_run(run_id).data.metrics["val_accuracy"] for run_id in (first, second)]
    assert points == [(60, accuracies[0], first), (120, accuracies[1], second)]
    assert "figures/retrain_sequence.png" in {a.path for a in MlflowClient().list_artifacts(second, "figures")}
    with pytest.raises(SettingsError, match=r"retrain.sizes=\[60, 500\]: 500 is more than the 200 training examples"):
        retrain_flow("mnist", overrides[:-1] + ["retrain.sizes=[60,500]"])
    default = compose_config("mnist", overrides[:-1])  # [16000, 32000, 64000, full] on a 200-image pool
    assert checked_sizes(default, overrides[:-1]) == ["full"]
    table = runs_table("mnist")
    assert first[:8] in table and second[:8] in table and "best val_acc" in table
    with pytest.raises(RunError, match="no MLflow experiment 'nope'"):
        runs_table("nope")


@pytest.mark.slow
def test_a_warm_started_retraining_begins_from_the_champions_weights(prefect_harness, mlflow_store, tmp_path,
                                                                     monkeypatch):
    import keras
    import numpy as np

    from cnnflow.components.callbacks import EpochMetrics

    starts, first_step = [], EpochMetrics.on_train_batch_begin

    def kept_start(self, batch, logs=None):  # the weights each training's first step begins from
        if not self._first_step_logged:
            starts.append(self.model.get_weights())
        first_step(self, batch, logs)

    monkeypatch.setattr(EpochMetrics, "on_train_batch_begin", kept_start)
    idx = make_idx_folder(tmp_path / "idx")
    overrides = [f"data.path={idx}", "data.source=idx", "data.valid_size=40", "data.shuffle_buffer=100",
                 "train.epochs=1", "retrain.sizes=[60,120]", "retrain.warm_start=true", "plots=none"]
    first, second = retrain_flow("mnist", overrides), retrain_flow("mnist", overrides)
    tags = [MlflowClient().get_run(run_id).data.tags for run_id in (first, second)]
    assert tags[0]["retrain_warm_start"] == "no"  # nothing to start from yet
    assert tags[1]["retrain_warm_start"] == "models:/mnist/1"
    champion = keras.models.load_model(f"{tags[0]['output_dir']}/model.keras")
    start = starts[1]
    assert all(np.array_equal(a, b) for a, b in zip(champion.get_weights(), start))
    with pytest.raises(SettingsError, match="train.init_from=models:/mnist/1: its weights .* do not fit"):
        retrain_flow("mnist", overrides[:-2] + ["retrain.warm_start=false", "model=fast_cnn",
                                                 "train.init_from=models:/mnist/1"])


def start_serving(url, env, cwd, idx):
    args = ["serve", "experiment=mnist", "data.source=idx", f"data.path={idx}", "data.train_size=200",
            "data.valid_size=40", "data.shuffle_buffer=100", "train.epochs=1", "retrain.cron=0 3 * * 0"]
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", *args], cwd=cwd,
                            env=dict(env, PREFECT_API_URL=url, TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.cluster  # a real Prefect server and `cnnflow serve`
def test_serve_runs_deployments_from_the_api_and_keeps_schedules(prefect_server, tmp_path, monkeypatch):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    store = tmp_path / "mlflow.db"
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    idx = make_idx_folder(tmp_path / "idx")
    serving = start_serving(url, env, tmp_path, idx)
    try:
        wait_until(lambda: deployment(url, "retrain/mnist") is not None, 120, "the deployments")
        form = deployment(url, "train/mnist")  # the UI's run form: a list of recipes, typed fields, the served values
        fields = form.parameter_openapi_schema["properties"]
        assert "mnist_small" in fields["experiment"]["enum"] and "key=value" in fields["overrides"]["description"]
        assert {"integer"} == {kind.get("type") for kind in fields["epochs"]["anyOf"]} - {"null"}
        assert form.parameters == {"experiment": "mnist", "data_source": "idx", "data_path": str(idx),
                                   "train_size": 200, "epochs": 1,
                                   "overrides": ["data.valid_size=40", "data.shuffle_buffer=100", "retrain.cron=0 3 * * 0"]}
        with temporary_settings({PREFECT_API_URL: url}):
            flow_run = run_deployment("train/mnist", timeout=300)  # as the UI's "Run" button does
        assert flow_run.state.is_completed(), flow_run.state
        mlflow.set_tracking_uri(f"sqlite:///{store}")
        [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("mnist").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["split.train_size"] == "200"
        search_form = deployment(url, "search/mnist")  # a search from the UI: the space goes into the overrides
        assert search_form.parameters["pool"] is None and search_form.parameters["overrides"][-1] == "search=default"
        with temporary_settings({PREFECT_API_URL: url}):
            searched = run_deployment("search/mnist", timeout=600, parameters={"overrides": [
                *search_form.parameters["overrides"], "search.trials=2", "model.dropout_rate=choice(0.1,0.2)"]})
        assert searched.state.is_completed(), searched.state
        trials = MlflowClient().search_runs([run.info.experiment_id], filter_string="tags.search != ''")
        assert sorted(t.data.tags["search_trial"] for t in trials) == ["0", "1"]
        [parent] = MlflowClient().search_runs([run.info.experiment_id], filter_string="tags.`search.study` != ''")
        assert parent.info.status == "FINISHED" and parent.data.tags["search.best_run"] in {t.info.run_id for t in trials}
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=60)
    retrain = deployment(url, "retrain/mnist")
    assert not retrain.paused and [s.active for s in retrain.schedules] == [True]
    assert retrain.schedules[0].schedule.cron == "0 3 * * 0"
    restarted = datetime.now(timezone.utc)
    serving = start_serving(url, env, tmp_path, idx)  # a restart keeps the schedule as it was

    def polled_again():  # the restarted process has registered its deployments and serves them
        polled = deployment(url, "retrain/mnist").last_polled
        return polled is not None and polled > restarted

    try:
        wait_until(polled_again, 180, "the restarted serve to poll its deployments")
        retrain = deployment(url, "retrain/mnist")
        assert not retrain.paused and [s.active for s in retrain.schedules] == [True]  # one, not two
        assert retrain.schedules[0].schedule.cron == "0 3 * * 0"
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=60)
