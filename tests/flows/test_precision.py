"""runtime.precision=auto chosen by measuring (flows/setup/precision.py): the choice on recorded timings, the
calibration kept per machine and model, the setting that turns it off, a candidate that fails, and a
training that is the same whether its process measured first or not."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnflow.flows.setup import precision, runtime
from cnnflow.flows.setup.config import compose_config
from cnnflow.flows.setup.precision import StepTime

FEATURES = {"input_shape": [6, 6, 1], "num_classes": 3}


@pytest.fixture
def calibrations(tmp_path, monkeypatch):
    """A cache folder of the test's own, on a CPU with bfloat16 units (the flags name them)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "WINDOW_SECONDS", 0.02)  # the choice, not the speeds, is tested here
    yield tmp_path / "cache" / "cnnflow" / "precision"
    keras.mixed_precision.set_global_policy("float32")


def settings(*overrides: str) -> dict:
    return compose_config("quickstart", ["data.batch_size=8", *overrides])


def small_model():
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax", dtype="float32")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("bf16, chosen", [
    (StepTime(wall=0.010, cpu=0.020), "mixed_bfloat16"),  # 1.5x in both
    (StepTime(wall=0.010, cpu=0.028), "float32"),  # faster on the clock, but uses about as much CPU
    (StepTime(wall=0.014, cpu=0.028), "float32"),  # 1.07x: not worth float32's bit-exact repeats
    (StepTime(wall=0.019, cpu=0.037), "float32"),  # slower (emulated, or batch norm's conversions)
])
def test_the_mixed_precision_is_chosen_only_when_clearly_faster_in_wall_and_cpu_time(bf16, chosen):
    timings = {"float32": StepTime(wall=0.015, cpu=0.030), "mixed_bfloat16": bf16}
    choice = precision.decided("mixed_bfloat16", timings, "mnist_cnn", "measured now")
    assert choice.precision == chosen
    assert f"ran mnist_cnn's training step at {0.015 / bf16.wall:.2f}x float32's speed" in choice.why
    assert choice.basis == ("auto 1.50x" if chosen != "float32" else f"auto, bf16 {0.015 / bf16.wall:.2f}x")


def test_a_gpu_measures_float16_the_same_way():
    timings = {"float32": StepTime(0.02, 0.02), "mixed_float16": StepTime(0.008, 0.009)}
    assert precision.decided("mixed_float16", timings, "celeba_cnn", "").precision == "mixed_float16"


def test_the_first_training_measures_and_keeps_it_the_next_reads_it_another_batch_size_measures(calibrations,
                                                                                               monkeypatch):
    measured = []
    real = precision.step_times
    monkeypatch.setattr(precision, "step_times", lambda *args: measured.append(args[1]) or real(*args))
    first = precision.chosen(settings(), FEATURES, small_model)
    assert measured == [["float32", "mixed_bfloat16"]]
    assert first.precision in ("float32", "mixed_bfloat16") and "measured now in" in first.why
    kept = list(calibrations.glob("*.json"))
    assert len(kept) == 1 and f"kept in {kept[0]}" in first.why
    record = json.loads(kept[0].read_text())
    assert record["key"]["model"] == "mnist_cnn" and record["key"]["batch_size"] == "8"
    assert record["key"]["cpu"] == runtime.fingerprint()["cpu"]
    assert set(record["timings"]) == {"float32", "mixed_bfloat16"}

    again = precision.chosen(settings(), FEATURES, small_model)
    assert len(measured) == 1  # read, not measured
    assert again.precision == first.precision and f"kept in {kept[0]}" in again.why
    assert "measured on " in again.why

    precision.chosen(settings("data.batch_size=16"), FEATURES, small_model)
    assert len(measured) == 2 and len(list(calibrations.glob("*.json"))) == 2


def test_an_unreadable_calibration_is_measured_again(calibrations):
    first = precision.chosen(settings(), FEATURES, small_model)
    kept = next(calibrations.glob("*.json"))
    kept.write_text("{not json")
    assert "measured now in" in precision.chosen(settings(), FEATURES, small_model).why
    assert json.loads(kept.read_text())["timings"]  # and kept again, whole
    assert first.precision in ("float32", "mixed_bfloat16")


def test_calibrate_false_means_float32_on_a_cpu_without_measuring(calibrations, monkeypatch):
    monkeypatch.setattr(precision, "step_times", lambda *args: pytest.fail("measured with runtime.calibrate=false"))
    choice = precision.chosen(settings("runtime.calibrate=false"), FEATURES, small_model)
    assert (choice.precision, choice.basis) == ("float32", "auto, not measured")
    assert not calibrations.exists()


def test_a_cpu_without_bfloat16_units_gets_float32_without_measuring(calibrations, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision, "step_times", lambda *args: pytest.fail("measured emulated bfloat16"))
    choice = precision.chosen(settings(), FEATURES, small_model)
    assert (choice.precision, choice.basis) == ("float32", "auto, no bf16 units")


def test_a_set_precision_is_kept_as_set(calibrations):
    choice = precision.chosen(settings("runtime.precision=mixed_bfloat16"), FEATURES, None)
    assert (choice.precision, choice.why, choice.basis) == ("mixed_bfloat16", "runtime.precision=mixed_bfloat16", "set")


def test_a_candidate_without_a_kernel_for_an_op_falls_back_to_float32_in_one_line(calibrations):
    def with_lgamma():  # TensorFlow has no bfloat16 kernel of Lgamma on a CPU
        model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Lambda(lambda x: tf.math.lgamma(x + 1.0)),
                                  keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax", dtype="float32")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    choice = precision.chosen(settings(), FEATURES, with_lgamma)
    assert (choice.precision, choice.basis) == ("float32", "auto, bf16 failed")
    assert choice.why.startswith("auto: mixed_bfloat16 failed in a training step of mnist_cnn (")
    assert "Lgamma" in choice.why and "\n" not in choice.why
    assert keras.mixed_precision.global_policy().name == "float32"  # nothing of the attempt is left behind


def test_measuring_first_leaves_the_trainings_model_as_a_process_that_never_measured_builds_it(calibrations):
    from cnnflow.flows.train import _compiled_model

    cfg = settings("runtime.precision=float32")

    def model_weights():
        keras.utils.set_random_seed(cfg["seed"])
        model = _compiled_model(cfg, FEATURES | {"input_shape": [8, 8, 1]}, steps_per_epoch=1)
        return [layer.name for layer in model.layers], [w.numpy() for w in model.weights]

    keras.backend.clear_session()
    names, weights = model_weights()
    keras.backend.clear_session()
    precision.step_times(small_model, ["float32", "mixed_bfloat16"], (np.zeros((8, 6, 6, 1), "float32"),
                                                                      np.zeros(8, "int64")))
    after_names, after_weights = model_weights()
    assert after_names == names  # Keras' name counters were cleared with the measured models
    assert all(np.array_equal(a, b) for a, b in zip(weights, after_weights))
