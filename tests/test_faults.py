"""Faults a user meets one step off the README's path: each ends in one clear line (or a clean
recovery) and loses nothing. Settings, data files, divergence, damaged checkpoints, signals, the
store, concurrent processes, predict's inputs. Real processes, a real MLflow store, real Prefect."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image

from cnnflow.components import registry
from cnnflow.flows.tracking.checkpoints import checkpoints, read_checkpoint
from cnnflow.components.data import checked_partitions
from cnnflow.components.errors import DataError, InfrastructureError, RunError, TransientError
from cnnflow.flows import cli
from cnnflow.flows.setup import settings
from cnnflow.flows.tracking import promotion, store
from cnnflow.flows.setup.config import compose_config
from cnnflow.components.images import read_image
from cnnflow.flows.inference import evaluate_flow, image_files, predict_flow, resolve_model
from cnnflow.flows.train import continue_flow, load_data, train_flow
from conftest import finished_checkpoint, make_idx_folder, tiny_overrides, wait_until, write_idx

# --------------------------------------------------------------------------------------- settings

# One wrong value for every setting of the schema (and a component argument of each kind): the key
# it must name, and what the line must say is accepted.
BAD_SETTINGS = [
    ("seed=-1", "seed=-1: should be greater than or equal to 0"),
    ("seed=1.5", "seed=1.5: should be a valid integer"),
    ("output_dir=''", "output_dir='': should have at least 1 character"),
    ("tracking_uri=''", "tracking_uri=''"),
    ("mlflow_experiment=''", "mlflow_experiment=''"),
    ("resume=perhaps", "resume='perhaps': should be a valid boolean"),
    ("+tags.note=" + "x" * 9000, "tags.note='" + "x" * 59 + "... (9,000 characters): should have at most 8000 characters"),
    ("registry.name=''", "registry.name=''"),
    ("registry.alias='a b'", "registry.alias='a b': should be a name of letters"),
    ("registry.metric=''", "registry.metric=''"),
    ("registry.mode=up", "registry.mode='up': should be 'max' or 'min'"),
    ("retrain.schedule=''", "retrain.schedule=''"),
    ("retrain.cron='every day'", "retrain.cron='every day': should be a cron expression"),
    ("retrain.sizes=[0]", "retrain.sizes[0]=0: should be greater than or equal to 1"),
    ("runtime.precision=half", "runtime.precision='half': should be 'auto', 'float32', 'mixed_bfloat16' or 'mixed_float16'"),
    ("runtime.jit_compile=maybe", "runtime.jit_compile='maybe': should be a valid boolean"),
    ("runtime.intra_op_threads=-2", "runtime.intra_op_threads=-2"),
    ("runtime.inter_op_threads=two", "runtime.inter_op_threads='two'"),
    ("runtime.onednn=1", "runtime.onednn=1: should be a valid boolean"),
    ("runtime.calibrate=sometimes", "runtime.calibrate='sometimes': should be a valid boolean"),
    ("runtime.strategy=tpu", "runtime.strategy='tpu': should be 'default' or 'mirrored'"),
    ("retrain.warm_start=maybe", "retrain.warm_start='maybe': should be a valid boolean"),
    ("train.init_from=model.keras", "train.init_from='model.keras': should be a logged model's URI"),
    ("data.source=nope", "data.source='nope': Unknown dataset 'nope'. Registered datasets: celeba_folder, digits, folder, idx"),
    ("data.name=''", "data.name=''"),
    ("data.path=3", "data.path=3: should be a valid string"),
    ("data.data_dir=true", "data.data_dir=True: should be a valid string"),
    ("data.manual_dir=1.5", "data.manual_dir=1.5: should be a valid string"),
    ("data.options=[]", "data.options=[]: should be a mapping, like {key: value}"),
    ("data.train_split='train[a:]'", "data.train_split='train[a:]': should be a partition name"),
    ("data.valid_split='valid]'", "data.valid_split='valid]': should be a partition name"),
    ("data.test_split=5", "data.test_split=5: should be a valid string"),
    ("data.train_size=0", "data.train_size=0: should be a count >= 1, full, or null"),
    ("data.valid_size=-1", "data.valid_size=-1: should be a count >= 0, full, or null"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5: should be greater than or equal to 0"),
    ("data.shuffle_each_epoch=0.5", "data.shuffle_each_epoch=0.5: should be a valid integer"),
    ("data.batch_size=0", "data.batch_size=0: should be greater than or equal to 1"),
    ("data.cache=true", "data.cache=True: should be 'auto', 'memory', 'disk' or 'none'"),
    ("data.cache_memory=1.5", "data.cache_memory=1.5: should be a fraction of the available RAM, above 0 and at most 1"),
    ("data.cache_dir=''", "data.cache_dir=''"),
    ("data.cache_max_gb=0", "data.cache_max_gb=0: should be GiB above 0, like 20, or null for no cap"),
    ("data.transforms.train=[{name: resize, height: -1, width: 8}]", "data.transforms.train[0].height=-1"),
    ("data.transforms.eval=[{nam: rescale}]", "data.transforms.eval[0].name"),
    ("train.epochs=0", "train.epochs=0: should be greater than or equal to 1"),
    ("train.metrics=accuracy", "train.metrics='accuracy': should be a valid list"),
    ("train.deterministic=2", "train.deterministic=2: should be a valid boolean"),
    ("train.max_loss_factor=0.5", "train.max_loss_factor=0.5: should be greater than 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: should be greater than or equal to 1"),
    ("train.checkpoint_slots=1", "train.checkpoint_slots=1: should be greater than or equal to 2"),
    ("train.checkpoint_minutes=-1", "train.checkpoint_minutes=-1: should be minutes, 0 for epoch ends only, like 10"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1: should be greater than or equal to 0"),
    ("train.lease_timeout=5", "train.lease_timeout=5: should be seconds, at least 10, like 120"),
    ("train.outage_timeout=1", "train.outage_timeout=1: should be seconds, at least 5, like 600"),
    ("jobs.crash_after=30", "jobs.crash_after=30: should be seconds, at least 60, like 300"),
    ("jobs.restarts=-1", "jobs.restarts=-1: should be greater than or equal to 0"),
    ("train.test=maybe", "train.test='maybe': should be a valid boolean"),
    ("+train.callbacks.stop={name: early_stopping, patience: -1}", "train.callbacks.stop.patience=-1"),
    ("model.dropout_rate=1.5", "model.dropout_rate=1.5: should be less than 1"),
    ("loss.from_logits=yes", "loss.from_logits='yes': should be a valid boolean"),
    ("optimizer.learning_rate=-0.1", "optimizer.learning_rate=-0.1: should be greater than 0"),
    ("optimizer.beta_1=1", "optimizer.beta_1=1: should be less than 1"),
    ("plots.predictions.rows=0", "plots.predictions.rows=0: should be greater than or equal to 1"),
    ("train.epochz=3", "unknown setting train.epochz; did you mean train.epochs?"),
    ("+train.epochz=3", "unknown setting train.epochz; did you mean train.epochs?"),
    ("+model.dropout=0.2", "unknown setting model.dropout; did you mean model.dropout_rate?"),
    ("+data.options.atribute=Male", "unknown setting data.options.atribute; did you mean data.options.attribute?"),
    ("data.path=${oc.env:HOME}", "data.path=${oc.env:HOME}: interpolations (${...}) are not allowed"),
]


def _schema_leaves(model, prefix="") -> set[str]:
    leaves = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, settings.Section):
            leaves |= _schema_leaves(annotation, f"{prefix}{name}.")
        else:
            leaves.add(f"{prefix}{name}")
    return leaves


def test_the_bad_settings_table_covers_every_setting_of_the_schema():
    covered = {line.lstrip("+").split("=")[0] for line, _ in BAD_SETTINGS}
    covered = {key.split(".callbacks.")[0] + ".callbacks" if ".callbacks." in key else key for key in covered}
    covered |= {"data.transforms.train", "data.transforms.eval"}
    # free-form or set by the flow: experiment and overrides (the flow's parameters), tags and the
    # component sections (checked per registered argument below them)
    exempt = {"experiment", "overrides", "tags", "model", "loss", "optimizer", "plots",
              "search"}  # only `cnnflow search` composes it: tests/flows/test_search.py refuses each bad search.* value
    assert _schema_leaves(settings.Settings) - exempt <= covered


@pytest.mark.parametrize("override, message", BAD_SETTINGS, ids=[case[0] for case in BAD_SETTINGS])
def test_a_bad_setting_stops_with_one_line_and_exit_code_2_before_anything_exists(override, message, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["train", override]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("cnnflow: error: ") and message in error, error
    assert list(tmp_path.iterdir()) == []  # no store, no outputs folder, no run


def test_arguments_for_another_component_of_the_kind_are_no_error_and_never_reach_the_chosen_one():
    cfg = compose_config("celeba", ["data.source=tfds"])  # on_bad_image and order are celeba_folder's
    assert cfg["data"]["options"] == {"attribute": "Male", "on_bad_image": "raise", "order": "tfds"}
    source = registry.get("dataset", "tfds")
    assert registry.arguments_for("dataset", source, cfg["data"]["options"]) == {"attribute": "Male"}
    cfg = compose_config("quickstart", ["+model.width=32"])  # fast_cnn's argument, not mnist_cnn's
    assert settings.unused_settings(cfg) == ["model.width"]
    assert registry.build("model", cfg["model"], input_shape=(28, 28, 1), num_classes=10).name == "mnist_cnn"


# ------------------------------------------------------------------------------------ data files

def _idx_data(folder: Path) -> dict:
    return compose_config("mnist", [f"data.path={folder}", "data.source=idx"])["data"]


@pytest.mark.parametrize("damage, message", [
    ("labels_as_images", r"train-images-idx3-ubyte.gz holds 1 dimension\(s\) but should be an images file"),
    ("label_out_of_range", r"train-labels-idx1-ubyte.gz: label 12 at position 5 is outside the 10 classes 0..9"),
    ("not_gzip", r"cannot read IDX file .*t10k-images-idx3-ubyte.gz: not a gzip file"),
    ("count_mismatch", r"t10k-images-idx3-ubyte.gz holds 60 images but .*t10k-labels-idx1-ubyte.gz 59 labels"),
    ("other_image_size", r"t10k-images-idx3-ubyte.gz holds 20x20 images; the other partition's are 28x28"),
    ("truncated_header", r"train-labels-idx1-ubyte.gz ends inside its header"),
    ("gzip_cut_in_half", r"cannot read IDX file .*train-images-idx3-ubyte.gz: the gzip stream ends early"),
])
def test_idx_files_are_checked_before_any_run_and_the_file_is_named(damage, message, tmp_path):
    folder = make_idx_folder(tmp_path / damage)
    if damage == "labels_as_images":
        shutil.copy(folder / "train-labels-idx1-ubyte.gz", folder / "train-images-idx3-ubyte.gz")
    elif damage == "label_out_of_range":
        labels = np.arange(240) % 10
        labels[5] = 12
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    elif damage == "not_gzip":
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    elif damage == "count_mismatch":
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(59) % 10)
    elif damage == "other_image_size":
        write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((60, 20, 20)))
    elif damage == "truncated_header":
        with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(bytes([0, 0, 8, 1, 0]))
    elif damage == "gzip_cut_in_half":
        images = folder / "train-images-idx3-ubyte.gz"
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(DataError, match=message):
        checked_partitions(_idx_data(folder))


def test_bad_data_fails_the_flow_before_an_mlflow_run_exists(prefect_harness, mlflow_store, tmp_path):
    folder = make_idx_folder(tmp_path / "idx")
    labels = np.arange(60) % 10
    labels[0] = 200
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: label 200 at position 0"):
        train_flow("mnist", tiny_overrides(folder))
    assert store.training_runs() == []


@pytest.mark.parametrize("mode", ["under Prefect", "in process"])
def test_only_transient_download_errors_are_retried(mode, prefect_harness, monkeypatch, idx_folder, capsys):
    import contextlib

    from cnnflow.components import data as data_module
    from cnnflow.components.errors import is_transient
    from cnnflow.flows.orchestration import engine

    assert is_transient(ConnectionResetError(104, "reset")) and is_transient(OSError("HTTP Error 503"))
    assert not is_transient(ValueError("checksum mismatch"))
    real, calls = data_module.source_from, []

    def flaky(data):
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("connection reset by peer")
        return real(data)

    monkeypatch.setattr(data_module, "source_from", flaky)
    data = _idx_data(idx_folder)

    @engine.flow()
    def load_once():
        return load_data.with_options(retry_delay_seconds=0)(data)

    def running():
        return engine.in_process() if mode == "in process" else contextlib.nullcontext()

    with running():
        assert load_once()["num_classes"] == 10 and len(calls) == 2  # failed, then retried
    if mode == "in process":  # by cnnflow's engine, from the task's own retry options
        assert "load data failed (TransientError: connection reset by peer); retry 1 of 2 in 0 s" in capsys.readouterr().err

    def wrong(data):
        calls.append(1)
        raise DataError("data.path='x' is not a folder")

    calls.clear()
    monkeypatch.setattr(data_module, "source_from", wrong)
    with running(), pytest.raises(DataError):
        load_once()
    assert len(calls) == 1  # a setting to fix is not retried

    for failure in (MemoryError(), TypeError("a bug in a plugin source")):
        def broken(data, failure=failure):
            calls.append(1)
            raise failure

        calls.clear()
        monkeypatch.setattr(data_module, "source_from", broken)
        with running(), pytest.raises(type(failure)):
            load_once()
        assert len(calls) == 1  # neither passes by waiting


# ------------------------------------------------------------------------------ divergence

def test_a_diverging_training_fails_is_not_registered_and_says_where(prefect_harness, mlflow_store, idx_folder):
    overrides = tiny_overrides(idx_folder, epochs=2) + ["optimizer=sgd", "optimizer.learning_rate=1e30",
                                                          "registry.name=digits", "plots=none"]
    with pytest.raises(RunError, match=r"training diverged: the loss became .* in epoch 1 \(batch \d\) at learning "
                                       r"rate 1e\+30; the run is FAILED and not registered"):
        train_flow("mnist", overrides)
    [run] = store.training_runs()
    assert run.info.status == "FAILED"
    assert MlflowClient().search_registered_models() == []
    assert read_checkpoint(run.data.tags["output_dir"]) is None  # no checkpoint of garbage weights to resume


# ------------------------------------------------------------------------------ checkpoints

_POWER_CUT = """
import json, os, signal, sys, time
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from cnnflow.components.callbacks import EpochProgress
from cnnflow.flows.train import train_flow

