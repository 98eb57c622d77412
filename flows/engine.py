"""How cnnflow's flows and tasks run: under Prefect's engine, or as plain Python in this process.

With a Prefect server to record them (PREFECT_API_URL, a profile, `cnnflow serve`, a test harness),
every flow and task run goes through Prefect and shows in its UI. A command with no server
configured would need a temporary one of its own: ~4 s before the first step on a 2-core machine,
and its records vanish when the command ends. So such a command runs `in_process()`: the same flow
functions, steps, retries and log lines, nothing sent to Prefect (MLflow records the run either way),
and Prefect itself (~1 s to import) is not even imported.

Flows and tasks are declared with `flow(...)` and `task(...)` below, which take Prefect's options
(`cache_policy="none"` for Prefect's NONE); Prefect's objects are made when first needed (a run
under Prefect, a deployment) and used as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

_in_process = contextvars.ContextVar("cnnflow_in_process", default=False)
log = logging.getLogger("cnnflow")


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or Prefect's settings (the active profile, a prefect.toml
    or .env here, a test harness), if any. Prefect is asked only when something could have set it."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" not in sys.modules and not _prefect_settings_files():
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _prefect_settings_files() -> list[Path]:
    """The files Prefect reads settings from that exist here (Prefect 3: profiles, prefect.toml, .env,
    pyproject.toml's [tool.prefect])."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    found = [path for path in (Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser(),
                               Path("prefect.toml"), Path(".env")) if path.is_file()]
    pyproject = Path("pyproject.toml")
    if pyproject.is_file() and "[tool.prefect" in pyproject.read_text(errors="replace"):
        found.append(pyproject)
    return found


@contextlib.contextmanager
def under_configured_server_or_in_process():
    """Flows and tasks in the block go to the configured Prefect server, or run in process without one."""
    with contextlib.nullcontext() if configured_api_url() else in_process():
        yield


@contextlib.contextmanager
def in_process():
    """Within the block, flows and tasks run as plain function calls; their logs go to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Prefect's logging set-up gives the root logger a console handler too
    token = _in_process.set(True)
    try:
        yield
    finally:
        _in_process.reset(token)
        log.removeHandler(handler)
        log.propagate = True


def recording() -> bool:
    """Whether flows and tasks go to a Prefect server (its UI shows their runs and artifacts)."""
    return not _in_process.get()


def run_logger():
    """The log of the flow or task run going on: Prefect's run logger, or cnnflow's in process."""
    if _in_process.get():
        return log
    from prefect import get_run_logger

    return get_run_logger()


class Step:
    """One flow or task: its function and Prefect's options, and Prefect's object made from them
    when first needed. Calling it runs it as the mode says; other attributes are Prefect's."""

    def __init__(self, kind: str, fn, options: dict[str, Any]):
        functools.update_wrapper(self, fn)
        self.kind, self.fn, self.options = kind, fn, options
        self.name = options.get("name") or fn.__name__

    @functools.cached_property
    def prefect(self):
        import prefect

        options = dict(self.options)
        if options.get("cache_policy") == "none":
            from prefect.cache_policies import NONE

            options["cache_policy"] = NONE
        return getattr(prefect, self.kind)(**options)(self.fn)

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or attribute == "prefect":  # not there: no detour through Prefect
            raise AttributeError(attribute)
        return getattr(self.prefect, attribute)

    def with_options(self, **options) -> Step:
        return Step(self.kind, self.fn, {**self.options, **options})

    def __call__(self, *args, **kwargs):
        if not _in_process.get():
            return self.prefect(*args, **kwargs)
        if self.kind == "flow":
            log.info(f"{self.name} flow runs in this process: no Prefect server is configured (set PREFECT_API_URL "
                     f"to record flow runs in one)")
            return self.fn(*args, **kwargs)
        return _with_retries(self, args, kwargs)


def task(**options) -> Any:
    return lambda fn: Step("task", fn, options)


def flow(**options) -> Any:
    return lambda fn: Step("flow", fn, options)


def _with_retries(step: Step, args: tuple, kwargs: dict):
    """The task's function, retried as its Prefect options say (count, delays, condition)."""
    retries = step.options.get("retries") or 0
    delays = step.options.get("retry_delay_seconds") or 0
    condition = step.options.get("retry_condition_fn")
    for attempt in range(retries + 1):
        try:
            return step.fn(*args, **kwargs)
        except Exception as error:
            if attempt < retries and condition:
                from prefect.states import Failed  # what a retry condition reads; only on a failure

                retry = condition(step, None, Failed(data=error))
            else:
                retry = attempt < retries
            if not retry:
                raise
            delay = delays[min(attempt, len(delays) - 1)] if isinstance(delays, list) else delays
            log.warning(f"{step.name} failed ({type(error).__name__}: {error}); retry {attempt + 1} of {retries} "
                        f"in {delay:g} s")
            time.sleep(delay)
