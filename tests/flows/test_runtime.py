"""runtime.* settings: the environment TensorFlow reads, the warning when it is too late for it, and a
mixed-precision training through the real flow."""

import contextlib
import logging

import keras
import pytest
from mlflow import MlflowClient

from cnnflow.flows.setup import precision, runtime
from cnnflow.flows.train import train_flow
from conftest import make_idx_folder, tiny_overrides

DEFAULTS = {"precision": "float32", "jit_compile": False, "intra_op_threads": None, "inter_op_threads": None,
            "onednn": True}


def test_threads_and_onednn_become_the_variables_tensorflow_reads():
    assert runtime.environment(DEFAULTS) == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert runtime.environment(DEFAULTS | {"onednn": False, "intra_op_threads": 1, "inter_op_threads": 2}) == {
        "TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2"}


def test_settings_tensorflow_can_no_longer_take_are_named_in_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    logger = logging.getLogger("test-runtime")
    with caplog.at_level(logging.WARNING, logger="test-runtime"):
        runtime.use_environment(DEFAULTS, logger)  # TensorFlow's own defaults: nothing to say
        assert not caplog.records
        runtime.use_environment(DEFAULTS | {"intra_op_threads": 1}, logger)
    assert "TF_NUM_INTRAOP_THREADS=1 takes effect in a new process only" in caplog.text


def test_a_model_draws_the_seeds_of_an_undisturbed_process_while_another_thread_draws_from_random():
    import random
    import threading

    import numpy as np

    from cnnflow.components import registry

    def seeds_and_weights(disturbed: bool, own: bool):
        keras.utils.set_random_seed(7)
        if disturbed:  # what a websocket ping in Prefect's event-loop thread does, at a moment load decides
            ping = threading.Thread(target=random.getrandbits, args=(32,))
            ping.start()
            ping.join()
        with runtime.own_seed_draws(7) if own else contextlib.nullcontext():
            model = registry.build("model", "mnist_cnn", input_shape=(28, 28, 1), num_classes=10)
        seeds = [v.numpy().tolist() for v in model.variables if v.name == "seed_generator_state"]
        return seeds, np.concatenate([w.ravel() for w in model.get_weights()])

    undisturbed = seeds_and_weights(disturbed=False, own=False)
    assert seeds_and_weights(disturbed=True, own=False)[0] != undisturbed[0]  # the race the guard is for
    guarded = seeds_and_weights(disturbed=True, own=True)
    assert guarded[0] == undisturbed[0]
    np.testing.assert_array_equal(guarded[1], undisturbed[1])
    from keras.src.random import seed_generator

    with runtime.own_seed_draws(7):  # the generator is this thread's: another one still draws from the shared
        shared = random.getstate()
        other = threading.Thread(target=seed_generator.make_default_seed)
        other.start()
        other.join()
        assert random.getstate() != shared


@pytest.fixture
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")  # the policy is global: leave none behind


