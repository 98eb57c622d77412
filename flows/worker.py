"""The worker of a cnnflow work pool: Prefect's process worker, except that SIGTERM hands its jobs back.

`cnnflow deploy --pool NAME` makes the pool with the type "cnnflow", and Prefect finds this class
through the `prefect.collections` entry point (pyproject.toml), so the usual `prefect worker start
--pool NAME` runs it. Prefect's own process worker, stopped with SIGTERM (Docker, Kubernetes and
systemd stop that way), ends at once and its flow-run processes die with it (SIGKILL): their jobs
are found only when Prefect misses their heartbeat, `jobs.crash_after` later. This one takes no new
run, sends each flow-run process SIGTERM and waits for them: a training stops after its batch with
its MLflow run KILLED and its lease released, Prefect marks the flow run Crashed, and the resubmit
automation (flows/healing.py) schedules it again for any free worker, which resumes it. Then the
worker stops as Prefect's does. A second SIGTERM stops it at once.
"""

from __future__ import annotations

import os
import signal
import threading

from prefect.workers.process import ProcessWorker

HAND_BACK_SECONDS = 25.0  # inside the 30 s Kubernetes and Docker wait between SIGTERM and SIGKILL


class Worker(ProcessWorker):
    type = "cnnflow"
    _display_name = "cnnflow"
    _description = ("Prefect's process worker for cnnflow's work pools: stopped with SIGTERM, it hands its "
                    "trainings back to the pool (they resume on another worker) before it stops.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._handing_back = threading.Event()
        if threading.current_thread() is threading.main_thread():
            self._stop = signal.getsignal(signal.SIGTERM)  # `prefect worker start`'s: stop now
            signal.signal(signal.SIGTERM, self._hand_back)

    async def get_and_submit_flow_runs(self):
        if self._handing_back.is_set():
            return []
        return await super().get_and_submit_flow_runs()

    def _hand_back(self, number, frame) -> None:
        if self._handing_back.is_set():
            if callable(self._stop):
                self._stop(number, frame)
            return
        self._handing_back.set()
        runs = _flow_run_processes()
        print(f"cnnflow worker: SIGTERM: taking no new flow run; handing {len(runs)} back to the pool "
              f"(they resume on another worker), then stopping", flush=True)
        for process in runs:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # the process group, as Prefect's cancel does
            except ProcessLookupError:
                pass
        threading.Thread(target=self._stop_when_gone, args=(runs,), daemon=True).start()

    def _stop_when_gone(self, runs) -> None:
        import psutil

        _, alive = psutil.wait_procs(runs, timeout=HAND_BACK_SECONDS)
        if alive:
            print(f"cnnflow worker: {len(alive)} flow run(s) still running after {HAND_BACK_SECONDS:.0f} s; "
                  f"stopping anyway (Prefect marks them Crashed when their heartbeat stops)", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # now the stop of `prefect worker start`, in the main thread


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
