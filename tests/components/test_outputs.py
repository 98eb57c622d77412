"""What outputs mean: probabilities, labels, and the two accuracies of a one-logit model."""

import numpy as np
import pytest

from cnnflow.components import outputs

LOGITS = np.array([-1.0, 0.2, 0.7, 2.0, -0.3, 0.4, 0.3], dtype=np.float32)
LABELS = np.array([0, 1, 1, 1, 0, 1, 0])


def test_one_logit_probabilities_and_labels_threshold_the_logit_at_zero():
    chances = outputs.probabilities(LOGITS[:, None], from_logits=True)
    assert chances.shape == (7,)
    np.testing.assert_allclose(chances, 1 / (1 + np.exp(-LOGITS)), rtol=1e-6)
    assert outputs.predicted(chances).tolist() == [0, 1, 1, 1, 0, 1, 1]
    rows = outputs.labelled(chances[:2], ["Female", "Male"])
    assert rows[0]["label"] == "Female" and rows[0]["probability"] == np.float32(1 - chances[0])
    assert rows[1]["label"] == "Male" and rows[1]["p_Male"] == np.float32(chances[1])


def test_the_chapters_accuracy_of_a_one_logit_model_is_reported_beside_cnnflows():
    """The chapter compiled its face model with Keras' plain 'accuracy', which compares the logit
    with 0.5; `evaluated` reports that figure as accuracy_at_logit_0.5 next to the right one."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((1,)), keras.layers.Identity()])  # outputs the logits it is given
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=["accuracy"])  # as the chapter
    dataset = tf.data.Dataset.from_tensor_slices((LOGITS[:, None], LABELS)).batch(4)
    metrics, chances = outputs.evaluated(model, dataset, LABELS, from_logits=True)
    book = np.mean((LOGITS > 0.5) == LABELS)  # 5 of 7: the Male logits 0.2 and 0.4 count as Female
    assert book == 5 / 7 and metrics["accuracy_at_logit_0.5"] == book
    assert metrics["accuracy"] == pytest.approx(book)
    assert np.mean(outputs.predicted(chances) == LABELS) == 6 / 7  # logit above 0: only 0.3 is wrong
    assert metrics["roc_auc"] == pytest.approx(11 / 12)  # one of 4 x 3 positive/negative pairs is out of order


def test_binary_metrics_only_for_two_class_tasks():
    assert outputs.binary_metrics(np.array([0, 1, 2]), np.eye(3)) == {}
    softmax_two = outputs.binary_metrics(LABELS, np.stack([1 - LABELS, LABELS], axis=1).astype(float))
    assert softmax_two == {"roc_auc": 1.0}  # no logit to threshold: only the AUC


def test_a_one_class_test_set_still_gets_the_chapters_accuracy_but_no_auc():
    chances = outputs.probabilities(LOGITS[:, None], from_logits=True)
    only_male = np.ones(7, dtype=np.int64)
    assert outputs.binary_metrics(only_male, chances, from_logits=True) == {"accuracy_at_logit_0.5": 2 / 7}  # logits 0.7, 2.0


def test_a_test_set_the_data_source_cut_short_is_an_error_not_metrics():
    import keras
    import tensorflow as tf

    from cnnflow.components.errors import DataError

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    labels = np.array([0, 1, 2, 0, 1])
    five = tf.data.Dataset.from_tensor_slices((np.ones((5, 2)), labels)).batch(2)
    metrics, chances = outputs.evaluated(model, five, labels, from_logits=False)
    assert chances.shape == (5, 3) and 0 <= metrics["accuracy"] <= 1
    with pytest.raises(DataError, match="yielded 4 images where the split holds 5"):
        outputs.evaluated(model, five.unbatch().take(4).batch(2), labels, from_logits=False)


def test_a_streamed_test_set_states_its_size_so_keras_does_not_warn_and_a_short_one_is_an_error():
    """TFDS's records are filtered to the split's positions (a size tf.data does not know): Keras then
    warned "Your input ran out of data; interrupting training" at the end of every evaluation."""
    import warnings

    import keras
    import tensorflow as tf

    from cnnflow.components.data.core import Records
    from cnnflow.components.errors import DataError

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    labels = np.array([0, 1, 2, 0, 1])

    def test_set(held: int):
        images = Records(lambda: tf.data.Dataset.from_tensor_slices(np.ones((held, 2))), np.arange(5)).dataset()
        return tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(labels)).batch(2)

    assert test_set(5).cardinality() == 3
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        outputs.evaluated(model, test_set(5), labels, from_logits=False)
    assert not [w for w in warned if "ran out of data" in str(w.message)]
    with pytest.raises(DataError, match="yielded 4 images where the split holds 5"):
        outputs.evaluated(model, test_set(4), labels, from_logits=False)
