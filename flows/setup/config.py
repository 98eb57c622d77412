"""The one place settings are parsed: an experiment name plus `key=value` overrides, composed by Hydra
and checked against the schema (flows/setup/settings.py).

The CLI, Prefect deployments, sweeps and tests all call `compose_config(experiment, overrides)`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from cnnflow.components import compat
from cnnflow.components.errors import SettingsError


def _conf_dir() -> Path:
    import cnnflow.conf

    return Path(cnnflow.conf.__file__).resolve().parent


# The config groups: every folder of conf/ (a group added there is a group here, help text included).
GROUPS = tuple(sorted((path.name for path in _conf_dir().iterdir() if path.is_dir() and any(path.glob("*.yaml"))),
                     key=lambda group: (group != "experiment", group)))  # the recipes first


def choices(group: str) -> list[str]:
    """The config files a group offers (`data` -> digits, fashion_mnist, mnist)."""
    return sorted(path.stem for path in (_conf_dir() / group).glob("*.yaml"))


# The recipes, as a type: a flow parameter of this type is a list to choose from in the Prefect UI.
Experiment = Literal[tuple(choices("experiment"))]

# The settings people change most, as typed fields of the train and retrain flows (the Prefect run
# form): each filled field becomes the override on the right, placed before the `overrides` list.
FORM_FIELDS = {"epochs": "train.epochs", "batch_size": "data.batch_size", "data_source": "data.source",
               "data_path": "data.path", "train_size": "data.train_size", "seed": "seed"}


def with_fields(overrides: list[str] | None, **fields: Any) -> list[str]:
    """The filled fields as overrides, then `overrides`; an empty field keeps the recipe's value. The
    schema checks both alike when they are composed."""
    filled = [f"{FORM_FIELDS[name]}={_literal(value)}" for name, value in fields.items() if value not in (None, "")]
    return filled + list(overrides or [])


def fields_of(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The overrides that a field of the run form says (`data.path=/data` -> data_path), as field
    values, and the rest: so a served form shows them in their fields, and `with_fields` gives back
    the same settings."""
    field_of = {key: name for name, key in FORM_FIELDS.items()}
    fields, rest = {}, []
    for override in overrides:
        key, _, value = override.partition("=")
        value = value.strip("'\"") if value[:1] in "'\"" else value
        name = field_of.get(key)
        if value and (name in ("data_source", "data_path") or (name and (value.isdigit() or value == "full"))):
            fields[name] = int(value) if value.isdigit() and name not in ("data_source", "data_path") else value
        else:
            rest.append(override)
    return fields, rest


