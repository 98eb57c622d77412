"""What a training writes into its MLflow run while it trains: one writer, in order, through outages.

A training never waits on a server. Its per-epoch metrics, its checkpoint uploads and its lease's
heartbeat go through one thread, the outbox, which

- writes only while this process holds the run's lease: before every write it reads the lease's
  newest generation, and a holder that was displaced (paused past `train.lease_timeout` while
  another machine took the run over) drops all it has not sent; it never writes late into a run
  another process owns;
- keeps what the store does not take (unreachable, HTTP 5xx, a full disk) and delivers it in order
  once the store answers again, with one warning when the outage starts and one line when it ends;
- gives up after `train.outage_timeout` seconds of outage: the training stops at its next batch
  (`ServerOutage`, exit code 5) with its checkpoints on this machine's disk, its run neither FAILED
  nor lost: the same command resumes it, and what the store missed is logged again from the
  checkpoint's history.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from cnnflow.components import compat
from cnnflow.components.compat import outage_reason
from cnnflow.components.errors import RunError, ServerOutage, described, is_defect
from cnnflow.flows.tracking import store

_log = logging.getLogger(__name__)
_RETRY_SECONDS = (1, 2, 4, 8, 15)  # back-off between tries while the store does not answer


class Displaced(RunError):
    """Another process took over the run's lease; this one may write nothing more into it."""


@dataclass
class Write:
    what: str  # as messages name it: "metrics of epoch 3"
    send: Callable[[Callable[[], None]], None]  # called with `confirm`, to call between its parts
    kind: str = "write"  # "checkpoint" and "metrics" carry the epoch they are of
    discard: Callable[[], None] = lambda: None  # when dropped unsent
    epoch: int = 0


