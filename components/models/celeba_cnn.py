"""The chapter's CelebA face-attribute CNN."""

import keras
from keras import layers

from cnnflow.components.argtypes import DropoutRate, TwoClasses
from cnnflow.components.registry import register


@register("model", "celeba_cnn")
def celeba_cnn(input_shape=(64, 64, 3), num_classes: TwoClasses = 2, dropout_rate: DropoutRate = 0.5) -> keras.Model:
    """Four 3x3 conv blocks (32, 64, 128, 256 filters), global average pooling, one logit.

    A binary task needs one output unit; `num_classes` must be 2. 388,673 parameters for 64x64x3.
    """
    if num_classes != 2:
        raise ValueError(f"celeba_cnn predicts one binary attribute (2 classes), got num_classes={num_classes}")
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_1"),
            layers.MaxPooling2D(2, name="pool_1"),
            layers.Dropout(dropout_rate, name="dropout_1"),
            layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_2"),
            layers.MaxPooling2D(2, name="pool_2"),
            layers.Dropout(dropout_rate, name="dropout_2"),
            layers.Conv2D(128, 3, padding="same", activation="relu", name="conv_3"),
            layers.MaxPooling2D(2, name="pool_3"),
            layers.Conv2D(256, 3, padding="same", activation="relu", name="conv_4"),
            layers.GlobalAveragePooling2D(name="pool_4"),
            # a float32 logit (also under mixed precision): pair with binary_crossentropy(from_logits=True)
            layers.Dense(1, dtype="float32", name="fc_1"),
        ],
        name="celeba_cnn",
    )