def _literal(value: Any) -> str:
    """A field's value as Hydra reads it literally: a string quoted (a path with spaces, commas or
    brackets stays one value), anything else as written."""
    if isinstance(value, str) and value != "full":
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def compose_config(experiment: str = "quickstart", overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved settings of one run, as a plain dict (JSON-able, loggable, picklable)."""
    if experiment not in choices("experiment"):
        raise SettingsError(f"Unknown experiment {experiment!r}; the experiments are: {', '.join(choices('experiment'))}")
    overrides = list(overrides or [])
    refuse_interpolations(overrides)
    resolved = copy.deepcopy(_composed(experiment, tuple(overrides)))
    overrides = _located(resolved["data"], overrides)
    resolved["experiment"] = experiment
    resolved["overrides"] = overrides
    from cnnflow.flows.setup import runtime, settings

    settings.check_schema(resolved)
    runtime.use_environment(resolved["runtime"])  # threads, oneDNN: read once, when TensorFlow starts ...
    runtime.import_tensorflow_quietly()
    settings.check_components(resolved)  # ... and the components import it
    return resolved  # runtime.precision=auto is settled when a training starts: flows/setup/precision.py


# Where data is: stored resolved, so a run continued, resumed or evaluated from another folder finds it.
DATA_LOCATIONS = ("path", "data_dir", "manual_dir", "cache_dir")


def _located(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Relative `data` folders made absolute (~ expanded) in `data` and in the overrides that set them."""
    for key in DATA_LOCATIONS:
        value = data.get(key)
        if isinstance(value, str) and value and "://" not in value:  # gs://... stays as it is
            data[key] = str(Path(value).expanduser().resolve())
    located = []
    for override in overrides:
        key, _, value = override.partition("=")
        name = key.lstrip("+~")
        if name.startswith("data.") and name[5:] in DATA_LOCATIONS and value and data.get(name[5:]) is not None:
            override = f"{key}={_literal(data[name[5:]])}"
        located.append(override)
    return located


@functools.lru_cache(maxsize=16)
def _composed(experiment: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """Hydra's composition, once per process for the same arguments (the CLI checks a run's
    settings before its flow starts, and the flow composes them again from its parameters), and
    kept on disk for the next command: importing Hydra and composing took 0.35 s of every
    command's start (benchmarks/LOG.md, "Start-up"). The kept one is named by everything the
    composition reads: conf/'s files, Hydra's and OmegaConf's versions, the experiment and overrides."""
    path = _compositions() / f"{_composition_key(experiment, overrides)}.json"
    with contextlib.suppress(OSError, ValueError):
        composed = json.loads(path.read_text())
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept by _prune
        return composed
    composed = _hydra_composed(experiment, overrides)
    if json.loads(json.dumps(composed)) == composed:  # what JSON would change (an int key) is not kept
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            # not durable.write_durably: a lost file is composed again, so no fsync
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_text(json.dumps(composed))
            os.replace(partial, path)  # whole or not at all, for a command reading it meanwhile
            _prune(path.parent)
    return composed


KEPT_COMPOSITIONS = 200  # the newest; each is a few kB, and a new data path or seed makes a new one


def _prune(folder: Path) -> None:
    kept = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime, reverse=True)
    for path in kept[KEPT_COMPOSITIONS:]:
        path.unlink(missing_ok=True)


def _compositions() -> Path:
    from cnnflow.components.data.caching import user_cache

    return user_cache() / "settings"


def _composition_key(experiment: str, overrides: tuple[str, ...]) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps([experiment, overrides, version("hydra-core"), version("omegaconf")]).encode())
    for path in sorted(_conf_dir().rglob("*.yaml")):
        digest.update(str(path.relative_to(_conf_dir())).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _hydra_composed(experiment: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    refuse_group_values(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise _settings_error(error, experiment, list(overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def refuse_group_values(overrides: list[str]) -> None:
    """A config group takes a name or a list of names. Hydra fails on anything else with a traceback
    (`plots=0`, `plots=[1,2]`), or merges it away unseen (`plots={}` leaves every figure on)."""
    for parsed in parsed_overrides(overrides):
        group, value = parsed.key_or_group, parsed.value()
        names = value if isinstance(value, list) and value else [value]
        if group in GROUPS and not parsed.is_delete() and not all(isinstance(name, str) for name in names):
            raise SettingsError(f"{parsed.input_line}: {group} is a config group; choose one of "
                                f"{', '.join(choices(group))}")


def refuse_interpolations(overrides: list[str]) -> None:
    """Values from the command line or a deployment are literal: `${oc.env:SECRET}` would let whoever
    can start a served flow read the server's environment into MLflow."""
    for override in overrides:
        key, _, value = override.partition("=")
        if "${" in value:
            raise SettingsError(f"{key}={value}: interpolations (${{...}}) are not allowed in overrides; give the "
                                f"value itself")


def unreadable(override: str, error: Exception) -> SettingsError:
    """An override Hydra's grammar cannot read, as one line that says how to quote it."""
    key, _, value = override.partition("=")
    if re.match(r"\s*(choice|range|interval|tag|int|float|str|bool|glob|shuffle|sort)\(", value):
        reason = " ".join(str(error).split())[:200]
        return SettingsError(f"{override}: not a sweep expression Hydra can read ({reason})")
    return SettingsError(f"{override}: Hydra's override grammar cannot read this value (spaces, brackets, "
                         f"non-ASCII letters and some other characters need quotes); quote it: \"{key}='{value}'\"")


def parsed_overrides(overrides: list[str]) -> list:
    """Hydra's parse of each override, or the one line saying which cannot be read and how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed.append(parser.parse_override(override))
        except HydraException as error:
            raise unreadable(override, error) from None
    return parsed


def _settings_error(error: Exception, experiment: str, overrides: list[str]) -> SettingsError:
    """Hydra's refusal as one line: a typo gets the nearest valid key, a value of the wrong shape
    (a list for a mapping, ...) what it should be, a value Hydra cannot read how to quote it."""
    from hydra.errors import OverrideParseException

    from cnnflow.flows.setup import settings

    if isinstance(error, OverrideParseException):
        parsed_overrides(overrides)  # raises the line naming the override

    groups = [o for o in overrides if o.partition("=")[0] in GROUPS]  # search=..., plots=...
    unknown = compat.unknown_override_key(error)
    if unknown:
        return SettingsError(settings.unknown_key(unknown, settings.known_keys(compose_config(experiment, groups))))
    merge = compat.merge_failure(error)
    if merge:
        current = settings.value_at(compose_config(experiment, groups), merge[0].lstrip("+").split("."))
        shape = "a mapping, like {key: value}" if isinstance(current, dict) else \
            "a list, like [a, b]" if isinstance(current, list) else "a single value"
        return SettingsError(f"{merge[0]}={merge[1]}: should be {shape}")
    return SettingsError(_short(error, overrides))


def _short(error: Exception, overrides: list[str]) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = " ".join(line for line in lines if not line.startswith(("full_key", "object_type", "Available options")))
    missing = compat.missing_group_option(message)
    if missing and missing[0] in GROUPS:
        group = missing[0]
        return f"Unknown {group} config {missing[1]!r}; choices for {group}: {', '.join(choices(group))}"
    if "'['" in message:
        message += ". Quote values with brackets, e.g. 'data.train_split=\"test[:8000]\"'"
    return f"{message} (overrides: {' '.join(overrides) or 'none'})"


def to_yaml(settings: dict[str, Any]) -> str:
    import yaml  # what OmegaConf.to_yaml writes for these plain settings, without importing OmegaConf (a test checks)

    return yaml.dump(settings, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     allow_unicode=True)
