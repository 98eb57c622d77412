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
import inspect
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cnnflow.components import compat

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
    """Whether flows and tasks go to a Prefect server (its UI shows their runs and artifacts): one is
    configured, and it answers now."""
    if _in_process.get():
        return False
    url = configured_api_url()
    return not url or _observe_prefect(url, _logger()) is None


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

        @functools.wraps(self.fn)
        def then_reported(*args, **kwargs):  # its end state goes to a server that answers
            from cnnflow.components.errors import ServerOutage, StoppedByOutage

            try:
                with _watching_prefect() if self.kind == "flow" else contextlib.nullcontext():
                    result = self.fn(*args, **kwargs)
            except ServerOutage as outage:
                if self.kind == "flow" and _resubmitted_after_crashes():
                    raise StoppedByOutage(str(outage)) from outage
                raise
            if self.kind == "flow" and (finished := _finished.get()) is not None:
                from prefect.runtime import flow_run

                finished.append((result, flow_run.name))
            return result

        # Prefect validates a flow's parameters against its signature, resolved in the wrapper's module:
        # resolved here in the function's own
        then_reported.__signature__ = inspect.signature(self.fn, eval_str=True)
        return getattr(prefect, self.kind)(**options)(then_reported)

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or attribute == "prefect":  # not there: no detour through Prefect
            raise AttributeError(attribute)
        return getattr(self.prefect, attribute)

    def _recorded(self, args: tuple, kwargs: dict):
        """The flow under Prefect, started by a command; when its work is done but the server is gone
        for its end state, the result stands and one warning says the record in Prefect is incomplete."""
        finished: list = []
        token = _finished.set(finished)
        try:
            return self.prefect(*args, **kwargs)
        except Exception:
            url = configured_api_url()
            if not finished or not (reason := prefect_fails(url)):
                raise
            result, name = finished[0]
            _logger().warning(f"the Prefect server {url} fails ({reason}): flow run {name}'s record there is incomplete "
                              f"(it may show Running); its work is done, and MLflow has all of it")
            return result
        finally:
            _finished.reset(token)

    def with_options(self, **options) -> Step:
        return Step(self.kind, self.fn, {**self.options, **options})

    def __call__(self, *args, **kwargs):
        if not _in_process.get():
            if self.kind == "flow":
                _one_line_per_prefect_outage()
            url = configured_api_url()
            if not _inside_a_run():  # a command starting: a server that does not answer is said at once
                if url and (reason := prefect_fails(url)):
                    from cnnflow.components.errors import ServerOutage

                    raise ServerOutage(f"cannot reach the Prefect server {url} ({reason}); start it (prefect server "
                                       f"start), or unset PREFECT_API_URL to run without one")
                return self._recorded(args, kwargs)
            if url and _observe_prefect(url, _logger()) is not None:  # Prefect is the orchestrator, not the record:
                _say_unrecorded(url)  # the work goes on without it
                return self.fn(*args, **kwargs) if self.kind == "flow" else _with_retries(self, args, kwargs)
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


# ------------------------------------------------------------------ the Prefect server's outages
# Prefect is the orchestrator, not the record (MLflow is). A command does not start without the
# server it is configured for (one line, at once); a flow going on when the server goes away does
# its remaining steps without it, says so once, and its result stands though Prefect missed its end.

_outage: dict[str, Any] = {"since": None}
_finished: contextvars.ContextVar[list | None] = contextvars.ContextVar("cnnflow_finished", default=None)


def _inside_a_run() -> bool:
    """Whether a flow or task run is going on in this context (a step of it, not a command starting)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _say_unrecorded(url: str) -> None:
    """Once per outage: the steps run while the server is down are not in Prefect's record."""
    if _outage.get("unrecorded") != _outage["since"]:
        _outage["unrecorded"] = _outage["since"]
        _logger().warning(f"the Prefect server {url} is down: the next steps run without it (Prefect will not show "
                          f"them); MLflow records them as usual")
WATCH_SECONDS = 5.0  # how often a running flow checks the Prefect server


def _resubmitted_after_crashes() -> bool:
    """Whether this flow run is a job its pool schedules again when it crashes (flows/orchestration/healing.py)."""
    from prefect.runtime import flow_run

    from cnnflow.flows.orchestration.healing import RESUMABLE_TAG

    return RESUMABLE_TAG in (flow_run.tags or [])


_watch_lock = threading.Lock()


def _observe_prefect(url: str, logger) -> str | None:
    """Whether the Prefect server fails now (what failed, or None); the first failure and the first
    answer after failures are said, once each, whichever thread sees them."""
    reason = prefect_fails(url)
    with _watch_lock:
        if reason is not None and _outage["since"] is None:
            _outage["since"] = time.monotonic()
            logger.warning(f"the Prefect server {url} fails: {reason}. Prefect loses the task states and logs sent "
                           f"while it is down; the work goes on without it (MLflow records it as usual)")
        elif reason is None and _outage["since"] is not None:
            logger.warning(f"the Prefect server {url} answers again after {time.monotonic() - _outage['since']:.0f} s")
            _outage["since"] = None
    return reason


@contextlib.contextmanager
def _watching_prefect(every: float = WATCH_SECONDS):
    """While a flow runs (a training step may take hours), the Prefect server's outages are said as
    they start and end, not only at the next step."""
    url = configured_api_url()
    if not url or _outage.get("watching"):
        yield
        return
    logger, stop = _logger(), threading.Event()

    def watch():
        while not stop.wait(every):
            _observe_prefect(url, logger)

    _outage["watching"] = True
    watcher = threading.Thread(target=watch, name="prefect outages", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=15)
        _outage["watching"] = False


def prefect_fails(url: str) -> str | None:
    """None when the server's health check answers; else what failed, as an operator reads it."""
    import httpx

    from cnnflow.components.compat import outage_reason

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=10, headers=_prefect_auth())
    except httpx.HTTPError as error:
        return outage_reason(error)
    return f"it answers HTTP {response.status_code}" if response.status_code >= 500 else None


def _prefect_auth() -> dict[str, str]:
    """The header Prefect's own client sends: its auth string (self-hosted) before an API key."""
    import base64

    auth, key = os.environ.get("PREFECT_API_AUTH_STRING"), os.environ.get("PREFECT_API_KEY")
    if "prefect" in sys.modules and not (auth or key):
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    if auth:
        return {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}
    return {"Authorization": f"Bearer {key}"} if key else {}


def _logger():
    from prefect.exceptions import MissingContextError

    try:
        return run_logger()
    except MissingContextError:  # not inside a flow or task run
        return log


def _one_line_per_prefect_outage() -> None:
    """Prefect says an outage every few seconds per event it drops (and prints each failed log
    upload); cnnflow says it once, in _observe_prefect. Idempotent."""
    if getattr(_one_line_per_prefect_outage, "done", False):
        return
    _one_line_per_prefect_outage.done = True
    logging.raiseExceptions = False  # what Prefect's log upload checks before printing its failures

    class PrefectOutageNoise(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if compat.is_prefect_outage_noise(text):
                return False
            # the engine failing to send a finished flow's end state: Step._recorded says it in one line
            return not (_outage["since"] is not None and record.name == "prefect.flow_runs"
                        and text.startswith(("Encountered exception during execution", "Finished in state Running")))

    for name in compat.PREFECT_OUTAGE_LOGGERS:
        logging.getLogger(name).addFilter(PrefectOutageNoise())
