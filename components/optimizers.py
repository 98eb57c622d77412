"""Optimizers by name; their keyword arguments are Keras's, so defaults match the chapter's."""

import keras

from cnnflow.components.registry import register


@register("optimizer", "adam")
def adam(learning_rate: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7):
    return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)


@register("optimizer", "sgd")
def sgd(learning_rate: float = 1e-2, momentum: float = 0.0, nesterov: bool = False):
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)


@register("optimizer", "rmsprop")
def rmsprop(learning_rate: float = 1e-3, rho: float = 0.9, momentum: float = 0.0):
    return keras.optimizers.RMSprop(learning_rate=learning_rate, rho=rho, momentum=momentum)


@register("optimizer", "adam_cosine")
def adam_cosine(learning_rate: float = 4e-3, total_steps: int = 1000, final_fraction: float = 0.0):
    """Adam whose learning rate follows a cosine from `learning_rate` to `final_fraction` of it over
    the training's `total_steps` (the flow fills them in: epochs x batches per epoch)."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps, alpha=final_fraction)
    return keras.optimizers.Adam(learning_rate=schedule)
