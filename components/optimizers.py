"""Optimizers by name; their keyword arguments are Keras's, so defaults match the chapter's."""

import keras

from cnnflow.components.argtypes import Fraction, OpenFraction, PositiveFloat, PositiveInt
from cnnflow.components.registry import register


@register("optimizer", "adam")
def adam(learning_rate: PositiveFloat = 1e-3, beta_1: OpenFraction = 0.9, beta_2: OpenFraction = 0.999,
         epsilon: PositiveFloat = 1e-7):
    return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)


@register("optimizer", "sgd")
def sgd(learning_rate: PositiveFloat = 1e-2, momentum: Fraction = 0.0, nesterov: bool = False):
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)


@register("optimizer", "rmsprop")
def rmsprop(learning_rate: PositiveFloat = 1e-3, rho: OpenFraction = 0.9, momentum: Fraction = 0.0):
    return keras.optimizers.RMSprop(learning_rate=learning_rate, rho=rho, momentum=momentum)


@register("optimizer", "adam_cosine")
def adam_cosine(learning_rate: PositiveFloat = 4e-3, total_steps: PositiveInt = 1000, final_fraction: Fraction = 0.0):
    """Adam whose learning rate follows a cosine from `learning_rate` to `final_fraction` of it over
    the training's `total_steps` (the flow fills them in: epochs x batches per epoch)."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps, alpha=final_fraction)
    return keras.optimizers.Adam(learning_rate=schedule)