epochs_done, real = int(sys.argv[1]), EpochProgress.on_epoch_end

def power_cut(self, epoch, logs=None):
    real(self, epoch, logs)
    if epoch + 1 == epochs_done:  # once this epoch's checkpoint is in the artifact store, the machine is gone
        stored = Path(urlparse(mlflow.active_run().info.artifact_uri).path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                json.loads(state.read_text())["epoch"] == epochs_done for state in stored.glob("checkpoints/*/state.json")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

EpochProgress.on_epoch_end = power_cut
train_flow("mnist", sys.argv[2:])
"""


def _crashed_run(idx: Path, monkeypatch, epochs_done: int = 3) -> tuple[list[str], str, Path]:
    """A training whose process dies (SIGKILL: no handler, no finally, nothing flushed) right after
    the checkpoint of epoch `epochs_done` reached the artifact store; a power cut is no setting, so
    the rerun has the same settings."""
    overrides = tiny_overrides(idx, epochs=5) + ["plots=none"]
    log = idx.parent / f"power-cut-{epochs_done}.log"
    with open(log, "w") as out:  # a file, not a pipe: what the training started may outlive it
        training = subprocess.Popen([sys.executable, "-c", _POWER_CUT, str(epochs_done), *overrides], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        code = training.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(training.pid, signal.SIGKILL)  # the rest of the machine that lost power
    assert code == -signal.SIGKILL, log.read_text()
    [run] = store.training_runs()
    return overrides, run.info.run_id, Path(run.data.tags["output_dir"])


def _stored(run_id: str, path: str) -> Path:
    """A file of the run's artifact store (a local folder with a SQLite store)."""
    from urllib.parse import urlparse

    return Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path) / path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as by a full disk or a cut-off upload


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_resumes_from_its_stored_copy_or_the_one_before(
        prefect_harness, mlflow_store, idx_folder, caplog, monkeypatch):
    overrides, run_id, folder = _crashed_run(idx_folder, monkeypatch)
    assert [c["epoch"] for c, _ in checkpoints(folder)] == [3, 2]  # the newest and the one before it
    # the newest is always stored (a training waits for its last upload); an older one may have been
    # skipped because a newer one was already waiting
    assert json.loads(_stored(run_id, "checkpoints/slot-1/state.json").read_text())["epoch"] == 3
    _truncate(folder / "checkpoint-epoch0003.keras")
    _truncate(_stored(run_id, "checkpoints/slot-1/model.keras"))  # both copies of epoch 3 are damaged
    assert train_flow("mnist", overrides) == run_id
    assert "the checkpoint of epoch 3 is unusable" in caplog.text
    assert "the checkpoint of epoch 3 in the artifact store is incomplete" in caplog.text
    assert "resuming from the checkpoint of epoch 2 instead" in caplog.text
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert sorted({m.step for m in MlflowClient().get_metric_history(run_id, "loss")}) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_run_resumes_on_a_machine_that_never_saw_its_folder(prefect_harness, mlflow_store, idx_folder, caplog,
                                                              monkeypatch):
    import shutil

    overrides, run_id, folder = _crashed_run(idx_folder, monkeypatch)
    shutil.rmtree(folder.parents[1])  # outputs/: all that was local
    elsewhere = folder.parents[2] / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train_flow("mnist", overrides) == run_id
    assert f"resuming MLflow run {run_id} after epoch 3" in caplog.text
    here = elsewhere / "outputs" / "mnist" / run_id
    assert (here / "split.npz").is_file() and finished_checkpoint(run_id, here)["epoch"] == 5
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    shutil.rmtree(elsewhere / "outputs")
    assert continue_flow(run_id, 1) == run_id  # continue and evaluate too, with nothing local
    assert evaluate_flow(run_id, "valid")["accuracy"] >= 0.9


