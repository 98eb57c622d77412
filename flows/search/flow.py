"""The search flow: trials until the budget is spent, one after another here or as many at once as a
pool has workers, riding out outages of the MLflow store and the Prefect server."""

from __future__ import annotations

import contextlib
import time

from cnnflow.components.errors import RunError, ServerOutage, UserError, counted, described, is_transient
from cnnflow.flows.orchestration.engine import flow, run_logger
from cnnflow.flows.search.pruning import Judge
from cnnflow.flows.search.report import summary
from cnnflow.flows.search.space import Plan, planned, shown
from cnnflow.flows.search.study import (
    concluded,
    describe,
    epochs_for_next_trial,
    new_trial,
    opened_study,
    states,
    trial_run,
)
from cnnflow.flows.setup.config import Experiment
from cnnflow.flows.tracking import names, store
from cnnflow.flows.tracking.lifecycle import HeldElsewhere, Lease, store_wide_lock
from cnnflow.flows.tracking.names import STATE_TAG

MAX_FAILURES_IN_A_ROW = 3


@flow(name="search", flow_run_name="search {experiment}")
def search_flow(experiment: Experiment = "quickstart", overrides: list[str] | None = None, pool: str | None = None) -> dict:
    """A pruned hyperparameter search: trials until the budget is spent, then the best on test.

    Args:
        experiment: The recipe whose settings are searched.
        overrides: The space in Hydra's sweep grammar (`model.width=int(interval(16,64))`,
            `optimizer.learning_rate=tag(log,interval(1e-4,1e-2))`, `data.batch_size=choice(64,128,256)`),
            fixed settings (`key=value`), and the search's own (`search=NAME`, `search.trials=20`,
            `search.epochs=45`, `search.pruner=median`, ...).
        pool: Train each trial on this Prefect work pool's workers (cnnflow deploy --pool NAME first);
            None: here, one trial after another.
    """
    logger = run_logger()
    plan = planned(experiment, list(overrides or []))
    uri = store.use_store(plan.cfg)
    study = opened_study(plan)
    state = states()
    with _parent_run(study, plan, uri, logger) as parent, Judge(study, plan, parent, logger):
        done = [t for t in study.trials if t.state.is_finished()]  # read once this command holds the study
        if study.trials:
            logger.info(f"search: continuing study {plan.study_name}: {counted(len(done), 'trial')} done, "
                        f"{sum(t.state == state.RUNNING for t in study.trials)} to take up")
        if pool:
            _run_on_pool(study, plan, pool, logger)
        else:
            _run_here(study, plan, logger)
        result = summary(study, plan, parent, logger)
    return result


def _run_here(study, plan: Plan, logger) -> None:
    """Trials one after another in this process; a trial the last command left running first."""
    state = states()
    failures = 0
    taken_up = [t for t in study.trials if t.state == state.RUNNING]
    while True:
        trial = taken_up.pop(0) if taken_up else None
        if trial is None:
            epochs = epochs_for_next_trial(study, plan)
            if not epochs:
                return
            trial = new_trial(study, plan, epochs)
        else:
            logger.info(f"search: taking up {describe(trial, plan)} where it stopped")
        logger.info(f"search: {describe(trial, plan)}, {counted(trial.user_attrs['epochs'], 'epoch')}")
        failure = _riding_out_outages(plan, logger, lambda: _trained_here(study, plan, trial, logger))
        failures = failures + 1 if study.trials[trial.number].state == state.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise RunError(f"{counted(failures, 'trial')} in a row failed, the last: {failure}; the search stops (the same "
                           f"command continues it once that is fixed)")


