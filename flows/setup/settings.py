"""The settings' schema: every key of conf/ with its type and its valid range or choices.

`check(cfg)` runs once, in `compose_config`, before any server, run or folder exists. A bad value
ends in one line that names the key, the value and what is accepted (`SettingsError`, exit code 2).
Two layers:

- the fixed settings are pydantic models below (strict: `2.5` is no epoch count, `"yes"` no boolean);
- a component's own arguments (`model.*`, `optimizer.*`, `loss.*`, a transform's, a plot's, a
  callback's, a data source's `options`) are checked against the registered function's signature
  and type hints, so a plugin declares its ranges where it declares its arguments
  (`dropout_rate: Annotated[float, Interval(ge=0, lt=1)]`, see components/argtypes.py).
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval, MaxLen, MinLen
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cnnflow.components import registry
from cnnflow.components.errors import SettingsError

# --------------------------------------------------------------------------------- value types

Count = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
Name = Annotated[str, MinLen(1)]


def _split_string(value: str) -> str:
    from cnnflow.components.data.core import SPLIT_PATTERN

    if not SPLIT_PATTERN.match(value.replace(" ", "")):
        raise ValueError("should be a partition name with an optional slice, like train, test[:8000], "
                         "train[8000:] or train[:10%] (quote brackets: 'data.train_split=\"test[:8000]\"')")
    return value


def _cron(value: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=value)
    except ValueError:
        raise ValueError("should be a cron expression with five fields, like '0 3 * * 0' (Sundays 03:00)") from None
    return value


SplitString = Annotated[str, AfterValidator(_split_string)]
Size = Annotated[Count | Literal["full"] | None, Field(description="a count >= 1, full, or null (all)")]
Seed = Annotated[int, Interval(ge=0, le=2**32 - 1)]
TagValue = Annotated[str, MaxLen(8000)]  # MLflow keeps 8,000 characters of a tag's value and drops the rest unsaid


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Component(BaseModel):
    """`{name: <registered name>, <its arguments>...}`; the arguments are checked against the registry."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Name


# --------------------------------------------------------------------------------- the schema

class Transforms(Section):
    train: list[Component]
    eval: list[Component]


class Data(Section):
    source: Name
    name: Name
    path: str | None
    data_dir: str | None
    manual_dir: str | None
    options: dict[str, Any]
    train_split: SplitString
    valid_split: SplitString | None
    test_split: SplitString
    train_size: Size
    valid_size: Annotated[NonNegative | Literal["full"] | None,
                          Field(description="a count >= 0, full, or null (all)")]
    shuffle_buffer: NonNegative
    shuffle_each_epoch: NonNegative
    batch_size: Annotated[int, Interval(ge=1, le=65536)]
    cache: Literal["auto", "memory", "disk", "none"]
    cache_memory: Annotated[float, Interval(gt=0, le=1),
                            Field(description="a fraction of the available RAM, above 0 and at most 1, like 0.25")]
    cache_dir: Name | None
    cache_max_gb: Annotated[Annotated[float, Interval(gt=0)] | None,
                            Field(description="GiB above 0, like 20, or null for no cap")]
    transforms: Transforms


class Train(Section):
    epochs: Annotated[int, Interval(ge=1, le=100000)]
    metrics: list[Name]
    deterministic: bool
    max_loss_factor: Annotated[float, Interval(gt=1)] | None
    init_from: Annotated[Annotated[str, Field(pattern=r"^(runs|models):/.+")] | None,
                         Field(description="a logged model's URI, like runs:/<run id>/model or "
                                           "models:/<name>/<version>")]
    callbacks: dict[str, Component | None]
    checkpoint_every: Annotated[int, Interval(ge=1, le=100000)]
    checkpoint_slots: Annotated[int, Interval(ge=2, le=100)]
    checkpoint_minutes: Annotated[float, Interval(ge=0, le=10080),
                                  Field(description="minutes, 0 for epoch ends only, like 10")]
    keep_checkpoints: Annotated[int, Interval(ge=0, le=100)]
    lease_timeout: Annotated[float, Interval(ge=10, le=86400),
                             Field(description="seconds, at least 10, like 120")]
    outage_timeout: Annotated[float, Interval(ge=5, le=604800),
                              Field(description="seconds, at least 5, like 600")]
    test: bool