@pytest.mark.slow
def test_a_mixed_bfloat16_training_runs_end_to_end(prefect_harness, mlflow_store, tmp_path, float32_afterwards):
    overrides = tiny_overrides(make_idx_folder(tmp_path / "idx"), epochs=1, model="mnist_cnn") + [
        "runtime.precision=mixed_bfloat16"]
    run = MlflowClient().get_run(train_flow("mnist", overrides))
    model = keras.models.load_model(f"{run.data.tags['output_dir']}/model.keras")
    assert model.get_layer("conv_1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("conv_1").kernel.dtype == "float32"  # weights stay float32
    assert run.data.params["runtime.precision"] == "mixed_bfloat16"
    assert run.data.metrics["test_accuracy"] >= 0.6  # it learns: 0.9 here after one epoch (chance: 0.1)


def test_auto_precision_is_measured_recorded_with_why_and_kept_by_a_continuation(
        prefect_harness, mlflow_store, tmp_path, monkeypatch, float32_afterwards):
    import json

    from cnnflow.flows.train import continue_flow

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # a CPU with bfloat16 units
    monkeypatch.setattr(precision, "WINDOW_SECONDS", 0.02)  # the choice, not the speeds, is tested here
    overrides = tiny_overrides(make_idx_folder(tmp_path / "idx"), epochs=1, model="mnist_cnn") + ["plots=none"]
    run = MlflowClient().get_run(train_flow("mnist", overrides))
    chosen, why = run.data.params["runtime.precision"], run.data.params["precision.why"]
    assert chosen in ("float32", "mixed_bfloat16") and run.data.tags["precision"] == chosen
    assert why.startswith("auto: mixed_bfloat16 ran mnist_cnn's training step at ") and "measured now in" in why
    # the machine turns out otherwise since: the kept timings say the other precision
    kept = next((tmp_path / "cache" / "cnnflow" / "precision").glob("*.json"))
    record = json.loads(kept.read_text())
    flipped = {"float32": 0.01, "mixed_bfloat16": 0.5} if chosen == "mixed_bfloat16" else {"float32": 0.5,
                                                                                             "mixed_bfloat16": 0.01}
    record["timings"] = {p: {"wall": t, "cpu": t} for p, t in flipped.items()}
    kept.write_text(json.dumps(record))
    continue_flow(run.info.run_id, 1)  # goes on in the precision it started with
    assert MlflowClient().get_run(run.info.run_id).data.tags["precision"] == chosen


def test_thread_settings_are_set_before_tensorflow_starts_in_the_process_that_composes_them():
    import subprocess
    import sys

    code = """
import os, sys
from cnnflow.flows.setup import runtime
from cnnflow.flows.setup.config import compose_config
seen = []
original = runtime.use_environment
runtime.use_environment = lambda settings, logger=None: (seen.append("tensorflow" in sys.modules), original(settings, logger))
compose_config("quickstart", ["runtime.intra_op_threads=1", "runtime.onednn=false"])
print(seen, os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_ENABLE_ONEDNN_OPTS"], "tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[False]", "1", "0", "True"], out.stderr[-2000:]  # set, then TF started


TWO_DEVICES = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]  # two logical devices stand in for two GPUs
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import mlflow
from prefect.testing.utilities import prefect_test_harness
from cnnflow.flows.train import train_flow
from conftest import make_idx_folder, tiny_overrides
"""

MIRRORED = TWO_DEVICES + """
overrides = tiny_overrides(make_idx_folder(__import__("pathlib").Path("idx")), epochs=3) + ["plots=none"]
with prefect_test_harness(server_startup_timeout=180):  # 30 s is not always enough on a busy machine
    runs = [mlflow.get_run(train_flow("mnist", overrides + [f"runtime.strategy={s}", f"+tags.s={s}"]))
            for s in ("default", "mirrored")]
for run in runs:
    print(run.data.tags["replicas"], run.info.status, run.data.metrics["loss"], run.data.metrics["test_accuracy"])
"""

MIRRORED_STOPPED_INSIDE_AN_EPOCH = TWO_DEVICES + """
import hashlib, json
from pathlib import Path

import keras
import numpy as np
from cnnflow.flows.orchestration import interrupts

def trained(run):
    weights = keras.models.load_model(Path(run.data.tags["output_dir"]) / "model.keras").get_weights()
    curves = {name: [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run.info.run_id, name),
                                             key=lambda m: m.step)] for name in ("loss", "accuracy", "val_loss")}
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest(), curves

overrides = tiny_overrides(make_idx_folder(Path("idx")), epochs=2) + ["plots=none", "runtime.strategy=mirrored",
                                                                     "runtime.precision=float32"]
check, steps = interrupts.raise_if_received, []

def power_cut_after_step_6():  # step 2 of epoch 2, its position taken
    steps.append(1)
    if len(steps) == 6:
        raise RuntimeError("power cut")
    check()

with prefect_test_harness(server_startup_timeout=180):
    plain = trained(mlflow.get_run(train_flow("mnist", overrides + ["train.checkpoint_minutes=0", "mlflow_experiment=plain"])))
    interrupts.raise_if_received = power_cut_after_step_6
    try:
        train_flow("mnist", overrides + ["train.checkpoint_minutes=0.000001"])
    except RuntimeError:
        pass
    interrupts.raise_if_received = check
    resumed = mlflow.get_run(train_flow("mnist", overrides + ["train.checkpoint_minutes=0.000001"]))
print(json.dumps({"replicas": resumed.data.tags["replicas"], "equal": trained(resumed) == plain}))
"""


def _on_two_devices(script: str, tmp_path) -> str:
    """What `script` prints, run in a process whose CPU is split in two logical devices."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(__import__("os").environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_a_mirrored_training_on_two_devices_learns_like_one(tmp_path):
    lines = [line.split() for line in _on_two_devices(MIRRORED, tmp_path).strip().splitlines()[-2:]]
    assert [line[:2] for line in lines] == [["1", "FINISHED"], ["2", "FINISHED"]]
    (_, _, loss_one, accuracy_one), (_, _, loss_two, accuracy_two) = lines
    # the global batch is split across the replicas: the same recipe learns the same (each replica
    # draws its own dropout masks, so the curves are not identical): from ln(10) = 2.30 to a twentieth
    assert float(loss_one) < 0.115 and float(loss_two) < 0.115
    assert float(accuracy_two) == pytest.approx(float(accuracy_one), abs=0.05) and float(accuracy_two) >= 0.9


@pytest.mark.slow
def test_a_mirrored_training_stopped_inside_an_epoch_goes_on_bit_for_bit(tmp_path):
    """Positions under MirroredStrategy keep each replica's running metric totals apart (read whole,
    the resumed epoch's loss differed from the never-stopped one in its last bits)."""
    import json

    said = json.loads(_on_two_devices(MIRRORED_STOPPED_INSIDE_AN_EPOCH, tmp_path).strip().splitlines()[-1])
    assert said == {"replicas": "2", "equal": True}