@pytest.mark.slow
def test_without_a_usable_checkpoint_a_rerun_starts_afresh_and_says_why(prefect_harness, mlflow_store, idx_folder,
                                                                         caplog, monkeypatch):
    overrides, run_id, folder = _crashed_run(idx_folder, monkeypatch, epochs_done=2)
    for state in folder.glob("checkpoint-epoch*.json"):
        state.write_text("{not json")
    for stored in _stored(run_id, "checkpoints").glob("slot-*/model.keras"):
        _truncate(stored)
    new_run = train_flow("mnist", overrides)
    assert new_run != run_id and MlflowClient().get_run(new_run).info.status == "FINISHED"
    assert f"run {run_id} has no usable checkpoint" in caplog.text and "starting a new run" in caplog.text


def _hold_lease(run_id: str, host: str, pid: int, started: float, heartbeat_age: float | None = None) -> None:
    """What a training process records when it takes a run's lease (flows/tracking/lifecycle.py)."""
    client = MlflowClient()
    params = client.get_run(run_id).data.params
    generation = 1 + max((int(k.split(".")[1]) for k in params if k.startswith("lease.")), default=0)
    client.log_param(run_id, f"lease.{generation}", f"{host} {pid} {started:.2f} feedc0de")
    if heartbeat_age is not None:
        client.set_tag(run_id, f"lease.heartbeat.{generation}", f"{time.time() - heartbeat_age:.0f}")


