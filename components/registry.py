"""One registry for every building block: datasets, augmentations, models, losses, optimizers,
callbacks, plots and search plots are registered by (kind, name) and built from a config that names them.

    @register("model", "mnist_cnn")
    def mnist_cnn(input_shape, num_classes, dropout_rate=0.5): ...

    build("model", {"name": "mnist_cnn", "dropout_rate": 0.3}, input_shape=(28, 28, 1), num_classes=10)

Packages outside this repository add components through the ``cnnflow.components`` entry-point
group: each entry point names a module (or any object) whose import registers its components.
Entry points are loaded the first time a name is missing, so a plugin costs nothing until used.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from cnnflow.components.errors import SettingsError

KINDS = ("dataset", "augment", "model", "loss", "optimizer", "callback", "plot", "search_plot")
ENTRY_POINT_GROUP = "cnnflow.components"

_registry: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_loaded_entry_points: set[str] = set()


class UnknownComponentError(SettingsError, KeyError):
    """A config named a component that nobody registered."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class ComponentArgumentError(SettingsError, TypeError):
    """A config gave a component an argument it does not take (or left out one it needs)."""


def _check_kind(kind: str) -> None:
    if kind not in _registry:
        raise ValueError(f"Unknown component kind {kind!r}; the kinds are: {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make `fn` buildable as `build(kind, name)`."""
    _check_kind(kind)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _registry[kind].get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ValueError(f"{kind} {name!r} is registered twice: {_qualname(existing)} and {_qualname(fn)}")
        _registry[kind][name] = fn
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def load_builtins() -> None:
    """Import every module of this package: a new component is one file with its decorator, and no
    list names it. Modules whose name starts with ``_`` are left out (``_serving_model.py`` is a
    script MLflow runs when it loads a model)."""
    for module in _builtin_modules():
        importlib.import_module(module)


@functools.cache
def _builtin_modules() -> tuple[str, ...]:
    package = importlib.import_module("cnnflow.components")
    return tuple(sorted(info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
                        if not info.name.rpartition(".")[2].startswith("_")))


def load_plugins() -> list[str]:
    """Import every not-yet-loaded entry point of the plugin group; returns their names."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"{entry_point.name}={entry_point.value}"
        if key in _loaded_entry_points:
            continue
        _loaded_entry_points.add(key)
        entry_point.load()
        loaded.append(entry_point.name)
    return loaded


def names(kind: str) -> list[str]:
    """The registered names of one kind, built-ins and installed plugins included."""
    _check_kind(kind)
    load_builtins()
    load_plugins()
    return sorted(_registry[kind])


def get(kind: str, name: str) -> Callable[..., Any]:
    _check_kind(kind)
    load_builtins()
    if name not in _registry[kind]:
        load_plugins()
    if name not in _registry[kind]:
        raise UnknownComponentError(
            f"Unknown {kind} {name!r}. Registered {kind}s: {', '.join(sorted(_registry[kind])) or '(none)'}. "
            f"Plugins add more through the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return _registry[kind][name]


def arguments_for(kind: str, fn: Callable[..., Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments `fn` is called with: all but those that only another registered component of
    its kind declares. A recipe may carry arguments for several (celeba_folder's `on_bad_image` in a
    CelebA recipe switched to data.source=tfds); an argument that no component declares stays, so
    it fails as the typo it is."""
    parameters = inspect.signature(fn).parameters
    if set(arguments) <= set(parameters) or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(arguments)  # the usual case: nothing to look up elsewhere
    elsewhere = arguments_of_kind(kind)
    return {name: value for name, value in arguments.items() if name in parameters or name not in elsewhere}


def declared(kind: str, name: str, **available: Any) -> dict[str, Any]:
    """Those of `available` (what a flow knows of the training: its length, its steps per epoch) that
    the component `name` takes: a component asks for them by naming them among its parameters."""
    parameters = inspect.signature(get(kind, name)).parameters
    return {key: value for key, value in available.items() if key in parameters}


def arguments_of_kind(kind: str) -> set[str]:
    """Every argument name that some registered component of `kind` takes."""
    return {name for other in names(kind) for name in inspect.signature(get(kind, other)).parameters}


def build(kind: str, spec: str | Mapping[str, Any], **extra: Any) -> Any:
    """Call the component that `spec` names with the spec's other keys (and `extra`) as arguments.

    `spec` is a name, or a mapping with a `name` key (a Hydra config node works as it is).
    """
    if isinstance(spec, str):
        name, params = spec, {}
    else:
        params = _plain(spec)
        if "name" not in params:
            raise ValueError(f"A {kind} config needs a 'name' key; got keys {sorted(params)}")
        name = params.pop("name")
    fn = get(kind, name)
    params = arguments_for(kind, fn, params)
    try:
        inspect.signature(fn).bind(**params, **extra)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(fn).parameters)
        raise ComponentArgumentError(f"{kind} {name!r}: {error}; it accepts: {accepted}") from None
    return fn(**params, **extra)


def _plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a mapping, resolving Hydra/OmegaConf nodes so components get plain values."""
    if type(spec).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(spec, resolve=True)
    return dict(spec)
