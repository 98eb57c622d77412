"""scikit-learn's bundled 8x8 handwritten digits (1,797 real scans), upscaled to MNIST's 28x28.

It ships inside a dependency, so the quickstart runs on real data without internet.
"""

from __future__ import annotations

import numpy as np

from cnnflow.components.data.core import CLASS_NAMES, DataError, DataInfo, Partition
from cnnflow.components.registry import register

TEST_FRACTION = 0.2  # the last 20% of the bundled order is the test partition


class DigitsSource:
    def __init__(self, image_size: int = 28):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self._images = _upscaled(bunch.images, image_size)
        self._labels = bunch.target.astype(np.int64)
        self._first_test = int(len(self._labels) * (1 - TEST_FRACTION))
        self.info = DataInfo((image_size, image_size, 1), 10, CLASS_NAMES["mnist"])

    def partition(self, name: str) -> Partition:
        if name == "train":
            chosen = slice(None, self._first_test)
        elif name == "test":
            chosen = slice(self._first_test, None)
        else:
            raise DataError(f"The digits source has partitions 'train' and 'test', not {name!r}")
        return Partition(self._images[chosen], self._labels[chosen])


def _upscaled(images: np.ndarray, size: int) -> np.ndarray:
    """0..16 gray levels on 8x8 to uint8 0..255 on size x size (bilinear), with a channel axis."""
    import tensorflow as tf

    scaled = tf.image.resize(images[..., np.newaxis] * (255.0 / 16.0), (size, size), method="bilinear")
    return np.clip(np.round(scaled.numpy()), 0, 255).astype(np.uint8)


@register("dataset", "digits")
def digits(name: str = "digits", path=None, data_dir=None, manual_dir=None) -> DigitsSource:
    """The offline quickstart data; `name` and the location settings do not apply."""
    return DigitsSource()
