"""The chapter's three classification losses, each usable on logits or on probabilities."""

import keras

from cnnflow.components.registry import register


@register("loss", "binary_crossentropy")
def binary_crossentropy(from_logits: bool = False) -> keras.losses.Loss:
    """Two classes, one output unit: a logit (from_logits=True) or a sigmoid probability."""
    return keras.losses.BinaryCrossentropy(from_logits=from_logits)


@register("loss", "categorical_crossentropy")
def categorical_crossentropy(from_logits: bool = False) -> keras.losses.Loss:
    """Many classes with one-hot labels."""
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits)


@register("loss", "sparse_categorical_crossentropy")
def sparse_categorical_crossentropy(from_logits: bool = False) -> keras.losses.Loss:
    """Many classes with integer labels: the same value as categorical, without one-hot encoding."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
