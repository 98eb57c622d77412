import numpy as np
import pytest
import tensorflow as tf

from cnnflow.components import registry


def loss(name, from_logits):
    return registry.build("loss", {"name": name, "from_logits": from_logits})


@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_crossentropy_matches_the_chapter(from_logits):
    prediction = 0.8 if from_logits else float(tf.sigmoid(0.8))
    value = loss("binary_crossentropy", from_logits)(np.array([1.0]), np.array([prediction]))
    assert float(value) == pytest.approx(0.3711, abs=1e-4)


@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_and_sparse_crossentropy_match_the_chapter(from_logits):
    logits = np.array([[1.5, 0.8, 2.1]])
    prediction = logits if from_logits else tf.nn.softmax(logits).numpy()
    categorical = loss("categorical_crossentropy", from_logits)(np.array([[0.0, 0.0, 1.0]]), prediction)
    sparse = loss("sparse_categorical_crossentropy", from_logits)(np.array([2]), prediction)
    assert float(categorical) == pytest.approx(0.5996, abs=1e-4)
    assert float(sparse) == pytest.approx(0.5996, abs=1e-4)
