"""Each shim of components/compat.py against the installed library: when a Keras, TensorFlow, MLflow,
Optuna, Prefect or Hydra release moves a private name or rewords an error, the test of that shim
fails and says which. CI runs these on the newest versions the pins allow and on the lowest."""

from __future__ import annotations

import inspect
import random
import socket
import sqlite3
import threading
from pathlib import Path

import pytest

from cnnflow.components import compat

pytestmark = pytest.mark.smoke


def shim(name: str) -> str:
    return f"components/compat.py: {name} no longer matches the installed library"


# ----------------------------------------------------------------------------------------- Keras

def test_swap_keras_seed_source_is_where_keras_draws_unseeded_seeds(monkeypatch):
    import keras
    from keras.src.random import seed_generator

    monkeypatch.setattr(seed_generator, "python_random", random)  # restored after the test

    class Recording:
        drawn = []

        def __getattr__(self, name):
            method = getattr(random, name)
            return lambda *args, **kwargs: self.drawn.append(name) or method(*args, **kwargs)

    assert isinstance(compat.swap_keras_seed_source(Recording), Recording), shim("swap_keras_seed_source")
    keras.random.SeedGenerator()  # no seed: Keras draws one
    assert Recording.drawn, shim("swap_keras_seed_source") + ": an unseeded SeedGenerator drew nothing from it"


def test_build_for_inputs_makes_the_optimizers_variables_before_the_first_step():
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = len(model.optimizer.variables)
    spec = (tf.TensorSpec((None, 4), tf.float32), tf.TensorSpec((None,), tf.int64))
    compat.build_for_inputs(model, spec)
    assert len(model.optimizer.variables) > before, shim("build_for_inputs")  # Adam's moments of each weight


def test_learning_rate_schedule_is_the_schedule_an_optimizer_was_built_with():
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=100)
    assert compat.learning_rate_schedule(keras.optimizers.Adam(schedule)) is schedule, shim("learning_rate_schedule")
    assert compat.learning_rate_schedule(keras.optimizers.Adam(0.01)) is None, shim("learning_rate_schedule")


def test_cardinality_shortfall_reads_tf_datas_words():
    import tensorflow as tf

    stream = tf.data.Dataset.range(3).apply(tf.data.experimental.assert_cardinality(5))
    with pytest.raises(tf.errors.FailedPreconditionError) as error:
        list(stream)
    assert compat.cardinality_shortfall(error.value) == (5, 3), shim("cardinality_shortfall") + f": {error.value}"


# ---------------------------------------------------------------------------------------- MLflow

def test_leave_active_run_leaves_the_run_running(mlflow_store):
    import mlflow

    run = mlflow.start_run()
    compat.leave_active_run()
    assert mlflow.active_run() is None, shim("leave_active_run")
    assert mlflow.get_run(run.info.run_id).info.status == "RUNNING", shim("leave_active_run")


def test_artifact_repository_lists_and_deletes_a_runs_artifacts(mlflow_store):
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_text("x", "checkpoints/slot-0/state.json")
    repository = compat.artifact_repository(run.info.artifact_uri)
    assert [entry.path for entry in repository.list_artifacts("checkpoints")] == ["checkpoints/slot-0"], \
        shim("artifact_repository")
    repository.delete_artifacts("checkpoints/slot-0")
    assert repository.list_artifacts("checkpoints/slot-0") == [], shim("artifact_repository")