class Registry(Section):
    name: Name | None
    alias: Annotated[str, Field(pattern=r"^[A-Za-z_][\w-]*$", description="a name of letters, digits, _ and -")]
    metric: Name
    mode: Literal["max", "min"]


class Retrain(Section):
    schedule: Name | None
    cron: Annotated[str, AfterValidator(_cron)] | None
    sizes: Annotated[list[Count | Literal["full"]], MinLen(1),
                     Field(description="a list of counts >= 1 or full, like [16000, 32000, full]")]
    warm_start: bool


class Jobs(Section):
    crash_after: Annotated[float, Interval(ge=60, le=86400), Field(description="seconds, at least 60, like 300")]
    restarts: Annotated[int, Interval(ge=0, le=100)]


class Runtime(Section):
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    calibrate: bool
    jit_compile: bool
    intra_op_threads: NonNegative | None
    inter_op_threads: NonNegative | None
    onednn: bool
    strategy: Literal["default", "mirrored"]


class Search(Section):
    trials: Count | None
    epochs: Annotated[int, Interval(ge=1, le=10**7)] | None
    metric: Annotated[str, Field(pattern=r"^(val_\w+|loss|val_loss)$",
                                 description="a validation metric, like val_accuracy or val_loss (a search never "
                                             "looks at test figures)")]
    direction: Literal["max", "min"]
    sampler: Literal["tpe", "random"]
    startup_trials: NonNegative
    pruner: Literal["hyperband", "successive_halving", "median", "none"]
    seed: Seed
    name: Annotated[Annotated[str, Field(pattern=r"^[\w.-]+$")] | None,
                    Field(description="letters, digits, _, . and -")]
    storage: Name | None
    parallel: Count | None
    space: dict[str, str]
    plots: dict[str, Component | None]


class Settings(Section):
    experiment: Name
    overrides: list[str]
    seed: Seed
    output_dir: Name
    tracking_uri: Name | None
    mlflow_experiment: Name | None
    tags: dict[str, TagValue | int | float | bool]
    resume: bool
    registry: Registry
    retrain: Retrain
    jobs: Jobs
    runtime: Runtime
    data: Data
    model: Component
    loss: Component
    optimizer: Component
    train: Train
    plots: dict[str, Component | None]
    search: Search | None = None  # only `cnnflow search` composes it (search=NAME)


# Arguments the flow passes to a component itself; a config must not set them.
PROVIDED = {"dataset": ("name", "path", "data_dir", "manual_dir"),
            "model": ("input_shape", "num_classes", "steps_per_epoch"), "optimizer": ("total_steps",),
            "plot": ("results",), "search_plot": ("trials",)}