@pytest.mark.slow
def test_a_run_that_another_process_trains_is_refused_and_left_alone(prefect_harness, mlflow_store, idx_folder):
    run_id = train_flow("mnist", tiny_overrides(idx_folder) + ["plots=none"])
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as trainer:
        try:
            _hold_lease(run_id, socket.gethostname(), trainer.pid, psutil.Process(trainer.pid).create_time())
            with pytest.raises(RunError, match=f"process {trainer.pid} on this machine is training run {run_id}"):
                continue_flow(run_id[:8], 1)  # a short id, as `cnnflow runs` prints it
        finally:
            trainer.kill()
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    trainer.wait()
    assert continue_flow(run_id, 1) == run_id  # its holder died: taken over at once


@pytest.mark.slow
def test_a_lease_held_on_another_machine_is_refused_until_its_heartbeat_is_older_than_the_timeout(
        prefect_harness, mlflow_store, idx_folder):
    run_id = train_flow("mnist", tiny_overrides(idx_folder) + ["plots=none"])
    _hold_lease(run_id, "gpu-7", 4242, 0.0, heartbeat_age=30)
    with pytest.raises(RunError, match=r"process 4242 on gpu-7 \(its last heartbeat 3\d s ago\) is training run"):
        continue_flow(run_id, 1)
    _hold_lease(run_id, "gpu-7", 4242, 0.0, heartbeat_age=200)  # train.lease_timeout is 120 s
    assert continue_flow(run_id, 1) == run_id
    params = MlflowClient().get_run(run_id).data.params
    assert params["lease.4"].startswith(f"{socket.gethostname()} {os.getpid()} ")  # generations 1, 2 (gpu-7), 3, 4 (us)
    assert MlflowClient().get_run(run_id).data.tags["lease.released"] == "4"