def _trained_here(study, plan: Plan, trial, logger) -> str | None:
    """Train `trial` (resumed if it has a run) and tell the study how it ended; its failure or None.
    Safe to call again after an outage: a finished run is not trained again, and the study is told last."""
    from cnnflow.flows.train import train_flow

    failure = None
    run = trial_run(plan, trial.number)
    if not (run and run.info.status == "FINISHED"):  # else it ended before the last command could tell
        try:
            train_flow(plan.experiment, trial.user_attrs["overrides"])
        except KeyboardInterrupt:
            try:  # the run says why it stopped; the study keeps it RUNNING
                stopped = trial_run(plan, trial.number)
                if stopped:
                    store.set_tags(stopped.info.run_id, {STATE_TAG: "stopped (Ctrl-C or SIGTERM); the same search "
                                                                    "command takes it up in this run"})
            except Exception as error:  # the stop goes on: the run's own status says it stopped
                logger.warning(f"search: could not mark {describe(trial, plan)} stopped ({described(error)})")
            raise
        except HeldElsewhere as error:  # not this trial's failure: another command trains it
            raise RunError(f"{describe(trial, plan)} is being trained elsewhere ({error}); is the same search "
                           f"running in another command? Stop that one, or wait for it") from None
        except Exception as error:
            if _is_outage(error):
                raise
            failure = str(error).splitlines()[0][:300] if isinstance(error, UserError) else \
                f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    logger.info("search: " + concluded(study, plan, trial.number, failure))
    return failure


