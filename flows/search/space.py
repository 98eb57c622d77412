"""The search's plan: the space in Hydra's sweep grammar as Optuna distributions, the fixed settings,
the budget and the storage, every bound composed and checked before anything is made."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnflow.components.errors import SettingsError
from cnnflow.flows.setup.config import compose_config, parsed_overrides
from cnnflow.flows.tracking import store


@dataclass(frozen=True)
class Plan:
    """Everything a search needs, checked before anything is created."""

    experiment: str
    fixed: list[str]
    expressions: dict[str, str]  # key -> the sweep expression as written
    space: dict[str, Any]  # key -> Optuna distribution
    search: dict[str, Any]  # the search.* settings
    cfg: dict[str, Any]  # the recipe with the fixed overrides
    study_name: str
    storage: str

    @property
    def max_epochs(self) -> int:
        return self.cfg["train"]["epochs"]


def planned(experiment: str, overrides: list[str]) -> Plan:
    """The search the command line asks for: `search=NAME` and `search.*` choose the search's own
    settings, overrides in sweep grammar make the space, the rest is fixed. Every bound of the space
    is composed and checked against the settings schema, so a range a setting does not take is
    refused here, in one line."""
    search_choice = [o for o in overrides if o.startswith("search=")][-1:] or ["search=default"]
    search_overrides = [o for o in overrides if o.startswith("search.")]
    rest = [o for o in overrides if not o.startswith(("search=", "search."))]
    expressions, fixed = _sweeps(rest)
    cfg = compose_config(experiment, [*fixed, *search_choice, *search_overrides])
    search = cfg.pop("search")
    expressions = {**search["space"], **expressions}
    if not expressions:
        raise SettingsError("search needs a space: overrides in Hydra's sweep grammar, e.g. "
                            "'model.width=int(interval(16,64))' 'data.batch_size=choice(64,128,256)', or search=NAME "
                            "for a file of conf/search/ with a space")
    if not search["trials"] and not search["epochs"]:
        raise SettingsError("search.trials=null and search.epochs=null: set a budget, e.g. search.trials=20 or "
                            "search.epochs=45")
    space = {key: distribution(key, expression) for key, expression in expressions.items()}
    for key, dist in space.items():
        for value in _extremes(dist):
            compose_config(experiment, [*fixed, as_override(key, value)])
    metric = search["metric"].removeprefix("val_")
    if metric != "loss" and metric not in cfg["train"]["metrics"]:
        raise SettingsError(f"search.metric={search['metric']!r}: the trials record val_loss and val_<m> for "
                            f"train.metrics={cfg['train']['metrics']}")
    identity = [experiment, sorted(fixed), sorted(expressions.items()),
                {k: search[k] for k in ("metric", "direction", "sampler", "startup_trials", "pruner", "seed")}]
    name = search["name"] or f"{experiment}-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:8]}"
    return Plan(experiment, fixed, expressions, space, search, cfg, name, _checked_storage(search["storage"], cfg))


def _checked_storage(url: str | None, cfg: dict[str, Any]) -> str:
    """The study's storage URL; a URL SQLAlchemy has no driver for is refused before anything is made."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if not url:
        return _default_storage(cfg)
    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise SettingsError(f"search.storage={url}: cannot open it as an Optuna storage ({str(error).splitlines()[0]}); "
                            f"give a database URL, like sqlite:///optuna.db or postgresql://USER:PASSWORD@HOST/DB") \
            from None
    return url


def _sweeps(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Overrides in sweep grammar (key -> expression) and the fixed ones."""
    expressions, fixed = {}, []
    for override, parsed in zip(overrides, parsed_overrides(overrides)):
        if parsed.is_sweep_override():
            expressions[parsed.get_key_element()] = override.partition("=")[2]
        else:
            fixed.append(override)
    return expressions, fixed


def distribution(key: str, expression: str):
    """Hydra's sweep expression as an Optuna distribution: `choice(a,b)` and `a,b` categorical,
    `range(lo,hi,step)` stepped, `interval(lo,hi)` continuous (`int(...)`: integers, `tag(log, ...)`:
    on a log scale)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    [parsed] = parsed_overrides([f"{key}={expression}"])
    value = parsed.value()
    log = "log" in getattr(value, "tags", ())
    try:
        if isinstance(value, ChoiceSweep):
            return CategoricalDistribution(list(parsed.sweep_iterator()))
        if isinstance(value, RangeSweep):
            if value.step <= 0 or value.start >= value.stop:  # Optuna would name a bound it made, not the user's
                raise ValueError("range(start,stop,step) counts up from start by a step above 0 and stops before "
                                 "stop, so it needs start < stop (e.g. range(16,64,16): 16, 32, 48); choice(...) takes "
                                 "values in any order")
            # the last value the range reaches, so the distribution's bounds are the range's own values
            last = value.start + value.step * math.ceil(round((value.stop - value.start) / value.step - 1, 9))
            if all(isinstance(n, int) for n in (value.start, value.stop, value.step)):
                return IntDistribution(value.start, int(last), log=log, step=value.step)
            return FloatDistribution(value.start, last, step=value.step)
        if isinstance(value, IntervalSweep):
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log)
            return FloatDistribution(value.start, value.end, log=log)
    except ValueError as error:  # Optuna's own refusal: low > high, log of 0, ...
        raise SettingsError(f"{key}={expression}: {error}") from None
    raise SettingsError(f"{key}={expression}: a search space is choice(...), range(...) or interval(...) (with "
                        f"int(...) and tag(log, ...)), or a,b,c")


def _extremes(dist) -> list:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def as_override(key: str, value: Any) -> str:
    """A sampled value as the override that sets it (a string quoted unless it is a plain word)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        value = "'" + value.replace("'", "\\'") + "'"
    elif isinstance(value, float):
        value = repr(value)
    return f"{key}={value}"


def _default_storage(cfg: dict[str, Any]) -> str:
    """Beside a SQLite MLflow store (optuna.db next to mlflow.db); else optuna.db in this folder."""
    uri = store.tracking_uri(cfg)
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def shown(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def rounded(value: Any) -> Any:
    """A sampled float to 4 significant digits, as lines and tables show it."""
    return float(f"{value:.4g}") if isinstance(value, float) else value
