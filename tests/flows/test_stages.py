"""Staged training: continue in a new process, resume after kill -9, Ctrl-C, registry alias,
evaluate and predict. Real processes, a real MLflow store, Prefect's test harness."""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cnnflow.flows.tracking.checkpoints import read_checkpoint
from cnnflow.components.data.celeba_layout import write_celeba
from cnnflow.components.errors import DataError, RunError
from cnnflow.flows.tracking import promotion
from cnnflow.flows.inference import evaluate_flow, predict_flow
from cnnflow.flows.train import continue_flow, train_flow
from conftest import finished_checkpoint, make_idx_folder, tiny_overrides

STEPS_PER_EPOCH = 4  # 200 training images, batch 64


@pytest.fixture
def idx(tmp_path):
    return make_idx_folder(tmp_path / "idx")


def cli(args: list[str], **popen) -> subprocess.Popen:
    """`cnnflow ...` in a new process, against this test's MLflow store and Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value() or "", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def steps(run_id: str, metric: str = "loss") -> list[int]:
    return [m.step for m in sorted(MlflowClient().get_metric_history(run_id, metric), key=lambda m: m.step)]


def output_of(run_id: str) -> Path:
    return Path(MlflowClient().get_run(run_id).data.tags["output_dir"])


@pytest.mark.slow
def test_continue_in_a_new_process_extends_one_history(prefect_harness, mlflow_store, idx):
    run_id = train_flow("mnist", tiny_overrides(idx))
    process = cli(["continue", run_id, "--epochs", "1", "optimizer.learning_rate=0.0005"])
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert steps(run_id, metric) == [1, 2]
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "test_accuracy")] == [1, 2]
    assert run.data.tags["stage.2.epochs"] == "2-2" and run.data.tags["stages"] == "2"
    assert "optimizer.learning_rate=0.0005" in run.data.tags["stage.2.overrides"]
    checkpoint = finished_checkpoint(run_id, output_of(run_id))
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]["loss"]) == 2
    model = keras.models.load_model(checkpoint["path"])
    assert int(model.optimizer.iterations) == 2 * STEPS_PER_EPOCH
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0005)
    assert len(json.loads((output_of(run_id) / "history.json").read_text())["val_loss"]) == 2


def test_continue_refuses_changes_to_what_is_trained(prefect_harness, mlflow_store, idx):
    run_id = train_flow("mnist", tiny_overrides(idx) + ["runtime.precision=float32"])
    with pytest.raises(RunError, match=r"cannot change model.dropout_rate: 0.3 -> 0.2"):
        continue_flow(run_id, 1, ["model.dropout_rate=0.2"])
    with pytest.raises(RunError, match=r"runtime.precision: 'float32' -> 'mixed_bfloat16'"):
        continue_flow(run_id, 1, ["runtime.precision=mixed_bfloat16"])
    with pytest.raises(RunError, match="no run 'nope'"):
        continue_flow("nope", 1)


def test_a_relative_data_path_is_continued_from_another_folder_and_other_data_is_refused(
        prefect_harness, mlflow_store, monkeypatch, tmp_path):
    make_idx_folder(tmp_path / "mdata")  # the store's folder is the working folder
    overrides = ["data.path=mdata"] + tiny_overrides(Path("unused"))[1:]  # typed relative, in the store's folder
    run_id = train_flow("mnist", overrides)
    recorded = MlflowClient().get_run(run_id).data.tags
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the same store (MLFLOW_TRACKING_URI), another working folder
    assert continue_flow(run_id, 1) == run_id  # the path was stored resolved
    shutil.copytree(tmp_path / "mdata", elsewhere / "copy")
    assert continue_flow(run_id, 1, ["data.path=copy"]) == run_id  # the same bytes elsewhere: accepted
    make_idx_folder(elsewhere / "other", seed=7)
    with pytest.raises(DataError) as refused:
        continue_flow(run_id, 1, ["data.path=other"])
    train = recorded["data.train_fingerprint"]
    assert len(train) == 64 and f"fingerprint {train[:16]}," in str(refused.value)
    assert "resume=false" in str(refused.value) and str(elsewhere / "other") in str(refused.value)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stages"] == "3"  # the refusal touched nothing
    with pytest.raises(RunError, match="cannot change model.dropout_rate"):  # what is trained stays frozen
        continue_flow(run_id, 1, ["data.path=copy", "model.dropout_rate=0.2"])


def test_evaluate_records_the_fingerprint_of_what_it_evaluated(prefect_harness, mlflow_store, idx):
    run_id = train_flow("mnist", tiny_overrides(idx) + ["plots=none"])
    evaluate_flow(run_id, "test")
    [evaluation] = mlflow.search_runs(filter_string=f"tags.evaluation_of = '{run_id}'", search_all_experiments=True,
                                      output_format="list")
    trained = MlflowClient().get_run(run_id).data.tags
    assert evaluation.data.tags["data.eval_fingerprint"] == trained["data.test_fingerprint"]
    make_idx_folder(idx, seed=7)  # the files overwritten in place
    from cnnflow.components.data import core

    core._cached_source.cache_clear()  # as a new process would read them
    with pytest.raises(DataError, match="used other data: its test examples"):
        evaluate_flow(run_id, "test")


RECIPES = {  # tiny and in float32, the precision whose results repeat bit for bit on one machine
    "mnist": lambda folder: tiny_overrides(make_idx_folder(folder)),  # dropout, batch norm
    "celeba": lambda folder: [f"data.path={write_celeba(folder, train=40, valid=12, test=12)}", "data.train_size=30",
                              "data.valid_size=8", "data.batch_size=8"],  # dropout, reshuffles, random crops and flips
}


def trained(run_id: str) -> tuple[str, dict[str, list[float]]]:
    """What a run ends with: a hash of its final weights and every per-epoch metric."""
    import hashlib

    weights = keras.models.load_model(output_of(run_id) / "model.keras").get_weights()
    curves = {name: [m.value for m in sorted(MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)]
              for name in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest(), curves


@pytest.mark.parametrize("recipe", RECIPES)
def test_stages_add_up_to_one_training_bit_for_bit(prefect_harness, mlflow_store, tmp_path, recipe):
    """train.epochs=1, then `continue` for 2: the weights and every epoch's metrics of train.epochs=3."""
    overrides = RECIPES[recipe](tmp_path / "data") + ["runtime.precision=float32", "plots=none"]
    whole = trained(train_flow(recipe, overrides + ["train.epochs=3"]))
    staged = train_flow(recipe, overrides + ["train.epochs=1"])
    continue_flow(staged, 2)
    assert trained(staged) == whole
    assert len(whole[1]["loss"]) == 3


