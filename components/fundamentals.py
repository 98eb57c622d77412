"""The CNN chapter's fundamentals, written out naively in NumPy so they can be read and checked.

Discrete convolution (with the kernel flipped, as in the textbook definition), zero padding, stride,
the output-size formula, max and mean pooling, and parameter counts of conv vs dense layers.
The chapter's own listings step the loop index by `s` *and* divide its bound by `s`, which is wrong
for s > 1; here output element i always starts at input position i * s.
"""

from __future__ import annotations

import numpy as np

PADDING_MODES = ("full", "same", "valid")


def output_size(n: int, m: int, p: int = 0, s: int = 1) -> int:
    """Length of a convolution output: floor((n + 2p - m) / s) + 1."""
    if s < 1:
        raise ValueError(f"stride s must be >= 1, got {s}")
    if n + 2 * p < m:
        raise ValueError(f"the kernel (m={m}) is longer than the padded input (n + 2p = {n + 2 * p})")
    return (n + 2 * p - m) // s + 1


def padding_for(mode: str, m: int) -> int:
    """Zero padding p of each side that gives `mode` at stride 1: full, same or valid."""
    if mode == "full":
        return m - 1
    if mode == "same":
        if m % 2 == 0:
            raise ValueError(f"'same' padding needs an odd kernel size, got m={m}")
        return (m - 1) // 2
    if mode == "valid":
        return 0
    raise ValueError(f"Unknown padding mode {mode!r}; use one of {', '.join(PADDING_MODES)}")


def conv1d(x, w, p: int = 0, s: int = 1) -> np.ndarray:
    """y[i] = sum_k x_padded[i*s + k] * w_flipped[k]: convolution of x with kernel w."""
    x_padded = np.pad(np.asarray(x, dtype=float), p)
    w_flipped = np.asarray(w, dtype=float)[::-1]
    m = len(w_flipped)
    return np.array(
        [np.sum(x_padded[i * s : i * s + m] * w_flipped) for i in range(output_size(len(x), m, p, s))]
    )


def conv2d(X, W, p: tuple[int, int] = (0, 0), s: tuple[int, int] = (1, 1)) -> np.ndarray:
    """2-D convolution of X with kernel W, zero padding p=(rows, cols) and stride s=(rows, cols)."""
    X_padded = np.pad(np.asarray(X, dtype=float), ((p[0], p[0]), (p[1], p[1])))
    W_flipped = np.asarray(W, dtype=float)[::-1, ::-1]
    m0, m1 = W_flipped.shape
    rows = output_size(len(X), m0, p[0], s[0])
    cols = output_size(len(X[0]), m1, p[1], s[1])
    Y = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            patch = X_padded[i * s[0] : i * s[0] + m0, j * s[1] : j * s[1] + m1]
            Y[i, j] = np.sum(patch * W_flipped)
    return Y


def _pool2d(X, reduce, pool_size: int, stride: int | None) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    stride = stride or pool_size
    rows = output_size(X.shape[0], pool_size, 0, stride)
    cols = output_size(X.shape[1], pool_size, 0, stride)
    return np.array(
        [
            [reduce(X[i * stride : i * stride + pool_size, j * stride : j * stride + pool_size]) for j in range(cols)]
            for i in range(rows)
        ]
    )


def max_pool2d(X, pool_size: int = 2, stride: int | None = None) -> np.ndarray:
    """Max pooling over pool_size x pool_size windows (stride defaults to the window: no overlap)."""
    return _pool2d(X, np.max, pool_size, stride)


def mean_pool2d(X, pool_size: int = 2, stride: int | None = None) -> np.ndarray:
    """Mean (average) pooling over pool_size x pool_size windows."""
    return _pool2d(X, np.mean, pool_size, stride)


def conv_params(kernel_size: tuple[int, int], in_channels: int, out_channels: int, bias: bool = True) -> int:
    """Weights of a conv layer: m1 * m2 * C_in * C_out (+ C_out biases), whatever the image size."""
    return kernel_size[0] * kernel_size[1] * in_channels * out_channels + (out_channels if bias else 0)


def dense_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Weights of a fully connected layer: n_in * n_out (+ n_out biases)."""
    return in_features * out_features + (out_features if bias else 0)