def test_of_two_takers_of_a_lease_exactly_one_wins(mlflow_store):
    from cnnflow.flows.tracking.lifecycle import Lease

    with mlflow.start_run() as run:
        pass
    leases = [Lease(run.info.run_id, 120) for _ in range(4)]
    outcomes = []

    def take(lease):
        try:
            lease.acquire()
            outcomes.append("won")
        except RunError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("won") == 1, outcomes
    winner = next(lease for lease in leases if lease.generation)
    for lease in leases:
        lease.release()
    assert MlflowClient().get_run(run.info.run_id).data.tags["lease.released"] == str(winner.generation)


_RACER = """
import os, sys, time
from pathlib import Path
from cnnflow.flows import cli
from cnnflow.flows.tracking import lifecycle
ready, wanted = Path(sys.argv[1]), int(sys.argv[2])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < wanted:  # every racer imported: they start the flow together
    time.sleep(0.01)
found = lifecycle.find_unfinished
def slowly(cfg, logger):
    result = found(cfg, logger)
    time.sleep(3)  # wider than the racers' start-up jitter: without one step from search to lease, all find nothing
    return result
lifecycle.find_unfinished = slowly
sys.argv = ["cnnflow", *sys.argv[3:]]
cli.run()
"""


@pytest.mark.slow
def test_identical_commands_started_at_one_instant_give_one_training_and_refusals(tmp_path, idx_folder):
    racers, ready = 2, tmp_path / "ready"
    ready.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-c", _RACER, str(ready), str(racers), "train", "experiment=mnist",
               *tiny_overrides(idx_folder, epochs=2), "plots=none"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for _ in range(racers)]
    try:
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    codes = sorted(process.returncode for process in processes)
    assert codes == [0] + [4] * (racers - 1), outputs
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("mnist").experiment_id])
    assert run.info.status == "FINISHED"
    for output, process in zip(outputs, processes):
        if process.returncode:
            assert f"run {run.info.run_id} has these settings and process" in output.splitlines()[-1], output
            assert "Traceback" not in output


_PAUSED_AFTER_EPOCH_2 = """
import os, signal, sys
from cnnflow.components.callbacks import EpochProgress
from cnnflow.flows import cli
from cnnflow.flows.tracking import lifecycle
shown = EpochProgress.on_epoch_end
def pause(self, epoch, logs=None):
    shown(self, epoch, logs)
    if epoch + 1 == 2:  # the whole process stops (a laptop lid), at a moment with no write on the wire
        [outbox] = lifecycle._held.values()
        outbox.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
EpochProgress.on_epoch_end = pause
sys.argv = ["cnnflow", *sys.argv[1:]]
cli.run()
"""