def _is_outage(error: BaseException) -> bool:
    """A server failed, not the trial: its training stopped resumable, or an MLflow call found no
    server (other transient errors, a download's, are the trial's own)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, ServerOutage) or isinstance(error, MlflowException) and is_transient(error)


OUTAGE_POLL_SECONDS = 3.0


def _riding_out_outages(plan: Plan, logger, step):
    """`step()`, again once the MLflow store answers after an outage, for at most train.outage_timeout
    of outage: a trial is not failed, and no trial is counted twice, because a server went away."""
    from cnnflow.components.compat import outage_reason
    from cnnflow.flows.tracking.outbox import failing_fast

    bound, uri, since = plan.cfg["train"]["outage_timeout"], store.tracking_uri(plan.cfg), None
    while True:
        try:
            with failing_fast():  # an outage is seen at once, not after MLflow's minutes of retries
                return step()
        except Exception as error:
            if not _is_outage(error) or isinstance(error, ServerOutage) and _answers(uri):
                raise  # not the store's outage: a Prefect server's ends the search resumable (exit 5)
            reason = outage_reason(error)
        since = since or time.monotonic()
        logger.warning(f"search: the MLflow store {uri} fails ({reason}); the search waits for it (at most "
                       f"{bound:g} s: train.outage_timeout), then goes on with the same trial")
        while True:  # `since` is the outage's first failure: steps that keep failing are bounded too
            if time.monotonic() - since > bound:
                raise ServerOutage(f"the MLflow store {uri} has failed for {time.monotonic() - since:.0f} s "
                                   f"({reason}), longer than train.outage_timeout={bound:g}; run the same command "
                                   f"again once it answers, and the search continues its study") from None
            if _answers(uri):
                break
            time.sleep(OUTAGE_POLL_SECONDS)
        logger.warning(f"search: the MLflow store {uri} answers again after {time.monotonic() - since:.0f} s")


def _answers(uri: str) -> bool:
    try:
        store.check_store(uri)
        return True
    except ServerOutage:
        return False


POOL_SECONDS = 3.0  # how often a search on a pool looks at its trials' flow runs


def _run_on_pool(study, plan: Plan, pool: str, logger) -> None:
    """Trials as runs of the pool's train deployment, as many at once as the pool has workers online
    (or search.parallel); trials the last command left running are watched, not submitted again."""
    import httpx
    from prefect import get_client

    from cnnflow.components.compat import outage_reason
    from cnnflow.flows.orchestration.pool import has_ended, submitted

    state = states()
    in_flight = {t.number: t.user_attrs.get("flow_run_id") for t in study.trials if t.state == state.RUNNING}
    failures, unanswered = 0, False
    with get_client(sync_client=True) as client:
        while True:
            try:
                for number, flow_run_id in list(in_flight.items()):
                    run = client.read_flow_run(flow_run_id) if flow_run_id else None
                    if run is not None and not has_ended(run):
                        continue
                    failure = None if run is not None and run.state.is_completed() else \
                        f"flow run {run.name}: {run.state.name} {run.state.message or ''}".strip() if run else None
                    logger.info("search: " + concluded(study, plan, number, failure))
                    del in_flight[number]
                    failures = failures + 1 if study.trials[number].state == state.FAIL else 0
                    if failures >= MAX_FAILURES_IN_A_ROW:
                        raise RunError(f"{counted(failures, 'trial')} in a row failed, the last: {failure}; the search stops (the "
                                       f"same command continues it once that is fixed)")
                while len(in_flight) < _parallel(client, plan, pool) and (epochs := epochs_for_next_trial(study, plan)):
                    trial = new_trial(study, plan, epochs)
                    [flow_run] = submitted(pool, [(plan.experiment, trial.user_attrs["overrides"])])
                    trial.set_user_attr("flow_run_id", str(flow_run.id))
                    in_flight[trial.number] = str(flow_run.id)
                    logger.info(f"search: {describe(trial, plan)}, {counted(epochs, 'epoch')} -> flow run {flow_run.name} on "
                                f"pool {pool}")
                if unanswered:
                    logger.info("search: the servers answer again")
                unanswered = False
            except Exception as error:  # the trials go on without the servers; the search waits for them
                if not (isinstance(error, httpx.HTTPError) or _is_outage(error)):
                    raise
                if not unanswered:
                    server = "Prefect server" if isinstance(error, httpx.HTTPError) else "MLflow store"
                    logger.warning(f"search: the {server} fails ({outage_reason(error)}); the trials go on, "
                                   f"and the search waits for it")
                unanswered = True
            if not in_flight and not unanswered:
                return
            time.sleep(POOL_SECONDS)


def _parallel(client, plan: Plan, pool: str) -> int:
    if plan.search["parallel"]:
        return plan.search["parallel"]
    return max(1, sum(worker.status == "ONLINE" for worker in client.read_workers_for_work_pool(pool)))


@contextlib.contextmanager
def _parent_run(study, plan: Plan, uri: str, logger):
    """The search's MLflow run (the same one when a search is continued): RUNNING while it searches,
    then FINISHED, or KILLED when stopped. Not the active run: each trial's training is that."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = store.mlflow_client()
    # one parent run per study, and one command searching it: its lease is held for the whole search
    with store_wide_lock(f"search {plan.study_name}"):
        run_id = study.user_attrs.get("mlflow_run_id")
        try:
            run_id = run_id and client.get_run(run_id).info.run_id
        except MlflowException:
            run_id = None  # the study outlived its MLflow store: a new parent run
        if not run_id:
            run_id = client.create_run(store.experiment_id(plan.cfg), run_name=f"search {plan.study_name}").info.run_id
            study.set_user_attr("mlflow_run_id", run_id)
        lease = Lease(run_id, plan.cfg["train"]["lease_timeout"])
        try:
            lease.acquire()
        except HeldElsewhere as held:
            raise RunError(f"study {plan.study_name} is being searched by {held.holder} (MLflow run {run_id}); wait for "
                           f"it to end, or stop it: the same command then continues the study") from None
    client.update_run(run_id, status="RUNNING")
    logged = client.get_run(run_id).data.params
    settings = {"study": plan.study_name, "storage": shown(plan.storage), "experiment": plan.experiment,
                **{f"space.{key}": expression for key, expression in plan.expressions.items()},
                **{key: plan.search[key] for key in ("metric", "direction", "sampler", "pruner", "seed", "startup_trials")},
                **{f"budget.{key}": plan.search[key] for key in ("trials", "epochs", "parallel")},
                "budget.epochs_per_trial": plan.max_epochs, "fixed": " ".join(plan.fixed) or "(none)"}
    # params are set once: a continued search's changed budget goes to the tags below
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in settings.items() if key not in logged])
    store.set_tags(run_id, {names.SEARCH_STUDY: plan.study_name, names.SEARCH_BUDGET_TRIALS: plan.search["trials"],
                            names.SEARCH_BUDGET_EPOCHS: plan.search["epochs"], names.EXPERIMENT: plan.experiment})
    logger.info(f"search: study {plan.study_name} in {shown(plan.storage)}; MLflow run {run_id} in {uri}")
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except ServerOutage:
        status = None  # the store is out: the run stays RUNNING, and the same command continues it
        raise
    finally:
        if status:
            client.set_terminated(run_id, status)
        lease.release(outage=status is None)


