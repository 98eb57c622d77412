"""The worker of a cnnflow work pool: Prefect's process worker, except that SIGTERM hands its jobs back.

`cnnflow deploy --pool NAME` makes the pool with the type "cnnflow", and Prefect finds this class
through the `prefect.collections` entry point (pyproject.toml), so the usual `prefect worker start
--pool NAME` runs it. Prefect's own process worker, stopped with SIGTERM (Docker, Kubernetes and
systemd stop that way), ends at once and its flow-run processes die with it (SIGKILL): their jobs
are found only when Prefect misses their heartbeat, `jobs.crash_after` later. This one takes no new
run, sends each flow-run process SIGTERM and waits for them: a training stops after its batch with
its MLflow run KILLED and its lease released, Prefect marks the flow run Crashed, and the resubmit
automation (flows/orchestration/healing.py) schedules it again for any free worker, which resumes it. Then the
worker stops as Prefect's does. A second SIGTERM stops it at once.

Every CHECK_SECONDS it also does what the two automations miss around a restart of the Prefect
server, by their own rules (the same crash_after and run counts, nothing when they are disabled):
it marks Crashed a run of the pool unheard for crash_after, or left Pending that long (its process
died as it started, so it never sent a heartbeat), and resubmits the pool's crashed trainings that
stayed Crashed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
from prefect.workers.process import ProcessWorker

from cnnflow.components import compat
from cnnflow.components.errors import described

HAND_BACK_SECONDS = 25.0  # inside the 30 s Kubernetes and Docker wait between SIGTERM and SIGKILL
MISSED = "cnnflow: resubmitted after a crash (by a worker: the automation missed it)"
CHECK_SECONDS = 30.0  # how often, and after how long, a crashed training the automation missed is resubmitted


class Worker(ProcessWorker):
    type = "cnnflow"
    _display_name = "cnnflow"
    _description = ("Prefect's process worker for cnnflow's work pools: stopped with SIGTERM, it hands its "
                    "trainings back to the pool (they resume on another worker) before it stops.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._log = compat.worker_logger(self)
        self._handing_back = threading.Event()
        self._next_check = time.monotonic() + CHECK_SECONDS
        self._unheard_since = 0.0  # when this worker last failed to reach the Prefect server
        self._main = _main_task()  # `prefect worker start` stops when it is cancelled, as on Ctrl-C
        if threading.current_thread() is threading.main_thread():
            self._stop = signal.getsignal(signal.SIGTERM)  # `prefect worker start`'s: stop now
            signal.signal(signal.SIGTERM, self._hand_back)

    async def get_and_submit_flow_runs(self):
        if self._handing_back.is_set():
            return []
        if time.monotonic() > self._next_check:
            self._next_check = time.monotonic() + CHECK_SECONDS
            try:
                await self._heal_pool()
            except (httpx.HTTPError, OSError) as error:  # a check that could not run now runs at the next poll
                self._unheard_since = time.time()  # the server was down: heartbeats were lost, not missed
                self._log.debug(f"cnnflow: the pool's check for crashed runs failed: {error}")
            except Exception as error:  # not the server's outage: a changed Prefect API would switch healing off
                self._log.warning(f"cnnflow: the pool's check for crashed runs failed ({described(error)}); "
                                     f"crashed runs the automations miss are not resubmitted", exc_info=error)
        return await super().get_and_submit_flow_runs()

    async def _heal_pool(self, now=None) -> None:
        """What the two automations (flows/orchestration/healing.py) do, for the pool's runs they cannot see or
        missed. A run that sent no heartbeat for jobs.crash_after (the crash automation's trigger
        state does not survive a restart of the Prefect server), or stayed Pending that long (its
        process died before it started, so it never sent one), is marked Crashed, unless this worker
        itself could not reach the server within that time. A training Crashed for CHECK_SECONDS
        that the resubmit rule covers is scheduled again (the server passes events to automations
        in memory: a crash recorded around its restart reaches none). `now`: for tests."""
        from datetime import datetime, timedelta, timezone

        from prefect.client.schemas.objects import StateType
        from prefect.states import AwaitingRetry, Crashed

        from cnnflow.flows.orchestration.healing import CRASH_AUTOMATION, RESUBMIT_AUTOMATION, RESUMABLE_TAG

        now = now or datetime.now(timezone.utc)
        crash_rule = await self._automation(CRASH_AUTOMATION)
        if crash_rule is not None and crash_rule.enabled:
            crash_after = crash_rule.trigger.within.total_seconds()
            since = now - timedelta(seconds=crash_after)
            if since.timestamp() > self._unheard_since:
                for flow_run in [*await self._runs_in(StateType.PENDING), *await self._runs_in(StateType.RUNNING)]:
                    if flow_run.state.timestamp <= since and not await self._heard_from(flow_run, since, now):
                        message = (f"cnnflow: no heartbeat for {crash_after:g} s" if flow_run.state.is_running() else
                                   f"cnnflow: pending for more than {crash_after:g} s (its process never started)")
                        self._log.warning(f"{message}: flow run {flow_run.name} ({flow_run.id})")
                        await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        resubmit_rule = await self._automation(RESUBMIT_AUTOMATION)
        if resubmit_rule is None or not resubmit_rule.enabled:
            return
        run_counts = {int(count) for count in resubmit_rule.trigger.match.root.get("prefect.run-count", [])}
        for flow_run in await self._runs_in(StateType.CRASHED, tag=RESUMABLE_TAG):
            if flow_run.run_count in run_counts and flow_run.state.timestamp <= now - timedelta(seconds=CHECK_SECONDS):
                self._log.warning(f"cnnflow: flow run {flow_run.name} ({flow_run.id}) crashed and was not "
                                     f"resubmitted by the automation; resubmitting it")
                await self.client.set_flow_run_state(flow_run.id, AwaitingRetry(message=MISSED), force=True)

    async def _heard_from(self, flow_run, since, until) -> bool:
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

        heartbeats = await self.client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since, until=until), event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"])), limit=1)
        return bool(heartbeats.events)

    async def _automation(self, name: str):
        return next(iter(await self.client.read_automations_by_name(name)), None)

    async def _runs_in(self, state_type, tag: str | None = None) -> list:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
            WorkPoolFilter,
            WorkPoolFilterName,
        )

        return await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state_type])),
                                          tags=FlowRunFilterTags(all_=[tag]) if tag else None),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[compat.worker_pool_name(self)])))

    def _hand_back(self, number, frame) -> None:
        # Only flags here: a handler that prints can land inside another write to stdout (a
        # "reentrant call" error), and a signal sent to itself may wait for an idle loop to wake.
        if self._handing_back.is_set():
            if callable(self._stop):
                self._stop(number, frame)
            return
        self._handing_back.set()
        threading.Thread(target=self._hand_back_and_stop, daemon=True).start()

    def _hand_back_and_stop(self) -> None:
        import psutil

        runs = _flow_run_processes()
        print(f"cnnflow worker: SIGTERM: taking no new flow run; handing {len(runs)} back to the pool "
              f"(they resume on another worker), then stopping", flush=True)
        for process in runs:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # the process group, as Prefect's cancel does
            except ProcessLookupError:
                pass
        _, alive = psutil.wait_procs(runs, timeout=HAND_BACK_SECONDS)
        if alive:
            print(f"cnnflow worker: {len(alive)} flow run(s) still running after {HAND_BACK_SECONDS:.0f} s; "
                  f"stopping anyway (Prefect marks them Crashed when their heartbeat stops)", flush=True)
        if self._main is None:
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: the stop of whoever runs this worker
        else:
            self._main.get_loop().call_soon_threadsafe(self._main.cancel)


def _main_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # built outside an event loop
        return None


def _flow_run_processes() -> list:
    """This worker's flow-run processes: its children that lead a process group of their own."""
    import psutil

    runs = []
    for child in psutil.Process().children():
        try:
            if os.getpgid(child.pid) == child.pid:
                runs.append(child)
        except ProcessLookupError:
            pass
    return runs
