"""Image transforms for one example inside the tf.data pipeline, registered as kind "augment".

A transform is registered as a factory: its config arguments go in, a function (image, seed) -> image
comes out. Random transforms use TF's stateless ops with the per-example `seed` (a [2] int tensor), so
the same run seed gives the same augmented images, in parallel `map` calls and across processes;
deterministic transforms ignore it. `compose` chains a configured list into one function.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import tensorflow as tf
from annotated_types import Interval

from cnnflow.components import registry
from cnnflow.components.argtypes import NonNegativeFloat, NonNegativeInt, PositiveInt
from cnnflow.components.registry import register

Transform = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@register("augment", "rescale")
def rescale(scale: float = 1 / 255) -> Transform:
    """Pixels to float32 times `scale`: uint8 (or resized 0..255 floats) to [0, 1] by default."""
    return lambda image, seed: tf.cast(image, tf.float32) * scale


@register("augment", "crop")
def crop(offset_height: NonNegativeInt, offset_width: NonNegativeInt, height: PositiveInt, width: PositiveInt) -> Transform:
    """The fixed box starting at (offset_height, offset_width)."""
    return lambda image, seed: tf.image.crop_to_bounding_box(image, offset_height, offset_width, height, width)


@register("augment", "random_crop")
def random_crop(height: PositiveInt, width: PositiveInt) -> Transform:
    """A height x width box at a random position."""

    def apply(image, seed):
        return tf.image.stateless_random_crop(image, size=(height, width, tf.shape(image)[-1]), seed=seed)

    return apply


@register("augment", "central_crop")
def central_crop(fraction: Annotated[float, Interval(gt=0, le=1)] = 0.7) -> Transform:
    """The central `fraction` of height and width."""
    return lambda image, seed: tf.image.central_crop(image, central_fraction=fraction)


@register("augment", "resize")
def resize(height: PositiveInt, width: PositiveInt) -> Transform:
    """Bilinear resize to height x width (float32 output, same value range)."""
    return lambda image, seed: tf.image.resize(image, (height, width))


@register("augment", "flip_left_right")
def flip_left_right() -> Transform:
    """Mirror left-right, always (the chapter's fixed flip for showing what a transform does)."""
    return lambda image, seed: tf.image.flip_left_right(image)


@register("augment", "random_flip")
def random_flip() -> Transform:
    """Mirror left-right with probability 1/2."""
    return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed=seed)


@register("augment", "contrast")
def contrast(factor: float = 2.0) -> Transform:
    """Scales each pixel's distance from the image mean by `factor`."""
    return lambda image, seed: tf.image.adjust_contrast(image, factor)


@register("augment", "random_contrast")
def random_contrast(lower: NonNegativeFloat = 0.8, upper: NonNegativeFloat = 1.2) -> Transform:
    """Contrast by a factor drawn between `lower` and `upper`, per image."""
    return lambda image, seed: tf.image.stateless_random_contrast(image, lower, upper, seed=seed)


@register("augment", "brightness")
def brightness(delta: float = 0.3) -> Transform:
    """Adds `delta` on the [0, 1] scale (uint8 images are converted and saturate)."""
    return lambda image, seed: tf.image.adjust_brightness(image, delta)


@register("augment", "random_brightness")
def random_brightness(max_delta: NonNegativeFloat = 0.1) -> Transform:
    """Adds a delta drawn from [-max_delta, max_delta] on the [0, 1] scale, per image."""
    return lambda image, seed: tf.image.stateless_random_brightness(image, max_delta, seed=seed)


def compose(specs: Sequence[Any]) -> Transform:
    """One function that applies the registered transforms named in `specs`, in order, each with its own seed."""
    transforms = [_graph_ready(spec, registry.build("augment", spec)) for spec in specs]

    def apply(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        seeds = tf.random.experimental.stateless_split(seed, num=max(len(transforms), 1))
        for index, transform in enumerate(transforms):
            image = transform(image, seeds[index])
        return image

    return apply


def _graph_ready(spec: Any, transform: Transform) -> Transform:
    """The transforms above are TensorFlow ops alone; a plugin's may use Python `if` or `for` on
    tensors, which AutoGraph rewrites into graph ops: those are converted here, since the pipeline's
    own functions are not (data/core.py, as_written)."""
    name = spec if isinstance(spec, str) else spec["name"]
    if registry.get("augment", name).__module__ == __name__:
        return transform
    return tf.autograph.to_graph(transform)
