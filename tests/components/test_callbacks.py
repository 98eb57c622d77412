"""The callbacks every training gets, on a real (tiny) Keras model."""

from __future__ import annotations

import keras
import pytest

from cnnflow.components.callbacks import StopOnDivergence


def _watching(divergence: StopOnDivergence) -> StopOnDivergence:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    divergence.set_model(model)
    divergence.on_epoch_begin(0)
    return divergence


@pytest.mark.parametrize("first_loss, losses, diverged_at", [
    (None, [2.3, 1.0, 2400.0], 3),         # a fresh training: 1000x its first batch's loss
    (None, [2.3, float("nan")], 2),        # NaN at once
    (0.4, [2e-6, 1.8e-4, 3e-3], None),     # resumed near convergence: noise around 0 is no divergence
    (0.4, [2e-6, 401.0], 2),               # ... but 1000x its first epoch's loss is
    (None, [1e-6, 5e-3, 9.0], None),       # a warm start from ~0: the scale never drops below 0.01
    (None, [1e-6, 11.0], 2),
])
def test_divergence_is_growth_against_the_trainings_first_loss(first_loss, losses, diverged_at):
    divergence = _watching(StopOnDivergence(1000, first_loss=first_loss))
    for batch, loss in enumerate(losses):
        divergence.on_train_batch_end(batch, {"loss": loss})
    assert (divergence.diverged or {}).get("batch") == diverged_at


def test_an_epoch_the_data_ran_out_in_is_an_error_not_a_finished_epoch(tmp_path):
    """Keras ends a fit whose data runs out before `steps_per_epoch` with a warning only; the run
    would look finished with short epochs. The checkpoint refuses to keep such an epoch."""
    import numpy as np
    import tensorflow as tf

    from cnnflow.flows.tracking.checkpoints import EpochCheckpoint
    from cnnflow.components.errors import DataError

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    three_batches = tf.data.Dataset.from_tensor_slices((np.ones((12, 2)), np.ones((12, 1)))).batch(4)
    with pytest.raises(DataError, match="epoch 1 ended after 3 of its 5 steps"):
        model.fit(three_batches, steps_per_epoch=5, epochs=2, verbose=0,
                  callbacks=[EpochCheckpoint(tmp_path, steps=5)])
    assert not list(tmp_path.iterdir())
    model.fit(three_batches, steps_per_epoch=3, epochs=1, verbose=0, callbacks=[EpochCheckpoint(tmp_path, steps=3)])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-epoch0001.json", "checkpoint-epoch0001.keras"]


def test_a_position_in_the_first_epoch_writes_the_model_file_its_arrays_fill(tmp_path):
    """build_model hands the untrained model over in memory (flows/train.py): no file. A position
    taken inside the first epoch writes that file first; file and arrays give back the model of that step."""
    import json

    import numpy as np
    import tensorflow as tf

    from cnnflow.flows.tracking.checkpoints import EpochCheckpoint, position_parts, restore_position

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    batches = tf.data.Dataset.from_tensor_slices((np.ones((16, 2)), np.ones((16, 1)))).batch(4)
    checkpoint = EpochCheckpoint(tmp_path, minutes=1e-9, steps=4, base="untrained.keras")
    at_step_2 = []

    class PowerCut(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                checkpoint.finish_writing()
                at_step_2.extend(np.array(part) for part in position_parts(self.model))
                raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        model.fit(batches, epochs=1, verbose=0, callbacks=[checkpoint, PowerCut()])
    state = json.loads((tmp_path / "checkpoint-epoch0001-batch000002.json").read_text())
    assert state["file"] == "untrained.keras" and not list(tmp_path.glob("partial-*"))
    restored = keras.models.load_model(tmp_path / state["file"])
    restore_position(restored, str(tmp_path / state["arrays"]))
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(at_step_2, position_parts(restored)))


@pytest.mark.parametrize("epochs, warned", [
    ([(0.60, 0.47), (0.80, 0.77), (0.90, 0.85)], None),   # learning: quiet
    ([(0.30, 0.11), (0.45, 0.12)], None),                 # nothing learnt yet either way: quiet
    ([(0.60, 0.56), (0.80, 0.37), (0.88, 0.12), (0.90, 0.11)], 3),  # fast_cnn's collapse on 2,400 images, once
])
def test_validation_at_chance_while_training_rises_is_said_once(epochs, warned, caplog):
    import logging

    from cnnflow.components.callbacks import WarnAtChance

    watch = WarnAtChance(0.1063, logging.getLogger("test"))
    with caplog.at_level(logging.WARNING):
        for epoch, (trained, validated) in enumerate(epochs):
            watch.on_epoch_end(epoch, {"accuracy": trained, "val_accuracy": validated})
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert said[0].startswith(f"epoch {warned}: val_accuracy 0.1200 is at chance (0.1063")
