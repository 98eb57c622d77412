"""Every figure of conf/plots/, drawn for digits-like and face-like test sets, and every figure of a
search (conf/search/default.yaml), drawn for a search with complete and pruned trials, says what it shows
and is readable: a title of several words, no text cut off at the figure's edge, no text running
into another text or into another picture."""

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text

from cnnflow.components import registry
from cnnflow.components.data.core import Partition
from cnnflow.components.plots import Results
from cnnflow.components.search_plots import Trial, Trials
from cnnflow.flows.setup.config import compose_config

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _results(classes: tuple[str, ...], shape: tuple[int, int, int], count: int = 40) -> Results:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = np.arange(count) % len(classes)
    if len(classes) == 2:
        probabilities = rng.uniform(size=count).astype(np.float32)  # one unit: P(class 1)
    else:
        probabilities = rng.dirichlet(np.ones(len(classes)), size=count).astype(np.float32)
    history = {name: list(rng.uniform(size=3)) for name in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return Results(history=history, test=Partition(images, labels), probabilities=probabilities, class_names=classes)


CASES = {"classification": ("quickstart", _results(FASHION, (28, 28, 1))),
         "binary": ("celeba", _results(("Female", "Male"), (218, 178, 3)))}


def _trials(settings: int) -> Trials:
    """Six trials of a search of one or two settings, the fourth and fifth pruned (the fifth before any report)."""
    rng = np.random.default_rng(0)
    ended = tuple(Trial(n, n not in (3, 4), None if n == 4 else float(rng.uniform(0.7, 0.95)), int(rng.integers(1, 9)),
                        {"optimizer.learning_rate": float(10 ** rng.uniform(-4, -2)), "model.width": int(rng.integers(16, 64))})
                  for n in range(6))
    best = max((t for t in ended if t.complete), key=lambda t: t.value)
    log_scale = dict(list({"optimizer.learning_rate": True, "model.width": False}.items())[:settings])
    return Trials("quickstart-0123abcd", "val_accuracy", True, log_scale, ended, best)


def _figures():
    for group, (experiment, _) in CASES.items():
        for label, spec in compose_config(experiment, [f"plots={group}"])["plots"].items():
            yield pytest.param("plot", spec, CASES[group][1], id=f"{group}-{label}")
    for label, spec in compose_config("quickstart", ["search=default"])["search"]["plots"].items():
        for settings in (1, 2):
            yield pytest.param("search_plot", spec, _trials(settings), id=f"search-{label}-{settings} settings")


def test_every_registered_plot_is_drawn_by_a_group_of_conf():
    drawn = {(kind, spec["name"]) for kind, spec, _ in (p.values for p in _figures())}
    assert drawn == {(kind, name) for kind in ("plot", "search_plot") for name in registry.names(kind)}


@pytest.mark.parametrize("kind, spec, results", list(_figures()))
def test_every_figure_says_what_it_shows_and_no_text_is_cut_or_overlaps(kind, spec, results):
    figure = registry.build(kind, spec, **{"plot": {"results": results}, "search_plot": {"trials": results}}[kind])
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        # a figure of several panels says it above them all; one panel may say it in its own title
        titles = [figure._suptitle] + ([figure.axes[0].title] if len(figure.axes) == 1 else [])
        assert any(t is not None and len(t.get_text().split()) >= 3 for t in titles), "no title says what is shown"

        page = figure.bbox.padded(1)
        parts = [(axis, axis.get_tightbbox(renderer)) for axis in figure.axes]  # ticks, labels and titles as drawn
        parts += [(figure._suptitle, figure._suptitle.get_window_extent(renderer))] if figure._suptitle else []
        for part, box in parts:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, \
                f"{_named(part)} is cut at the figure's edge"

        texts = [text for text in [figure._suptitle, *(a.title for a in figure.axes), *(t for a in figure.axes
                                                                                      for t in a.texts)]
                 if text is not None and text.get_text().strip()]
        boxes = [(text, text.get_window_extent(renderer).shrunk(0.97, 0.9)) for text in texts]
        for text, box in boxes:
            for axis in figure.axes:
                if axis is not text.axes and box.overlaps(axis.bbox):
                    raise AssertionError(f"{text.get_text()!r} runs into another picture")
        for (one, a), (other, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{one.get_text()!r} and {other.get_text()!r} overlap"
    finally:
        plt.close(figure)


def _named(part) -> str:
    return repr(part.get_text()) if isinstance(part, Text) else f"the panel titled {part.get_title()!r} (or its labels)"