def test_system_metrics_go_through_the_sink_and_stop_without_a_flush(mlflow_store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    sampled = threading.Event()

    class Sink:
        data: list = []
        total_training_time = total_log_batch_time = 0.0

        def record_metrics(self, metrics, step=None):
            sampled.set()

        def flush(self):
            pass

    with mlflow.start_run() as run:
        monitor = compat.started_system_metrics(run.info.run_id, Sink())
        try:
            assert sampled.wait(30), shim("started_system_metrics") + ": no sample reached the sink in 30 s"
            assert compat.system_metrics_alive(monitor), shim("system_metrics_alive")
        finally:
            compat.stop_system_metrics(monitor)
        stopped = threading.Event()
        for _ in range(150):
            if not compat.system_metrics_alive(monitor):
                stopped.set()
                break
            stopped.wait(0.2)
        assert stopped.is_set(), shim("stop_system_metrics") + ": the monitor still runs 30 s after it"


def test_is_database_full_knows_sqlites_words(tmp_path):
    connection = sqlite3.connect(tmp_path / "tiny.db")
    connection.execute("PRAGMA max_page_count = 2")
    connection.execute("CREATE TABLE t (x BLOB)")
    with pytest.raises(sqlite3.OperationalError) as error:
        for _ in range(100):
            connection.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
    assert compat.is_database_full(error.value), shim("is_database_full") + f": {error.value}"


def test_outage_reason_reads_an_unreachable_tracking_server(monkeypatch):
    from mlflow import MlflowClient

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(Exception) as error:
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    assert compat.outage_reason(error.value) == "it is unreachable", shim("outage_reason") + f": {error.value}"


# ---------------------------------------------------------------------------------------- Optuna

def test_the_optuna_shims_reach_a_trial_by_its_number():
    import optuna

    study = optuna.create_study()
    study.ask()
    assert compat.stored_trial(study, compat.trial_id(study, 0)).number == 0, shim("trial_id / stored_trial")
    frozen = study.trials[0]
    compat.set_trial_user_attr(study, frozen, "run_id", "abc")
    compat.set_intermediate_value(study, frozen, 3, 0.5)
    again = study.trials[0]
    assert again.user_attrs == {"run_id": "abc"}, shim("set_trial_user_attr")
    assert again.intermediate_values == {3: 0.5}, shim("set_intermediate_value")


# --------------------------------------------------------------------------------------- Prefect

def test_the_worker_poll_is_a_coroutine_the_base_worker_calls():
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    assert inspect.iscoroutinefunction(getattr(ProcessWorker, compat.WORKER_POLL, None)), shim("WORKER_POLL")
    assert f"self.{compat.WORKER_POLL}" in inspect.getsource(BaseWorker), shim("WORKER_POLL") + ": BaseWorker does not poll with it"


def test_a_workers_pool_name_and_logger():
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(work_pool_name="box")
    assert compat.worker_pool_name(worker) == "box", shim("worker_pool_name")
    assert hasattr(compat.worker_logger(worker), "warning"), shim("worker_logger")


def test_prefects_outage_lines_are_still_written_by_prefect():
    """The lines Prefect prints on every failed send while its server is down, rebuilt from the
    format strings in Prefect's source, are what cnnflow's filter drops."""
    import importlib.util
    import re

    import prefect
    from prefect.events.worker import EventsWorker

    sources = "".join(path.read_text(encoding="utf-8", errors="replace")
                      for path in Path(prefect.__file__).parent.rglob("*.py"))
    unreachable = re.findall(r'"(Unable to connect to[^"]*)"', sources)
    failed_item = [text % (EventsWorker.__name__, "event") for text in re.findall(r'"([^"]*failed to process item[^"]*)"',
                                                                                   sources) if text.count("%r") == 2]
    assert unreachable and all(compat.is_prefect_outage_noise(text) for text in unreachable), shim("PREFECT_OUTAGE_TEXTS")
    assert failed_item and all(compat.is_prefect_outage_noise(text) for text in failed_item), shim("PREFECT_OUTAGE_TEXTS")
    for name in compat.PREFECT_OUTAGE_LOGGERS[:2]:  # the modules whose loggers print them
        assert importlib.util.find_spec(name) is not None, shim("PREFECT_OUTAGE_LOGGERS") + f": no module {name}"


def test_is_termination_signal_knows_prefects_sigterm():
    from prefect.exceptions import TerminationSignal

    assert compat.is_termination_signal(TerminationSignal(signal=15)), shim("is_termination_signal")
    assert not compat.is_termination_signal(KeyboardInterrupt()), shim("is_termination_signal")


# ----------------------------------------------------------------------------------------- Hydra

def _hydra_refusal(override: str) -> Exception:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cnnflow.flows.setup.config import _conf_dir

    try:
        with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
            compose("config", overrides=["experiment=quickstart", override])
    except Exception as error:  # what Hydra raises is what the shims read
        return error
    finally:
        GlobalHydra.instance().clear()
    raise AssertionError(f"Hydra took {override}")


def test_the_hydra_shims_read_hydras_refusals():
    assert compat.unknown_override_key(_hydra_refusal("train.epochz=3")) == "train.epochz", shim("unknown_override_key")
    assert compat.merge_failure(_hydra_refusal("train.metrics={a: 1}")) == ("train.metrics", "{a: 1}"), \
        shim("merge_failure")
    assert compat.missing_group_option(str(_hydra_refusal("model=resnet"))) == ("model", "resnet"), \
        shim("missing_group_option")
