"""Image transforms applied to one example (an image tensor) inside the tf.data pipeline.

A transform is registered as a factory: its config arguments go in, a function image -> image
comes out. `compose` chains the configured list into one function for `Dataset.map`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from cnnflow.components import registry
from cnnflow.components.registry import register

Transform = Callable[[tf.Tensor], tf.Tensor]


@register("augment", "rescale")
def rescale(scale: float = 1 / 255) -> Transform:
    """uint8 pixels to float32 in [0, 1] (with the default scale)."""

    def apply(image: tf.Tensor) -> tf.Tensor:
        return tf.cast(image, tf.float32) * scale

    return apply


def compose(specs: Sequence[Any]) -> Transform:
    """One function that applies the registered transforms named in `specs`, in order."""
    transforms = [registry.build("augment", spec) for spec in specs]

    def apply(image: tf.Tensor) -> tf.Tensor:
        for transform in transforms:
            image = transform(image)
        return image

    return apply