def _is_refusal(error: BaseException) -> bool:
    """The store answered and refused this write (a bad value, a deleted run): sending it again
    will not help, unlike an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500 \
        and error.error_code not in ("REQUEST_LIMIT_EXCEEDED", "TEMPORARILY_UNAVAILABLE")


class Outbox:
    """The one writer into a leased run (flows/tracking/lifecycle.py hands it out with the lease)."""

    def __init__(self, lease, outage_timeout: float, logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.lease, self.run_id, self.outage_timeout = lease, lease.run_id, outage_timeout
        self.logger = logger or _log
        self.outage_since: float | None = None  # when the first failed call of the current outage began
        self.expired: str | None = None
        self._reason = ""
        self._kept_during_outage = 0
        self._pending: collections.deque[Write] = collections.deque()
        self._durable_epoch = 0  # the newest checkpoint in the store
        self._flushing = False
        self._sending = None
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._monitor = None
        self._thread = threading.Thread(target=self._deliver_all, name=f"outbox {self.run_id[:8]}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training's side

    def put(self, write: Write) -> None:
        """Queue a write; a newer checkpoint makes the older ones still waiting moot."""
        with self._changed:
            if self.lease.lost.is_set() or self.expired:
                write.discard()
                return
            if write.kind == "checkpoint":
                for older in [w for w in self._pending if w.kind == "checkpoint" and w is not self._sending]:
                    self._pending.remove(older)
                    older.discard()
            self._pending.append(write)
            self._changed.notify_all()

    def metrics(self, metrics: dict[str, float], epoch: int) -> None:
        """An epoch's metrics (epoch 0: before the first). They wait for a checkpoint of that epoch or a
        later one to reach the store (or for `flush`): a training killed before it resumes from an
        earlier checkpoint and logs that epoch again, so MLflow would hold it twice."""
        self.put(self.metrics_write(f"metrics of epoch {epoch}", metrics, epoch, kind="metrics"))

    def metrics_write(self, what: str, metrics: dict[str, float], step: int, kind: str) -> Write:
        """A write of `metrics` at `step`, stamped now (when they were measured, not when sent)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, float(value), now, step) for name, value in metrics.items()]
        return Write(what, lambda confirm: store.mlflow_client().log_batch(self.run_id, metrics=batch), kind=kind, epoch=step)

    def check(self) -> None:
        """Raise what stops the training: the run taken over by another process, or an outage past
        its bound. Cheap: the training calls it after every batch."""
        if self.lease.lost.is_set():
            raise Displaced(f"run {self.run_id} was taken over by another process (no heartbeat from this one for "
                            f"{self.lease.timeout:g} s: train.lease_timeout); this one stops and writes nothing more into it")
        if self.expired:
            raise ServerOutage(self.expired)

    def flush(self) -> None:
        """Wait until everything queued is delivered (bounded by train.outage_timeout), or raise why not.
        The training has ended: metrics waiting for a checkpoint go too."""
        with self._changed:
            self._flushing = True
            self._changed.notify_all()
            while self._pending or self._sending:
                self.check()
                self._changed.wait(0.5)
        self.check()

    def close(self, wait: float = 60.0) -> None:
        """Stop the writer: what is queued is tried once more, not through an outage. Joined for at
        most `wait` seconds: a call stuck on a dead store (MLflow retries for minutes outside the
        training) must not hold up the end of the command; the thread is a daemon."""
        self._closing.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(wait)
        if self._thread.is_alive():
            self.logger.warning(f"run {self.run_id}: the MLflow store did not answer the last write within {wait:g} s; "
                                f"leaving it behind")
        self._stop_system_metrics()

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    # ---------------------------------------------------------------------- the writer thread

    def _deliver_all(self) -> None:
        next_beat = 0.0
        failures = 0
        self._start_system_metrics()
        while True:
            with self._changed:
                while self._next() is None and not self._closing.is_set() and time.time() < next_beat:
                    self._changed.wait(next_beat - time.time())
                if self._closing.is_set() and (self._next() is None or failures):
                    self._drop_all("the training ended")
                    return
                write = self._sending = self._next()
            attempt = time.time()
            try:
                self._confirm()
                if time.time() >= next_beat:
                    self.lease.beat()
                    next_beat = time.time() + self.lease.timeout / 4
                if write:
                    write.send(self._confirm)
                self._answered()
                failures = 0
                if write:
                    with self._changed:
                        self._pending.remove(write)
                        if write.kind == "checkpoint":
                            self._durable_epoch = max(self._durable_epoch, write.epoch)
            except Displaced:
                self._drop_all("another process holds the run now")
                return
            except Exception as error:
                if write and is_defect(error):  # a bug, not an outage: retrying it for outage_timeout hides it
                    self.logger.error(f"run {self.run_id}: the {write.what} failed ({described(error)}); it is dropped",
                                      exc_info=error)
                    with self._changed:
                        self._pending.remove(write)
                    continue
                if write and _is_refusal(error):
                    self.logger.warning(f"run {self.run_id}: the store refused the {write.what} "
                                        f"({described(error)}); it is dropped")
                    with self._changed:
                        self._pending.remove(write)
                    continue
                failures += 1
                if self._failed(error, attempt):
                    self._drop_all("the outage lasted too long")
                    return
                left = self.outage_timeout - (time.time() - self.outage_since)  # the bound is met, not overshot
                if self._closing.wait(max(0.2, min(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS)) - 1], left + 0.1))):
                    continue
            finally:
                with self._changed:
                    self._sending = None
                    self._changed.notify_all()

    def _next(self) -> Write | None:
        """The first queued write that may go now: metrics wait for their epoch's checkpoint."""
        return next((write for write in self._pending if self._flushing or write.kind != "metrics"
                     or write.epoch <= self._durable_epoch), None)

    def _confirm(self) -> None:
        if not self.lease.confirm():
            raise Displaced(self.run_id)

    def _failed(self, error: BaseException, attempt: float) -> bool:
        """Note a failed call; True when the outage has lasted past its bound."""
        if self.outage_since is None:
            self.outage_since, self._reason = attempt, outage_reason(error)
            self._kept_during_outage = 0
            self.logger.warning(f"run {self.run_id}: the MLflow store {_store()} fails: {self._reason}. Training goes on; "
                                f"its metrics and checkpoints are kept and sent when the store answers again "
                                f"(for at most {self.outage_timeout:g} s: train.outage_timeout)")
        self._kept_during_outage = max(self._kept_during_outage, len(self._pending))
        lasted = time.time() - self.outage_since
        if lasted <= self.outage_timeout:
            return False
        self.expired = (f"the MLflow store {_store()} has failed for {lasted:.0f} s ({self._reason}), longer than "
                        f"train.outage_timeout={self.outage_timeout:g}; this training stops with its checkpoints in "
                        f"this machine's run folder: run the same command again once the store answers, and it resumes")
        return True

    def _answered(self) -> None:
        if self.outage_since is None:
            return
        lasted = time.time() - self.outage_since
        self.outage_since = None
        self.logger.warning(f"run {self.run_id}: the MLflow store answers again after {lasted:.0f} s; "
                            f"{self._kept_during_outage} kept write(s) are being delivered in order")
        if self._monitor is not None and not self._monitor_alive():
            self._start_system_metrics()  # MLflow's monitor stops at its first failed call

    def _drop_all(self, why: str) -> None:
        with self._changed:
            dropped = list(self._pending)
            self._pending.clear()
        for write in dropped:
            write.discard()
        if dropped and why != "the training ended":
            self.logger.warning(f"run {self.run_id}: {len(dropped)} write(s) not delivered ({why}): "
                                f"{', '.join(w.what for w in dropped[:4])}{' ...' if len(dropped) > 4 else ''}")
        elif dropped:
            self.logger.warning(f"run {self.run_id}: the store did not take {', '.join(w.what for w in dropped[:4])} "
                                f"before the training ended; the checkpoint's history has them for a resume")
        self._stop_system_metrics()

    # MLflow's own system metrics (CPU, memory, disk, network, GPU where present), started and
    # stopped with the writer, so a displaced holder stops writing those too.

    def _start_system_metrics(self) -> None:
        try:
            logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # it says every start and stop
            # one writer: never past a lost lease
            self._monitor = compat.started_system_metrics(self.run_id, _SystemMetricsThrough(self))
        except Exception as error:  # never worth stopping a training for
            self.logger.warning(f"run {self.run_id}: no system metrics ({described(error)})")
            self._monitor = None

    def _monitor_alive(self) -> bool:
        return compat.system_metrics_alive(self._monitor)

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            compat.stop_system_metrics(monitor)  # without the final flush, which waits on a store that may be gone


class _SystemMetricsThrough:
    """What MLflow's system-metrics monitor logs with (its BatchMetricsLogger's interface), put in
    the outbox, so its samples go in order with the rest and never into a run this process lost."""

    data: list = []
    total_training_time = total_log_batch_time = 0.0

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.outbox.put(self.outbox.metrics_write(f"system metrics {step or 0}", metrics, step or 0, kind="system"))

    def flush(self) -> None:
        pass


def _store() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def failing_fast():
    """While the outbox retries, MLflow's HTTP client need not: one try per call (its default is
    minutes of retries, which would hide an outage's start and stall every other write)."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    chosen = {var.name: os.environ.get(var.name) for var in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)}
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "0")
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "20")
    try:
        yield
    finally:
        for name, value in chosen.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
