import keras
import numpy as np
import pytest
import scipy.signal
import tensorflow as tf

from cnnflow.components import fundamentals as F


def test_conv1d_with_stride_matches_the_corrected_chapter_example():
    result = F.conv1d([1, 3, 2, 4, 5, 6, 1, 3], [1, 0, 3, 1, 2], p=2, s=2)
    np.testing.assert_allclose(result, [5, 16, 24, 19])


@pytest.mark.parametrize("mode", F.PADDING_MODES)
def test_conv1d_padding_modes_match_numpy_convolve(mode):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=11), rng.normal(size=5)
    np.testing.assert_allclose(F.conv1d(x, w, p=F.padding_for(mode, len(w))), np.convolve(x, w, mode=mode))


def test_output_size_formula():
    assert F.output_size(n=8, m=5, p=2, s=2) == 4
    assert F.output_size(n=28, m=5, p=2, s=1) == 28
    assert F.output_size(n=10, m=3, p=0, s=3) == 3
    with pytest.raises(ValueError, match="stride"):
        F.output_size(8, 3, 0, 0)
    with pytest.raises(ValueError, match="same"):
        F.padding_for("same", 4)
    with pytest.raises(ValueError, match="full, same, valid"):
        F.padding_for("circular", 3)


def test_conv2d_same_matches_scipy():
    X = [[1, 3, 2, 4], [5, 6, 1, 3], [1, 2, 0, 2], [3, 4, 3, 2]]
    W = [[1, 0, 3], [1, 2, 1], [0, 1, 1]]
    np.testing.assert_allclose(F.conv2d(X, W, p=(1, 1), s=(1, 1)), scipy.signal.convolve2d(X, W, mode="same"))


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv2d_with_padding_and_stride_matches_tf_nn(stride):
    rng = np.random.default_rng(stride)
    X, W = rng.normal(size=(9, 8)), rng.normal(size=(3, 3))
    padded = np.pad(X, 1)[np.newaxis, :, :, np.newaxis]
    # tf.nn.conv2d is a cross-correlation: give it the flipped kernel to get a convolution.
    expected = tf.nn.conv2d(padded, W[::-1, ::-1, np.newaxis, np.newaxis], strides=stride, padding="VALID")
    np.testing.assert_allclose(F.conv2d(X, W, p=(1, 1), s=(stride, stride)), expected[0, :, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool, tf_pool", [(F.max_pool2d, tf.nn.max_pool2d), (F.mean_pool2d, tf.nn.avg_pool2d)])
def test_pooling_matches_tf_nn(pool, tf_pool):
    X = np.random.default_rng(1).normal(size=(6, 6))
    expected = tf_pool(X[np.newaxis, :, :, np.newaxis], ksize=2, strides=2, padding="VALID")[0, :, :, 0]
    np.testing.assert_allclose(pool(X, 2), expected, rtol=1e-6)
    assert pool(X, 3, stride=1).shape == (4, 4)


def test_parameter_counts_of_conv_vs_dense_match_keras():
    conv = keras.layers.Conv2D(64, 5)
    conv.build((None, 14, 14, 32))
    assert F.conv_params((5, 5), 32, 64) == conv.count_params() == 51_264
    dense = keras.layers.Dense(1024)
    dense.build((None, 3136))
    assert F.dense_params(3136, 1024) == dense.count_params() == 3_212_288
    # A conv layer's weights do not grow with the image; a dense layer's on the same image do.
    assert F.conv_params((5, 5), 1, 32) < F.dense_params(28 * 28, 28 * 28)
