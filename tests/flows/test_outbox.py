"""The one writer into a training's run (flows/tracking/outbox.py) against a real SQLite store: writes arrive
in order, a newer checkpoint makes older waiting ones moot, a displaced holder drops what it has not
sent, and outages are named as an operator reads them. Real server outages: tests/test_outages.py."""

from __future__ import annotations

import threading

import mlflow
import pytest
from mlflow import MlflowClient

from cnnflow.flows.tracking.lifecycle import Lease
from cnnflow.components.compat import outage_reason
from cnnflow.flows.tracking.outbox import Displaced, Outbox, Write


pytestmark = pytest.mark.smoke


@pytest.fixture
def leased_run(mlflow_store):
    with mlflow.start_run() as run:
        pass
    lease = Lease(run.info.run_id, 120)
    lease.acquire(heartbeats=False)
    yield lease
    lease.release()


def test_metrics_arrive_in_step_order_and_a_newer_checkpoint_makes_older_waiting_ones_moot(leased_run):
    outbox = Outbox(leased_run, outage_timeout=60)
    on_the_wire, gate, sent, dropped = threading.Event(), threading.Event(), [], []

    def checkpoint(epoch):
        def send(confirm):
            on_the_wire.set()
            gate.wait(30)  # the first upload is on the wire while the others queue behind it
            sent.append(epoch)
        return Write(f"checkpoint of epoch {epoch}", send, kind="checkpoint", discard=lambda: dropped.append(epoch),
                     epoch=epoch)

    outbox.put(checkpoint(1))
    assert on_the_wire.wait(30)
    for step in range(1, 6):
        outbox.metrics({"loss": 1.0 / step}, step)
    outbox.put(checkpoint(2))
    outbox.put(checkpoint(3))
    gate.set()
    outbox.flush()
    outbox.close()
    assert sent == [1, 3] and dropped == [2]  # epoch 1 was on the wire; 2 was overtaken by 3
    history = MlflowClient().get_metric_history(leased_run.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]


def test_an_epochs_metrics_reach_the_store_after_a_checkpoint_of_it_so_a_resume_never_logs_one_twice(leased_run):
    outbox = Outbox(leased_run, outage_timeout=60)
    seen_by_checkpoint, sent = {}, threading.Event()

    def checkpoint(epoch):
        def send(confirm):
            seen_by_checkpoint[epoch] = [m.step for m in MlflowClient().get_metric_history(leased_run.run_id, "loss")]
            sent.set()
        return Write(f"checkpoint of epoch {epoch}", send, kind="checkpoint", epoch=epoch)

    for epoch in (1, 2):
        outbox.metrics({"loss": 1.0 / epoch}, epoch)
    outbox.put(checkpoint(1))
    assert sent.wait(30)  # else checkpoint 2 would make it moot
    outbox.put(checkpoint(2))
    outbox.metrics({"loss": 0.3}, 3)  # killed before its checkpoint: a resume trains epoch 3 again
    outbox.close()
    assert seen_by_checkpoint == {1: [], 2: [1]}
    assert [m.step for m in MlflowClient().get_metric_history(leased_run.run_id, "loss")] == [1, 2]


def test_a_displaced_holder_drops_what_it_has_not_sent_and_says_so_at_its_next_check(leased_run):
    outbox = Outbox(leased_run, outage_timeout=60)
    MlflowClient().log_param(leased_run.run_id, f"lease.{leased_run.generation + 1}", "gpu-7 4242 0.00 feedc0de")
    outbox.metrics({"loss": 0.5}, 1)
    with pytest.raises(Displaced, match="was taken over by another process"):
        outbox.flush()
    outbox.close()
    assert MlflowClient().get_metric_history(leased_run.run_id, "loss") == []


@pytest.mark.parametrize("message, reason", [
    ("API request to http://h:5000/api/2.0/mlflow-artifacts/artifacts/1/model.keras failed with exception "
     "HTTPConnectionPool(host='h', port=5000): Max retries exceeded with url: /x (Caused by "
     "ResponseError('too many 500 error responses'))", "it answers HTTP 500"),
    ("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 != 200. Response body: ''",
     "it answers HTTP 503"),
    ("HTTPConnectionPool(host='h', port=5000): Max retries exceeded with url: /api (Caused by NewConnectionError("
     "'Failed to establish a new connection: [Errno 111] Connection refused'))", "it is unreachable"),
    ("HTTPConnectionPool(host='h', port=5000): Read timed out. (read timeout=20)", "it does not answer (timeout)"),
    ("(sqlite3.OperationalError) database or disk is full", "its disk is full"),
])
def test_an_outage_is_named_as_an_operator_reads_it(message, reason):
    assert outage_reason(Exception(message)).startswith(reason)


def test_an_epoch_staged_again_after_a_crash_stages_the_new_checkpoint(tmp_path):
    """A crash can leave .upload/epochN/model.keras behind, a hard link to the checkpoint file that
    the resumed training rewrites in place: staging it again raised SameFileError mid-training."""
    import types

    from cnnflow.flows.tracking.checkpoints import checkpoint_uploader

    queued = []
    outbox = types.SimpleNamespace(run_id="r", put=queued.append)
    submit = checkpoint_uploader(outbox, tmp_path, every=1, slots=2, last_epoch=3)
    model = tmp_path / "checkpoint-epoch0003.keras"
    model.write_bytes(b"before the crash")
    submit(model, {"epoch": 3})  # queued, never sent: the process died
    with open(model, "wb") as handle:  # the resumed training writes the same file again
        handle.write(b"after the resume")
    submit(model, {"epoch": 3})
    assert (tmp_path / ".upload" / "epoch0003" / "model.keras").read_bytes() == b"after the resume"
    assert len(queued) == 2


def test_a_write_failing_with_a_defect_is_dropped_at_once_and_said_not_retried_as_an_outage(leased_run, caplog):
    """A TypeError is cnnflow's bug (or a library's changed API), not the store's outage: retrying
    it for outage_timeout (600 s by default) would hide it behind 'the store fails'."""
    outbox = Outbox(leased_run, outage_timeout=60)

    def send(confirm):
        raise TypeError("log_batch() got an unexpected keyword argument 'synchronous'")

    with caplog.at_level("WARNING"):
        outbox.put(Write("checkpoint of epoch 1", send, kind="checkpoint", epoch=1))
        outbox.metrics({"loss": 0.5}, 1)
        outbox.flush()
    outbox.close()
    assert outbox.outage_since is None  # never taken for an outage
    assert [m.step for m in MlflowClient().get_metric_history(leased_run.run_id, "loss")] == [1]
    failed = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failed) == 1 and "checkpoint of epoch 1 failed (TypeError: log_batch() got an unexpected" in failed[0].message