def components(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(dotted key of its arguments, kind, spec) of every component a config names, the data source too."""
    found = [("data.options", "dataset", {"name": cfg["data"]["source"], **(cfg["data"].get("options") or {})})]
    found += [(kind, kind, cfg[kind]) for kind in ("model", "loss", "optimizer")]
    found += [(f"train.callbacks.{label}", "callback", spec) for label, spec in cfg["train"]["callbacks"].items() if spec]
    for label, spec in cfg["plots"].items():
        if spec:
            found.append((f"plots.{label}", "plot", spec))
            columns = spec.get("columns")
            for column, transforms in (columns.items() if isinstance(columns, dict) else ()):
                found += [(f"plots.{label}.columns.{column}[{i}]", "augment", t) for i, t in enumerate(transforms)]
            if isinstance(spec.get("transforms"), list):
                found += [(f"plots.{label}.transforms[{i}]", "augment", t) for i, t in enumerate(spec["transforms"])]
    search_plots = (cfg.get("search") or {}).get("plots") or {}
    found += [(f"search.plots.{label}", "search_plot", spec) for label, spec in search_plots.items() if spec]
    for role in ("train", "eval"):
        found += [(f"data.transforms.{role}[{i}]", "augment", t) for i, t in enumerate(cfg["data"]["transforms"][role])]
    return found


# --------------------------------------------------------------------------------- checking

def check_schema(cfg: dict[str, Any]) -> None:
    """The fixed settings (no TensorFlow needed): raise SettingsError naming the first bad one."""
    try:
        Settings.model_validate(cfg)
    except ValidationError as error:
        raise SettingsError(_describe(error.errors()[0], cfg)) from None


def check_components(cfg: dict[str, Any]) -> None:
    """Every component's arguments (imports the registry's modules, and with them TensorFlow)."""
    for key, kind, spec in components(cfg):
        if isinstance(spec, dict):
            check_component(key, kind, spec)


def check_component(key: str, kind: str, spec: dict[str, Any]) -> None:
    """The spec's arguments against the registered function: known names, types and ranges, none
    missing. Arguments that only another component of the kind declares are left alone."""
    try:
        function = registry.get(kind, spec["name"])
    except registry.UnknownComponentError as error:
        raise SettingsError(f"{'data.source' if kind == 'dataset' else key + '.name'}={spec['name']!r}: {error}") from None
    provided = PROVIDED.get(kind, ())
    arguments = registry.arguments_for(kind, function, {name: value for name, value in spec.items() if name != "name"})
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [name for name in parameters if name not in provided
                and parameters[name].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    hints = typing.get_type_hints(function, include_extras=True)
    for name, value in arguments.items():
        if name in provided or (name not in parameters and not takes_any):
            raise SettingsError(unknown_key(f"{key}.{name}", known_arguments(key, kind), what=f"{spec['name']} takes: "
                                            f"{', '.join(accepted) or 'no arguments'}"))
        if name in hints:
            _check_value(f"{key}.{name}", hints[name], value)
    missing = [name for name in accepted if parameters[name].default is inspect.Parameter.empty and name not in arguments]
    if missing:
        raise SettingsError(f"{key} needs {', '.join(f'{key}.{m}' for m in missing)}")


def known_arguments(key: str, kind: str) -> list[str]:
    """`key.<argument>` for every argument any registered component of the kind takes."""
    return sorted(f"{key}.{name}" for name in registry.arguments_of_kind(kind) if name not in PROVIDED.get(kind, ()))


def unused_settings(cfg: dict[str, Any]) -> list[str]:
    """Arguments in the config that the chosen components do not read (another of their kind does)."""
    unused = []
    for key, kind, spec in components(cfg):
        if isinstance(spec, dict):
            arguments = {name: value for name, value in spec.items() if name != "name"}
            used = registry.arguments_for(kind, registry.get(kind, spec["name"]), arguments)
            unused += [f"{key}.{name}" for name in arguments if name not in used]
    return unused


def _check_value(key: str, annotation: Any, value: Any) -> None:
    adapter = TypeAdapter(annotation)
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as error:
        if isinstance(value, list):  # YAML has no tuples: a list stands for one
            try:
                adapter.validate_python(tuple(value), strict=True)
                return
            except ValidationError:
                pass
        raise SettingsError(f"{key}={value!r}: {_accepted(error.errors()[0])}") from None


def check_model_fits(cfg: dict[str, Any], num_classes: int) -> None:
    """The model takes as many classes as the data has (a one-logit model takes two): checked before
    any run is made, in one line naming both."""
    name = cfg["model"]["name"]
    annotation = typing.get_type_hints(registry.get("model", name), include_extras=True).get("num_classes")
    if annotation is None:
        return
    try:
        _check_value("num_classes", annotation, num_classes)
    except SettingsError as error:
        takes = str(error).partition(": ")[2]
        raise SettingsError(f"model={name} cannot learn data.source={cfg['data']['source']} {cfg['data']['name']!r}: the "
                            f"data has {num_classes} classes, and the model's number of classes {takes}; choose a model "
                            f"for {num_classes} classes (cnnflow components lists them) or other data") from None


# --------------------------------------------------------------------------------- messages

def unknown_key(key: str, known: list[str], what: str = "") -> str:
    """`unknown setting train.epochz; did you mean train.epochs?` (or the list of what is accepted)."""
    known = [k for k in known if k != key and not key.startswith(f"{k}.")]  # nor the key's own sections
    parent = key.rpartition(".")[0]
    same_section = [k for k in known if k.rpartition(".")[0] == parent]
    nearest = difflib.get_close_matches(key, same_section, n=1, cutoff=0.6) or \
        difflib.get_close_matches(key, known, n=1, cutoff=0.85)  # a key put in the wrong section
    siblings = sorted({k[len(parent) + 1:].split(".")[0].split("[")[0] for k in known
                       if k.startswith(f"{parent}.")} if parent else {k.split(".")[0] for k in known})
    if not nearest and not what and not siblings:  # a section that does not exist
        top = sorted({k.split(".")[0] for k in known})
        what = (f"the settings have no section {parent} (the top level takes: {', '.join(top)}); +{key}=VALUE adds a "
                f"key of your own where a section takes them, as in +tags.owner=me")
    hint = f"did you mean {nearest[0]}?" if nearest else what or f"{parent or 'the top level'} takes: {', '.join(siblings)}"
    return f"unknown setting {key}; {hint}"


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'batch_size': 64}} -> {'data.batch_size': 64}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def known_keys(cfg: dict[str, Any]) -> list[str]:
    """Every dotted key a config accepts: the schema's, plus each component's arguments."""
    keys = set(flatten({k: v for k, v in cfg.items() if k not in ("overrides",)}))
    keys |= _schema_keys(Settings)
    for key, kind, spec in components(cfg):
        keys |= set(known_arguments(key, kind))
    return sorted(keys)


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(f"{prefix}{name}")
        section = _section(field.annotation)
        if section:
            keys |= _schema_keys(section, f"{prefix}{name}.")
    return keys


def _section(annotation: Any) -> type[Section] | None:
    """The section a field holds, also where it may be None (`search: Search | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _dotted(location: tuple) -> tuple[str, list]:
    """('data', 'transforms', 'train', 0, 'name') -> 'data.transforms.train[0].name'; the path without
    pydantic's union-member labels ('int', "literal['full']", 'function-after[...]')."""
    parts: list = []
    for part in location:
        if isinstance(part, int):
            parts.append(part)
        elif "[" in part or "-" in part or part in ("int", "str", "float", "bool", "none", "list", "dict"):
            continue  # a union member's label (no setting's name has brackets or dashes)
        else:
            parts.append(part)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text, parts


def value_at(cfg: dict[str, Any], parts: list) -> Any:
    """The value at a path of keys and list positions, or None."""
    value: Any = cfg
    for part in parts:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _field_description(parts: list) -> str | None:
    model: Any = Settings
    field = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _section(field.annotation) or field.annotation
    return field.description if field else None


def _accepted(error: dict[str, Any]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    return re.sub(r"^(Input|String|List|Dictionary|Value) should", "should", message)


def _describe(error: dict[str, Any], cfg: dict[str, Any]) -> str:
    key, parts = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        return unknown_key(key, known_keys(cfg))
    if error["type"] == "missing":
        return f"missing setting {key}"
    value = value_at(cfg, parts)
    description = _field_description(parts)
    return f"{key}={_quoted(value)}: {'should be ' + description if description else _accepted(error)}"


def _quoted(value: Any, at_most: int = 60) -> str:
    """A value as a message quotes it: a long one cut, with its length said."""
    text = repr(value)
    return text if len(text) <= at_most else f"{text[:at_most]}... ({len(str(value)):,} characters)"