@pytest.mark.parametrize("recipe", [pytest.param("mnist", marks=pytest.mark.smoke),
                                    pytest.param("celeba", marks=pytest.mark.slow)])  # ~50 s each; CI runs both
def test_a_training_stopped_three_ways_ends_as_if_never_stopped(prefect_harness, mlflow_store, tmp_path, recipe):
    """`cnnflow train` stopped with Ctrl-C inside its third epoch or later, the same command stopped with
    SIGTERM inside a later epoch, then with kill -9 inside a later one still, the same command once more:
    the weights and every epoch's metrics of the same training never stopped, which runs beside the resumes. A position is kept every 30 ms, and
    every command runs in a process of its own, as a user runs them. (This test's process once gave a
    float32 CelebA run other bits than a fresh process: a websocket ping had drawn from Python's
    `random` before the model drew its seeds there; runtime.own_seed_draws keeps those draws apart.)"""
    overrides = RECIPES[recipe](tmp_path / "data") + ["runtime.precision=float32", "plots=none", "train.epochs=12",
                                                      "train.checkpoint_minutes=0.0005"]
    command = ["train", f"experiment={recipe}", *overrides]
    store = Path(mlflow_store.removeprefix("sqlite:///")).parent
    process, never_stopped, folder, stops = cli(command, start_new_session=True), None, None, []
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        folder = wait_for_checkpoint(store, stops[-1]["epoch"] + 1 if stops else 2, process, inside=True, run=folder)
        os.killpg(process.pid, stop)
        said = process.communicate(timeout=120)[0]
        assert not stops or resumed_after(folder.name, stops[-1]) in said, said
        stops.append(read_checkpoint(folder))
        assert stops[-1]["epoch"] < 12, "the training ended before it was stopped"
        never_stopped = never_stopped or cli(command + ["mlflow_experiment=never-stopped"])
        process = cli(command, start_new_session=True)
    said = process.communicate(timeout=600)[0]
    assert process.returncode == 0 and resumed_after(folder.name, stops[-1]) in said, said
    said = never_stopped.communicate(timeout=600)[0]
    assert never_stopped.returncode == 0, said
    [reference] = MlflowClient().search_runs([mlflow.get_experiment_by_name("never-stopped").experiment_id])
    assert MlflowClient().get_run(folder.name).info.status == "FINISHED" and steps(folder.name) == list(range(1, 13))
    assert trained(folder.name) == trained(reference.info.run_id)


