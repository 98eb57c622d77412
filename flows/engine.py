"""How cnnflow's flows and tasks run: under Prefect's engine, or as plain Python in this process.

With a Prefect server to record them (PREFECT_API_URL, a profile, `cnnflow serve`, a test harness),
every flow and task run goes through Prefect and shows in its UI. A command with no server
configured would need a temporary one of its own: ~4 s before the first step on a 2-core machine,
and its records vanish when the command ends. So such a command runs `in_process()`: the same flow
functions, steps, retries and log lines, nothing sent to Prefect (MLflow records the run either way).

Flows and tasks are declared with `flow(...)` and `task(...)` below, which take Prefect's options and
make Prefect's objects (deployments and `serve` use them as usual); only calling them checks the mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from typing import Any

import prefect

_in_process = contextvars.ContextVar("cnnflow_in_process", default=False)
log = logging.getLogger("cnnflow")


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


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


def run_logger():
    """The log of the flow or task run going on: Prefect's run logger, or cnnflow's in process."""
    return log if _in_process.get() else prefect.get_run_logger()


class Task(prefect.Task):
    def __call__(self, *args, **kwargs):
        if not _in_process.get():
            return super().__call__(*args, **kwargs)
        return _with_retries(self, args, kwargs)

    def with_options(self, **options):
        changed = super().with_options(**options)  # Prefect's makes a plain Task: keep it ours
        changed.__class__ = type(self)
        return changed


class Flow(prefect.Flow):
    def with_options(self, **options):
        changed = super().with_options(**options)
        changed.__class__ = type(self)
        return changed

    def __call__(self, *args, **kwargs):
        if not _in_process.get():
            return super().__call__(*args, **kwargs)
        log.info(f"{self.name} flow runs in this process: no Prefect server is configured (set PREFECT_API_URL to "
                 f"record flow runs in one)")
        return self.fn(*args, **kwargs)


def task(**options) -> Any:
    return lambda fn: Task(fn=fn, **options)


def flow(**options) -> Any:
    return lambda fn: Flow(fn=fn, **options)


def _with_retries(step: Task, args: tuple, kwargs: dict):
    """The task's function, retried as its Prefect options say (count, delays, condition)."""
    from prefect.states import Failed

    retries = step.retries or 0
    delays = step.retry_delay_seconds or 0
    for attempt in range(retries + 1):
        try:
            return step.fn(*args, **kwargs)
        except Exception as error:
            condition = step.retry_condition_fn
            if attempt == retries or (condition and not condition(step, None, Failed(data=error))):
                raise
            delay = delays[min(attempt, len(delays) - 1)] if isinstance(delays, list) else delays
            log.warning(f"{step.name} failed ({type(error).__name__}: {error}); retry {attempt + 1} of {retries} "
                        f"in {delay:g} s")
            time.sleep(delay)
