"""Ranges a component declares on its arguments, checked when a config is composed.

    @register("model", "my_cnn")
    def my_cnn(input_shape, num_classes: int, dropout_rate: DropoutRate = 0.5): ...

`dropout_rate=1.5` then stops with one line naming the key, before anything runs. Plain hints
(`int`, `bool`, `float`) are checked as types; these add the range. Plugins use them the same way.
"""

from typing import Annotated

from annotated_types import Ge, Gt, Interval

PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]  # a probability, a share
DropoutRate = Annotated[float, Interval(ge=0, lt=1)]  # 1 would drop everything
OpenFraction = Annotated[float, Interval(gt=0, lt=1)]  # Adam's betas, a decay factor
TwoClasses = Annotated[int, Interval(ge=2, le=2)]  # a model with one logit: a two-class task only