def resumed_after(run_id: str, checkpoint: dict) -> str:
    """What the same command says when it goes on from `checkpoint` (a stop may fall on an epoch's end)."""
    inside = f" and {checkpoint['batch']} steps of epoch" if checkpoint.get("batch") else ";"
    return f"resuming MLflow run {run_id} after epoch {checkpoint['epoch']}{inside}"


@pytest.mark.parametrize("recipe, elsewhere", [("mnist", False), ("celeba", False), ("mnist", True)],
                         ids=["mnist", "celeba", "mnist-on another machine"])
def test_a_training_stopped_inside_an_epoch_goes_on_from_that_step_bit_for_bit(prefect_harness, mlflow_store, tmp_path,
                                                                             recipe, elsewhere, monkeypatch, caplog):
    """A position taken after every step (train.checkpoint_minutes near 0); the training stops after step 2
    of epoch 2 of 2; the same command again goes on at step 3 and ends with the weights and every epoch's
    metrics of the same training never stopped and never checkpointed inside an epoch. `elsewhere`: the
    run folder is gone (the machine died; the job runs on another), so the position comes from the
    run's artifact store."""
    from cnnflow.flows.orchestration import interrupts

    overrides = RECIPES[recipe](tmp_path / "data") + ["runtime.precision=float32", "plots=none", "train.epochs=2"]
    never_stopped = trained(train_flow(recipe, overrides + ["train.checkpoint_minutes=0", "mlflow_experiment=plain"]))
    checks, check = [], interrupts.raise_if_received

    def power_cut_after_step_6():  # called after every step, once its position is taken
        checks.append(1)
        if len(checks) == 4 + 2:
            raise RuntimeError("power cut")
        check()

    overrides.append("train.checkpoint_minutes=0.000001")
    monkeypatch.setattr(interrupts, "raise_if_received", power_cut_after_step_6)
    with pytest.raises(RuntimeError, match="power cut"):
        train_flow(recipe, overrides)
    monkeypatch.setattr(interrupts, "raise_if_received", check)
    [stopped] = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe).experiment_id])
    assert read_checkpoint(output_of(stopped.info.run_id))["batch"] == 2
    if elsewhere:
        shutil.rmtree(output_of(stopped.info.run_id))
        _a_cut_off_position_upload_is_passed_over(stopped.info.run_id, tmp_path / "another")
    with caplog.at_level(logging.INFO):
        assert train_flow(recipe, overrides) == stopped.info.run_id
    assert f"resuming MLflow run {stopped.info.run_id} after epoch 1 and 2 steps of epoch 2" in caplog.text
    assert trained(stopped.info.run_id) == never_stopped
    positions, waited = ({m.step: m.value for m in MlflowClient().get_metric_history(stopped.info.run_id, name)}
                         for name in ("positions", "position_seconds"))
    assert positions[2] == 1 and waited[2] > 0  # the resumed epoch 2 kept its position once more, after step 3 of 4
    uploads = MlflowClient().get_metric_history(stopped.info.run_id, "position_upload_seconds")
    assert {upload.step for upload in uploads} <= {1, 2} and 2 in {upload.step for upload in uploads}
    # finished: the artifact store (a folder here) holds the newest epoch's checkpoint; no copy, no position stays
    assert sorted(path.name for path in output_of(stopped.info.run_id).glob("checkpoint-*")) == []


