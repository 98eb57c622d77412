"""A small, fast CNN: 3x3 conv + batch-norm blocks with 2x2 max-pooling between them.

For 28x28 images (the default: three blocks, a flatten head, about 100k parameters) it reaches the
chapter MNIST CNN's Fashion-MNIST accuracy in a quarter of its epochs, each about half as long (see
conf/experiment/fashion_mnist_fast.yaml). `blocks=None` and `head="global_average"` size it to any
image (conf/experiment/folder.yaml): blocks are added until the feature maps are about 7 pixels.
"""

import math
from typing import Literal

import keras
from keras import layers

from cnnflow.components.argtypes import DropoutRate, PositiveInt
from cnnflow.components.registry import register

KERAS_MOMENTUM = 0.99  # BatchNormalization's default: its moving statistics average ~100 steps
SMALLEST_MAP = 7  # pixels a side that the last block's feature maps keep, as 28x28 images give


def batch_norm_momentum(steps_per_epoch: int) -> float:
    """Keras' momentum, or less when an epoch is short: the moving statistics that evaluation uses
    then weigh the first half of an epoch at most 1%. A first epoch changes the weights, and so the
    statistics, the most: with 0.99 and 19 steps an epoch (2,400 images, batch 128) validation
    accuracy fell to chance while training accuracy rose (0.557 -> 0.106 over five epochs), and
    with 1 - 3/steps (0.81 for 16 steps) the first epoch of 1,000 images still evaluated at chance
    (0.11 against 0.48 with this rule's 0.56)."""
    if steps_per_epoch <= 0:  # not known: built outside a training
        return KERAS_MOMENTUM
    return min(KERAS_MOMENTUM, 0.01 ** (2 / steps_per_epoch))


def blocks_for(input_shape) -> int:
    """Conv blocks for images of this size: one more for every halving down to about 7 pixels."""
    return 1 + max(0, math.floor(math.log2(min(input_shape[:2]) / SMALLEST_MAP)))


def _conv_block(x, filters: int, momentum: float):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)  # batch norm supplies the bias
    x = layers.BatchNormalization(momentum=momentum)(x)
    return layers.ReLU()(x)


@register("model", "fast_cnn")
def fast_cnn(input_shape=(28, 28, 1), num_classes: PositiveInt = 10, width: PositiveInt = 24,
             dropout_rate: DropoutRate = 0.3, blocks: PositiveInt | None = 3,
             head: Literal["flatten", "global_average"] = "flatten", steps_per_epoch: int = 0) -> keras.Model:
    """`blocks` conv blocks (None: as the image size takes) of width, 2*width, 4*width, 8*width ...
    filters (at most 8*width) with 2x2 max-pooling between them; the head flattens or averages the
    last feature maps, then dropout and softmax. `steps_per_epoch` (the flow supplies it) paces
    batch norm's moving statistics."""
    momentum = batch_norm_momentum(steps_per_epoch)
    count = blocks or blocks_for(input_shape)
    inputs = x = keras.Input(shape=tuple(input_shape))
    for block in range(count):
        if block:
            x = layers.MaxPooling2D()(x)
        x = _conv_block(x, width * 2 ** min(block, 3), momentum)
    x = layers.Flatten()(x) if head == "flatten" else layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Dense(num_classes)(x)
    outputs = layers.Activation("softmax", dtype="float32")(x)  # float32 even under mixed precision
    return keras.Model(inputs, outputs, name="fast_cnn")
