"""The chapter's MNIST CNN."""

import keras
from keras import layers

from cnnflow.components.argtypes import DropoutRate, PositiveInt
from cnnflow.components.registry import register


@register("model", "mnist_cnn")
def mnist_cnn(input_shape=(28, 28, 1), num_classes: PositiveInt = 10, dropout_rate: DropoutRate = 0.5) -> keras.Model:
    """Two 5x5 conv + 2x2 max-pool blocks (32, 64 filters), dense 1024, dropout, softmax.

    3,274,634 parameters for 28x28x1 inputs and 10 classes.
    """
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            layers.Conv2D(32, kernel_size=5, padding="same", activation="relu", name="conv_1"),
            layers.MaxPooling2D(pool_size=2, name="pool_1"),
            layers.Conv2D(64, kernel_size=5, padding="same", activation="relu", name="conv_2"),
            layers.MaxPooling2D(pool_size=2, name="pool_2"),
            layers.Flatten(),
            layers.Dense(1024, activation="relu", name="fc_1"),
            layers.Dropout(dropout_rate),
            # float32 probabilities and loss even under mixed precision: bfloat16 has 3 significant digits
            layers.Dense(num_classes, activation="softmax", dtype="float32", name="fc_2"),
        ],
        name="mnist_cnn",
    )