def _a_cut_off_position_upload_is_passed_over(run_id: str, folder: Path) -> None:
    """The newest stored position, its arrays cut short as by a dead connection: an older checkpoint
    is fetched instead, saying why. (The arrays are put back whole after.)"""
    from urllib.parse import urlparse

    from cnnflow.flows.tracking import checkpoints

    [(newest, slot), *_] = checkpoints._stored_states(run_id)
    assert (newest["epoch"], newest["batch"]) == (1, 2)
    arrays = Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path) / slot / "position.npz"
    whole = arrays.read_bytes()
    arrays.write_bytes(whole[: len(whole) // 2])
    folder.mkdir()
    fetched, skipped = checkpoints.newest_checkpoint(run_id, folder, logging.getLogger("test"))
    arrays.write_bytes(whole)
    assert skipped == ["the checkpoint of epoch 2 at step 2 in the artifact store is incomplete (its upload was cut off)"]
    assert (fetched["epoch"], fetched.get("batch", 0)) < (1, 2) and Path(fetched["path"]).is_file()


def test_continuing_a_schedule_fixed_to_the_first_stage_says_what_the_new_epochs_get(prefect_harness, mlflow_store,
                                                                                       idx, caplog):
    run_id = train_flow("mnist", tiny_overrides(idx) + ["optimizer=adam_cosine", "plots=none"])
    with caplog.at_level(logging.WARNING):
        continue_flow(run_id, 2)
    [said] = [r.getMessage() for r in caplog.records if "not stretched" in r.getMessage()]
    assert said == ("the learning rate follows this run's CosineDecay over its first 1 epochs, not stretched over "
                    "epochs 2-3: they train at 0 falling to 0 (a new run with train.epochs=3 would spread the "
                    "schedule over all of them)")


def test_a_run_going_on_in_another_environment_trains_on_and_says_what_differs(prefect_harness, mlflow_store, idx,
                                                                               monkeypatch, caplog):
    import tensorflow as tf

    from cnnflow.flows.setup import runtime

    run_id = train_flow("mnist", tiny_overrides(idx) + ["plots=none"])
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["env.tensorflow"] == tf.__version__ and tags["env.keras"] == keras.__version__
    assert tags["env.cpus"] == str(len(os.sched_getaffinity(0))) and tags["env.devices"] == "CPU:0"
    with caplog.at_level(logging.WARNING):
        continue_flow(run_id, 1)  # where it started: nothing to say
        here = runtime.fingerprint
        monkeypatch.setattr(runtime, "fingerprint", lambda: {**here(), "cpu": "Another CPU", "onednn": "off"})
        continue_flow(run_id, 1)
    said = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert said == [f"run {run_id} goes on in another environment than the one it started in (cpu {tags['env.cpu']!r} "
                    f"-> 'Another CPU'; onednn 'on' -> 'off'): it trains on, but its results will not repeat bit for "
                    f"bit those of a training never stopped"]
    assert steps(run_id) == [1, 2, 3]


def wait_for_checkpoint(store: Path, epochs: int, process: subprocess.Popen, inside: bool = False,
                        run: Path | None = None) -> Path:
    """The run folder (`run`, else any in the store), once it has the checkpoint of `epochs` epochs
    (`inside`: a position inside a later epoch)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        for state in run.glob("checkpoint-epoch*.json") if run else store.glob("outputs/*/*/checkpoint-epoch*.json"):
            with contextlib.suppress(OSError, ValueError):  # replaced while read
                checkpoint = json.loads(state.read_text())
                if checkpoint["epoch"] >= epochs and (not inside or "batch" in checkpoint):
                    return state.parent
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_completed_epoch(prefect_harness, mlflow_store, idx, monkeypatch):
    from cnnflow.flows import fitting

    overrides = tiny_overrides(idx, epochs=25)
    process = cli(["train", "experiment=mnist", *overrides])
    folder = wait_for_checkpoint(Path(mlflow_store.removeprefix("sqlite:///")).parent, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    checkpoint = read_checkpoint(folder)
    killed_at = checkpoint["epoch"]
    assert 3 <= killed_at < 25
    saved = keras.models.load_model(checkpoint["path"]).get_weights()
    started_from = []

    def load_start_model(path, initial_epoch):  # what the resumed training starts from, as loaded
        model = load(path, initial_epoch)
        started_from.append(([w.copy() for w in model.get_weights()], int(model.optimizer.iterations)))
        return model

    load = fitting.load_start_model
    monkeypatch.setattr(fitting, "load_start_model", load_start_model)
    run_id = train_flow("mnist", overrides)
    [(weights, iterations)] = started_from
    assert all(np.array_equal(a, b) for a, b in zip(weights, saved, strict=True))  # the checkpoint's weights
    assert iterations == killed_at * STEPS_PER_EPOCH  # and its optimizer state
    assert run_id == folder.name  # the same MLflow run, resumed
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert steps(run_id) == list(range(1, 26))  # one unbroken curve, no epoch twice
    assert finished_checkpoint(run_id, folder)["epoch"] == 25


@pytest.mark.slow
def test_evaluate_after_train_matches_the_training_flows_test_accuracy(prefect_harness, mlflow_store, idx):
    run_id = train_flow("mnist", tiny_overrides(idx))
    trained = MlflowClient().get_run(run_id).data.metrics
    metrics = evaluate_flow(run_id, "test")
    assert metrics["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(trained["test_loss"], abs=1e-6)
    [evaluation] = MlflowClient().search_runs([MlflowClient().get_run(run_id).info.experiment_id],
                                             filter_string=f"tags.evaluation_of = '{run_id}'")
    assert evaluation.data.metrics["eval_accuracy"] == pytest.approx(metrics["accuracy"])
    first_20 = evaluate_flow(f"runs:/{run_id}/model", "test[:20]")["accuracy"]
    from cnnflow.components.data.idx import read_idx

    images = read_idx(idx / "t10k-images-idx3-ubyte.gz", 3)[:20, ..., None] / 255.0
    labels = read_idx(idx / "t10k-labels-idx1-ubyte.gz", 1)[:20]
    by_hand = np.mean(mlflow.keras.load_model(f"runs:/{run_id}/model").predict(images, verbose=0).argmax(1) == labels)
    assert first_20 == pytest.approx(by_hand)  # the slice is the first 20 test images, scored as Keras does


@pytest.mark.slow
def test_predict_digits_and_faces_from_files(prefect_harness, mlflow_store, idx, tmp_path):
    from cnnflow.components.data.idx import read_idx
    from cnnflow.components.data.celeba_layout import write_celeba

    digits_run = train_flow("mnist", tiny_overrides(idx))
    images = read_idx(idx / "t10k-images-idx3-ubyte.gz")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(pngs / f"digit{i}.png")
    rows = predict_flow(digits_run, [str(pngs)], str(tmp_path / "p.csv"), str(tmp_path / "p.png"))
    assert [Path(r["file"]).name for r in rows] == ["digit0.png", "digit1.png", "digit2.png"]
    softmax = mlflow.keras.load_model(f"runs:/{digits_run}/model").predict(images[:3, ..., None] / 255.0, verbose=0)
    assert [r["label"] for r in rows] == [str(d) for d in softmax.argmax(1)]  # what the model says, by hand
    np.testing.assert_allclose([r["probability"] for r in rows], softmax.max(1), rtol=1e-3)
    assert (tmp_path / "p.csv").read_text().startswith("file,label,probability")
    assert (tmp_path / "p.png").stat().st_size > 0

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="small.png is 32x32; the model takes grayscale 28x28"):
        predict_flow(digits_run, [str(tmp_path / "small.png")])
    Image.fromarray(np.dstack([images[0], images[0] // 2, images[0] // 3])).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour.png is a colour image"):
        predict_flow(digits_run, [str(tmp_path / "colour.png")])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        predict_flow(digits_run, [str(tmp_path / "broken.png")])

    celeba = write_celeba(tmp_path / "celeba", train=24, valid=8, test=8)
    faces_run = train_flow("celeba", [f"data.path={celeba}", "data.train_size=24", "data.valid_size=8",
                                      "data.batch_size=8", "train.epochs=1", "plots=none"])
    faces = sorted((celeba / "img_align_celeba").glob("*.jpg"))[:3]
    rows = predict_flow(faces_run, [str(f) for f in faces])
    assert [r["label"] in ("Female", "Male") for r in rows] == [True] * 3 and "p_Male" in rows[0]
    with pytest.raises(DataError, match="digit0.png is 28x28; the model takes RGB 178x218"):
        predict_flow(faces_run, [str(pngs / "digit0.png")])


def logged_run(value: float) -> str:
    """An MLflow run with a small logged model and a val_accuracy, as a training leaves it."""
    with mlflow.start_run() as run:
        logged = mlflow.keras.log_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), name="model")
        mlflow.log_metric("val_accuracy", value)
        mlflow.set_tag("model_uri", logged.model_uri)
    return run.info.run_id


@pytest.mark.slow
def test_registry_alias_moves_only_when_the_metric_improves(mlflow_store):
    import logging

    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("registry")  # not whatever experiment an earlier test made active
    cfg = {"registry": {"name": "digits", "alias": "champion", "metric": "val_accuracy", "mode": "max"}}
    log = logging.getLogger("test")
    first, worse, better = logged_run(0.90), logged_run(0.85), logged_run(0.95)
    assert promotion.maybe_register(cfg, first, log) == 1
    assert promotion.maybe_register(cfg, worse, log) == 2  # every run is a version; the alias stays
    assert MlflowClient().get_model_version_by_alias("digits", "champion").run_id == first
    assert MlflowClient().get_run(worse).data.tags["registry.outcome"] == \
        "registered digits v2; kept champion digits v1 (val_accuracy 0.9000)"
    assert promotion.maybe_register(cfg, better, log) == 3
    assert MlflowClient().get_model_version_by_alias("digits", "champion").run_id == better
    assert MlflowClient().get_run(better).data.tags["registry.previous_champion"].startswith("digits v1")
    assert [v.run_id for v in sorted(MlflowClient().search_model_versions("name = 'digits'"),
                                     key=lambda v: int(v.version))] == [first, worse, better]
    assert mlflow.keras.load_model("models:/digits@champion").count_params() == 3
    with pytest.raises(RunError, match="registry.metric='val_auc' is not logged"):
        promotion.maybe_register({"registry": dict(cfg["registry"], metric="val_auc")}, better, log)
