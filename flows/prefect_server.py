"""The Prefect API a cnnflow command talks to: the configured server, else a temporary one of its own.

Prefect would start a temporary server by itself, as a child in the same process group. A Ctrl-C in
the terminal then reaches that server too, it dies first, and the flow's last API calls (marking the
run crashed) retry for minutes with tracebacks; and a `kill -9` of cnnflow leaves it running and
listening. The server started here runs in a session of its own, so terminal signals reach only
cnnflow, which stops it on the way out; and it stops itself within a second once the process that
started it is gone, however that process ended.

    python -m cnnflow.flows.prefect_server PARENT_PID PORT     (what `temporary_server` runs)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from cnnflow.components.errors import InfrastructureError

_STARTUP_SECONDS = 60


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def temporary_server():
    """A Prefect server for the duration of the block, used by every flow run inside it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    process, url = _start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _send_pending_logs_and_events()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _send_pending_logs_and_events() -> None:
    """Prefect sends flow logs and events in the background and flushes them when Python exits; with
    the server gone by then, the flush would wait on it forever. Flush them while it still runs."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)


def _start() -> tuple[subprocess.Popen, str]:
    import httpx

    for _ in range(3):  # a port taken between choosing and binding: try another
        port = _free_port()
        environment = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        process = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.prefect_server", str(os.getpid()), str(port)],
                                   env=environment, start_new_session=True, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        process.kill()
    raise InfrastructureError(f"the temporary Prefect server did not start within {_STARTUP_SECONDS} s; start one "
                              f"(prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api")


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main(parent: int, port: int) -> None:
    import uvicorn

    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
