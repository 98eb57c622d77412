"""Figures of a search. A search plot is registered as a function of `Trials` (and its config
arguments) that returns a matplotlib Figure; `cnnflow search` saves it and logs it to the search's
MLflow run. `Trials` is plain data, so a plot knows nothing of Optuna."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: flows run headless, in workers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from cnnflow.components.registry import register  # noqa: E402


@dataclass(frozen=True)
class Trial:
    number: int
    complete: bool  # False: pruned
    value: float | None  # the objective; a pruned trial's last reported value (None if it reported none)
    epochs: int  # epochs it trained
    params: dict[str, Any]


@dataclass(frozen=True)
class Trials:
    study: str
    metric: str
    maximize: bool
    log_scale: dict[str, bool]  # each searched setting -> drawn on a logarithmic axis
    ended: tuple[Trial, ...]  # complete and pruned trials, in the order they ended
    best: Trial | None  # the study's best trial; None until one completes


def _scatter(axis, points: list[tuple[float, float, bool]], complete: str, pruned: str) -> None:
    """Complete trials filled, pruned ones hollow."""
    for done in (True, False):
        chosen = [(x, y) for x, y, c in points if c == done and y is not None]
        if chosen:
            axis.scatter(*zip(*chosen), s=28, label=complete if done else pruned,
                         color="tab:blue" if done else "none", edgecolors="tab:blue" if done else "tab:grey")


@register("search_plot", "best_so_far")
def best_so_far(trials: Trials) -> plt.Figure:
    """The best value found so far against the epochs all trials have spent, each trial a point."""
    better = max if trials.maximize else min
    spent, best, steps, points = 0, None, [], []
    for trial in trials.ended:
        spent += trial.epochs
        if trial.complete:
            best = trial.value if best is None else better(best, trial.value)
        points.append((spent, trial.value, trial.complete))
        if best is not None:
            steps.append((spent, best))
    figure, axis = plt.subplots(figsize=(6.4, 4))
    if steps:
        axis.step(*zip(*steps), where="post", color="tab:blue", label=f"best {trials.metric} so far")
    _scatter(axis, points, "complete trial", "pruned trial (last value)")
    axis.set(xlabel="epochs spent (all trials)", ylabel=trials.metric,
             title=f"best {trials.metric} against epochs spent\nsearch {trials.study}")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)  # where it hides the fewest points
    figure.tight_layout()
    return figure


@register("search_plot", "parameters")
def parameters(trials: Trials) -> plt.Figure:
    """Each searched setting against the objective, one panel per setting, the best trial starred."""
    count = len(trials.log_scale)  # one setting still leaves room for the title
    figure, axes = plt.subplots(1, count, figsize=(max(6.4, 3.6 * count), 3.4 if count > 1 else 4), squeeze=False)
    for axis, (key, log) in zip(axes[0], trials.log_scale.items()):
        _scatter(axis, [(t.params[key], t.value, t.complete) for t in trials.ended], "complete", "pruned (last value)")
        if trials.best:
            axis.scatter([trials.best.params[key]], [trials.best.value], s=120, marker="*", color="tab:orange",
                         label=f"best (trial {trials.best.number})", zorder=3)
        if log:
            axis.set_xscale("log")
        axis.set(xlabel=key, ylabel=trials.metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"each setting against {trials.metric} (pruned trials: their last value)\nsearch {trials.study}")
    figure.tight_layout()
    return figure