@pytest.mark.slow
def test_a_displaced_holder_writes_nothing_more_into_the_run(tmp_path, idx_folder):
    """A trainer paused (a laptop lid, a stalled VM) while another machine takes its run over: when it
    wakes it stops, and neither a metric, a tag nor a checkpoint of its reaches the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_AFTER_EPOCH_2, "train", "experiment=mnist",
                                *tiny_overrides(idx_folder, epochs=500), "train.lease_timeout=10"],
                               cwd=tmp_path, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: psutil.Process(process.pid).status() == psutil.STATUS_STOPPED, 240, "the pause")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        client = MlflowClient()
        [run] = client.search_runs([mlflow.get_experiment_by_name("mnist").experiment_id])
        run_id = run.info.run_id
        _hold_lease(run_id, "gpu-7", 4242, 0.0, heartbeat_age=0)  # the other machine's lease
        before = client.get_run(run_id)
        metrics = {key: len(client.get_metric_history(run_id, key)) for key in before.data.metrics}
        slots = {path: path.stat().st_mtime for path in _stored(run_id, "checkpoints").rglob("*")}
        assert [m.step for m in client.get_metric_history(run_id, "checkpoint_upload_seconds")] == [1, 2]
    finally:
        process.send_signal(signal.SIGCONT)
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()  # a trainer that did not stop must not outlive the test
    assert process.returncode == 4, out
    assert out.strip().splitlines()[-1].startswith(f"cnnflow: error: run {run_id} was taken over by another process"), out
    after = client.get_run(run_id)
    assert {key: len(client.get_metric_history(run_id, key)) for key in after.data.metrics} == metrics
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert {path: path.stat().st_mtime for path in _stored(run_id, "checkpoints").rglob("*")} == slots
    assert after.info.status == "RUNNING"  # its status is the new holder's to write
    assert read_checkpoint(Path(run.data.tags["output_dir"]))["epoch"] == 2  # this machine keeps its own


@pytest.mark.slow
def test_a_resume_aimed_at_a_run_in_training_is_refused_and_names_resume_false(prefect_harness, mlflow_store,
                                                                              idx_folder, monkeypatch):
    overrides, run_id, folder = _crashed_run(idx_folder, monkeypatch, epochs_done=1)
    _hold_lease(run_id, socket.gethostname(), os.getpid(), psutil.Process().create_time())  # this process "trains" it
    with pytest.raises(RunError, match=f"run {run_id} has these settings and process {os.getpid()} on this machine is "
                                       f"training it.*resume=false"):
        train_flow("mnist", overrides)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # as the power cut left it: the refusal writes nothing
    assert len(store.training_runs()) == 1


# ----------------------------------------------------------------------- signals, real processes

def _cnnflow(args: list[str], cwd: Path, prefect_api: str | None = None) -> subprocess.Popen:
    """`cnnflow ...` as a user starts it: with no Prefect server configured (the flow runs in process),
    or with one (`prefect_api`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PREFECT_HOME=str(cwd.parent / f".prefect-{cwd.name}"))
    env.update({"PREFECT_API_URL": prefect_api} if prefect_api else {})
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_epoch(folder: Path, epochs: int, process: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        for run in folder.glob("outputs/mnist/*"):
            checkpoint = read_checkpoint(run)
            if checkpoint and checkpoint["epoch"] >= epochs:
                return run
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def _left_behind(folder: Path) -> list[str]:
    """Processes still running in the folder a cnnflow command ran in: anything it started."""
    deadline = time.monotonic() + 5
    while True:
        found = []
        for process in psutil.process_iter(["cmdline", "cwd"]):
            if process.info["cwd"] == str(folder):
                found.append(" ".join(process.info["cmdline"] or []))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_interrupt_swallowed_below_python_is_raised_again_at_the_next_check():
    from cnnflow.components.errors import Interrupted
    from cnnflow.flows.orchestration import interrupts

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for number, stop in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Interrupted)):
        with interrupts.noted():
            try:
                os.kill(os.getpid(), number)
                time.sleep(2)  # the handler raises here ...
            except BaseException:
                pass  # ... and a library swallows it
            with pytest.raises(stop):
                interrupts.raise_if_received()  # what the training checks after every batch
        interrupts.raise_if_received()  # outside the block nothing is pending
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("how, code", [("SIGINT to the group", 130), ("SIGTERM", 143), ("kill -9", -9),
                                       ("SIGTERM under a Prefect server", 143)])
@pytest.mark.slow
def test_interrupts_end_cleanly_and_leave_nothing_running(how, code, tmp_path, idx_folder, request):
    server = request.getfixturevalue("prefect_server")[0] if "Prefect server" in how else None
    process = _cnnflow(["train", "experiment=mnist", *tiny_overrides(idx_folder, epochs=500)], tmp_path, server)
    run_folder = _wait_for_epoch(tmp_path, 1, process)
    if how == "SIGINT to the group":
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    elif how.startswith("SIGTERM"):
        process.send_signal(signal.SIGTERM)
    else:
        process.send_signal(signal.SIGKILL)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == code, out
    assert _left_behind(tmp_path) == []
    assert read_checkpoint(run_folder)["epoch"] >= 1
    assert "absl::InitializeLog" not in out and "I0000" not in out, out  # TensorFlow's start-up lines
    assert "without specifying model signature" not in out
    if code > 0:
        assert "Traceback" not in out and out.strip().splitlines()[-1].startswith(
            "cnnflow: interrupted" if code == 130 else "cnnflow: terminated"), out
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert MlflowClient().get_run(run_folder.name).info.status == "KILLED"


def test_an_interrupted_command_ends_even_when_something_waits_forever_at_exit():
    """Prefect's services drain at interpreter exit; after a SIGTERM under a Prefect server one was
    seen to wait forever. The `cnnflow` command still ends, with the interruption's exit code."""
    command = ("import threading\nfrom cnnflow.flows import cli\n"
               "threading._register_atexit(threading.Event().wait)  # a drain that never ends\n"
               "cli.EXIT_GRACE_SECONDS = 1\ncli.main = lambda: 143  # as after SIGTERM\ncli.run()")
    assert subprocess.run([sys.executable, "-c", command], timeout=120).returncode == 143


# ----------------------------------------------------------------------------- store faults

def _silent_port() -> socket.socket:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def test_an_unreachable_or_silent_tracking_server_fails_within_seconds(tmp_path, monkeypatch, capsys):
    silent = _silent_port()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    monkeypatch.chdir(tmp_path)
    for uri, reason in ((f"http://127.0.0.1:{closed_port}", "connection refused"),
                        (f"http://127.0.0.1:{silent.getsockname()[1]}", "no answer within 5 s")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        assert cli.main(["train", "train.epochs=1"]) == 5
        assert time.monotonic() - started < 10
        error = capsys.readouterr().err.strip()
        assert error == (f"cnnflow: error: cannot reach the MLflow tracking server {uri} ({reason}). Start it (mlflow "
                         f"server --host ... --port ...) or set MLFLOW_TRACKING_URI (or tracking_uri=...) to a store "
                         f"you can use"), error
    silent.close()


def test_a_store_that_cannot_be_written_or_does_not_exist_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InfrastructureError, match=r"cannot write the MLflow store .*a_file/mlflow.db: .*a_file: "):
        store.check_store(f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in (["runs"], ["evaluate", "0123abcd"], ["predict", "0123abcd", "x.png"], ["continue", "0123abcd"]):
        assert cli.main(command) == 5
        assert capsys.readouterr().err.startswith(f"cnnflow: error: no MLflow store here: {tmp_path / 'mlflow.db'} "
                                                  f"does not exist. Run cnnflow in the folder you trained in")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB file system: a disk that fills up at the first checkpoint."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"needs root to mount a 3 MB tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_exit_code_5(tiny_disk):
    process = _cnnflow(["train", "train.epochs=2"], tiny_disk)
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 5 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == (f"cnnflow: error: the disk is full: a file could not be written; free space "
                                            f"under {tiny_disk} (or where MLFLOW_TRACKING_URI points), then the same "
                                            f"command resumes"), out


CREATE_STORE = """
import os, sys, time
from pathlib import Path
(Path(sys.argv[3]) / str(os.getpid())).touch()  # started: the test says go once every process has
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
import mlflow
from cnnflow.flows.tracking import store
cfg = {"tracking_uri": sys.argv[1], "experiment": "same"}
store.use_store(cfg)
with mlflow.start_run(experiment_id=store.experiment_id(cfg)):
    mlflow.log_metric("x", 1.0)
"""


def test_two_processes_creating_one_new_store_both_work(tmp_path):
    uri, go, started = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", tmp_path / "go", tmp_path / "started"
    started.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", CREATE_STORE, uri, str(go), str(started)], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:  # both waiting for the word
        time.sleep(0.01)
    go.write_text("")
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    mlflow.set_tracking_uri(uri)
    [experiment] = [e for e in mlflow.search_experiments() if e.name == "same"]
    assert len(mlflow.search_runs([experiment.experiment_id], output_format="list")) == 2


def test_a_store_creation_killed_half_way_leaves_no_store_and_a_damaged_store_is_one_line(tmp_path, monkeypatch,
                                                                                          capsys):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    go.write_text("")
    creating = subprocess.Popen([sys.executable, "-c", CREATE_STORE, uri, str(go), str(tmp_path)], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("mlflow.db.creating-*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    creating.kill()  # as soon as the new store's file exists: MLflow is creating its tables
    creating.wait()
    assert list(tmp_path.glob("mlflow.db.creating-*")) and not (tmp_path / "mlflow.db").exists()
    store.use_store({"tracking_uri": uri})  # the next command creates a whole one
    assert (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("mlflow.db.creating-*"))
    assert [e.name for e in mlflow.search_experiments()] == ["Default"]

    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "mlflow.db").write_bytes(b"not a database, half an upgrade" * 100)
    monkeypatch.chdir(tmp_path / "damaged")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["train", "train.epochs=1"]) == 5
    error = capsys.readouterr().err.strip()
    assert error.startswith("cnnflow: error: the MLflow store sqlite:///mlflow.db cannot be opened (") and \
        "\n" not in error and "move it aside" in error, error


@pytest.mark.slow
def test_of_two_trainings_ending_together_the_better_becomes_champion(mlflow_store, monkeypatch):
    import keras

    mlflow.set_experiment("race")
    cfg = {"registry": {"name": "race", "alias": "champion", "metric": "val_accuracy", "mode": "max"}}
    runs = []
    for value in (0.7, 0.9):
        with mlflow.start_run() as run:
            logged = mlflow.keras.log_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), name="model")
            mlflow.log_metric("val_accuracy", value)
            mlflow.set_tag("model_uri", logged.model_uri)
        runs.append(run.info.run_id)
    barrier = threading.Barrier(2)
    ensure = promotion._ensure_registered_model

    def late_for_the_worse(client, name):  # between reading the champion and moving the alias
        time.sleep(1.5 if threading.current_thread().name == "worse" else 0.0)
        ensure(client, name)

    # Without the lock both read "no champion" and the worse moves the alias last, every time.
    monkeypatch.setattr(promotion, "_ensure_registered_model", late_for_the_worse)

    def finish(run_id):
        barrier.wait()
        promotion.maybe_register(cfg, run_id, __import__("logging").getLogger("test"))

    threads = [threading.Thread(target=finish, args=(run_id,), name=name) for run_id, name in zip(runs, ("worse", "better"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert MlflowClient().get_model_version_by_alias("race", "champion").run_id == runs[1]
    from cnnflow.flows.runs import runs_table

    table = runs_table()  # the lock's own run (experiment cnnflow.locks) is bookkeeping, not a result
    assert "race" in table and "cnnflow.locks" not in table and "registry race" not in table


# ----------------------------------------------------------------- runs, models, predict inputs

@pytest.mark.slow
def test_model_references_short_ids_and_runs_without_settings(prefect_harness, mlflow_store, idx_folder, tmp_path):
    run_id = train_flow("mnist", tiny_overrides(idx_folder) + ["registry.name=digits", "plots=none"])
    # no version: the newest; a version serves through its pyfunc, and evaluate/predict use its Keras model
    keras_model = MlflowClient().get_run(run_id).data.tags["model_uri"]
    assert resolve_model("models:/digits") == (keras_model, run_id)
    assert MlflowClient().get_model_version("digits", "1").source == MlflowClient().get_run(run_id).data.tags["serving_uri"]
    assert resolve_model(run_id[:8])[1] == run_id
    assert resolve_model(f"runs:/{run_id[:10]}/model") == (f"runs:/{run_id}/model", run_id)
    with pytest.raises(RunError, match=f"run {run_id} has no logged model 'modle' .*; its model is runs:/{run_id}/model"):
        resolve_model(f"runs:/{run_id}/modle")
    assert evaluate_flow(f"{run_id[:8]}", "test[:20]")["accuracy"] == pytest.approx(
        evaluate_flow(f"runs:/{run_id}/model", "test[:20]")["accuracy"])
    with mlflow.start_run(experiment_id=MlflowClient().get_run(run_id).info.experiment_id) as empty:
        pass  # a run that ended before it logged its settings
    with pytest.raises(RunError, match=f"run {empty.info.run_id} has no recorded settings"):
        continue_flow(empty.info.run_id, 1)
    with pytest.raises(RunError, match="no run 'fedcba98'"):
        continue_flow("fedcba98", 1)
    with pytest.raises(DataError, match=r"test\[5:2\] selects no images of 'test' \(60 images\)"):
        evaluate_flow(run_id, "test[5:2]")  # was Keras' UnboundLocalError on an empty dataset


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: what a decompression bomb shows first."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.slow
def test_predict_refuses_non_regular_files_huge_images_and_bad_output_paths(prefect_harness, mlflow_store, idx_folder,
                                                                           tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        image_files([str(fifo)])  # returns at once: a FIFO is never opened
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        image_files([str(tmp_path)])
    fifo.unlink()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))
    with pytest.raises(DataError, match="bomb.png: too large to decode safely"):
        read_image(bomb, (28, 28, 1))
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(5000, 5000))  # under the limit: refused by its header, never decoded
    with pytest.raises(DataError, match="big.png is 5000x5000; the model takes grayscale 28x28"):
        read_image(big, (28, 28, 1))

    run_id = train_flow("mnist", tiny_overrides(idx_folder) + ["plots=none"])
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="--csv .*a_file/out.csv: cannot write to .*a_file"):
        predict_flow(run_id, [str(good)], str(tmp_path / "a_file" / "out.csv"))
    with pytest.raises(DataError, match="1 of 2 images could not be predicted .*big.png is 5000x5000"):
        predict_flow(run_id, [str(good), str(big)], str(tmp_path / "new" / "out.csv"))  # the good one has its row
    assert [line.split(",")[0] for line in (tmp_path / "new" / "out.csv").read_text().splitlines()] == \
        ["file", str(good), str(big)]
    rows = predict_flow(run_id, [str(good)], str(tmp_path / "new" / "deeper" / "out.csv"))
    assert (tmp_path / "new" / "deeper" / "out.csv").read_text().splitlines()[1].startswith(f"{good},{rows[0]['label']}")


def test_an_experiment_made_by_another_machine_a_moment_ago_is_used(mlflow_store, monkeypatch):
    made_elsewhere = mlflow.create_experiment("faces")  # after this machine looked, before it creates
    real_lookup, looks = mlflow.get_experiment_by_name, []

    def stale_first(name):
        looks.append(name)
        return None if len(looks) <= 2 else real_lookup(name)  # both looks before the create saw nothing

    monkeypatch.setattr(mlflow, "get_experiment_by_name", stale_first)
    assert store.experiment_id({"experiment": "faces"}) == made_elsewhere
    assert len(looks) == 3
