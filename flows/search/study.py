"""The search's Optuna study: opened or continued with its seeded sampler and pruner, the budget of
the next trial, and each trial's MLflow run told back to the study."""

from __future__ import annotations

import json
from typing import Any

from cnnflow.components import compat
from cnnflow.components.errors import SettingsError, counted
from cnnflow.flows.search.space import Plan, as_override, rounded, shown
from cnnflow.flows.tracking import store
from cnnflow.flows.tracking.lifecycle import store_wide_lock
from cnnflow.flows.tracking.names import REPORT_TAG, SEARCH, SEARCH_TRIAL, STATE_TAG


def opened_study(plan: Plan):
    """The plan's study, created or continued."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cnnflow says what each trial did
    search = plan.search
    pruner = {"hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.max_epochs),
              "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
              "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=search["startup_trials"],
                                                            n_warmup_steps=1),
              "none": optuna.pruners.NopPruner}[search["pruner"]]()
    try:  # Optuna creates a new storage's tables unguarded: two commands doing it at once collide
        with store_wide_lock("open an Optuna storage"):
            storage = optuna.storages.RDBStorage(plan.storage, engine_kwargs=_engine_options(plan.storage))
            study = optuna.create_study(storage=storage, study_name=plan.study_name, pruner=pruner,
                                        sampler=optuna.samplers.RandomSampler(),  # replaced below, once seeded
                                        direction="maximize" if search["direction"] == "max" else "minimize",
                                        load_if_exists=True)
    except (SQLAlchemyError, ValueError, ImportError) as error:
        raise SettingsError(f"search.storage={shown(plan.storage)}: cannot open it as an Optuna storage "
                            f"({str(error).splitlines()[0][:200]})") from None
    study.sampler = _sampler(search, len(study.get_trials(deepcopy=False)))
    return study


def _sampler(search: dict[str, Any], trials_so_far: int):
    """The sampler, seeded by search.seed and by how many trials the study holds: a continued search
    draws on from there instead of drawing its first values again (the same seed in a new process
    would repeat them, so a search stopped after one trial trained the same values twice). The two
    are mixed, not added: with seed + trials, seed 1 continued after one trial drew exactly what a
    new search of seed 2 draws, so two "independent" seeds of a benchmark shared their trials."""
    import numpy as np
    import optuna

    seed = search["seed"]
    if trials_so_far:
        seed = int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])
    if search["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search["startup_trials"], constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _engine_options(url: str) -> dict[str, Any]:
    # the judge thread and the trials loop write one SQLite file together
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def states():
    from optuna.trial import TrialState

    return TrialState


def epochs_for_next_trial(study, plan: Plan) -> int:
    """How many epochs the next trial may train (0: the budget is spent). Running trials keep what
    they were given, so the epoch budget is never overrun; the last trial may get fewer epochs."""
    state = states()
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (state.COMPLETE, state.PRUNED)]
    running = [t for t in trials if t.state == state.RUNNING]
    if plan.search["trials"] and len(done) + len(running) >= plan.search["trials"]:
        return 0
    if not plan.search["epochs"]:
        return plan.max_epochs
    spent = sum(t.user_attrs.get("epochs_trained", 0) for t in trials if t.state != state.RUNNING)
    spent += sum(t.user_attrs.get("epochs", plan.max_epochs) for t in running)
    return max(0, min(plan.max_epochs, plan.search["epochs"] - spent))


def trial_overrides(plan: Plan, trial, epochs: int) -> list[str]:
    """The training a trial is: the fixed settings, the sampled ones, validation only, its tags."""
    sampled = [as_override(key, trial.params[key]) for key in plan.space]
    shorter = [f"train.epochs={epochs}"] if epochs < plan.max_epochs else []
    return [*plan.fixed, *sampled, *shorter, "train.test=false", f"+tags.{SEARCH}='{plan.study_name}'",
            f"+tags.{SEARCH_TRIAL}={trial.number}"]


def new_trial(study, plan: Plan, epochs: int):
    trial = study.ask(plan.space)
    trial.set_user_attr("epochs", epochs)
    trial.set_user_attr("overrides", trial_overrides(plan, trial, epochs))
    return trial


def describe(trial, plan: Plan) -> str:
    values = " ".join(as_override(key, rounded(trial.params[key])) for key in plan.space)
    return f"trial {trial.number} ({values})"


def trial_run(plan: Plan, number: int):
    """The MLflow run of trial `number`, newest first, or None."""
    import mlflow

    runs = mlflow.search_runs([store.experiment_id(plan.cfg)], output_format="list", max_results=1,
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.{SEARCH} = '{plan.study_name}' and tags.{SEARCH_TRIAL} = '{number}'")
    return runs[0] if runs else None


def concluded(study, plan: Plan, number: int, failure: str | None = None) -> str:
    """Tell the study how trial `number` ended, from its MLflow run; returns one line saying it."""

    state = states()
    trial = study.trials[number]
    run = trial_run(plan, number)
    pruned = run is not None and run.data.tags.get(STATE_TAG, "").startswith("pruned")  # a diverged one too
    if not pruned and (failure or run is None or run.info.status != "FINISHED"):
        why = failure or (f"its run {run.info.run_id} ended {run.info.status}" if run else "it has no MLflow run")
        if run:
            store.mlflow_client().set_tag(run.info.run_id, STATE_TAG, f"failed: {why}"[:500])
        study.tell(number, state=state.FAIL)  # last: a step repeated after an outage finds the trial untold
        return f"{describe(trial, plan)}: failed ({why}); another trial takes its place"
    reported = json.loads(run.data.tags.get(REPORT_TAG) or "{}")
    epochs = reported.get("epoch") or trial.user_attrs.get("epochs", plan.max_epochs)
    compat.set_trial_user_attr(study, trial, "run_id", run.info.run_id)
    compat.set_trial_user_attr(study, trial, "epochs_trained", epochs)
    metric = plan.search["metric"]
    value = reported.get("logs", {}).get(metric)
    if value is not None and epochs not in trial.intermediate_values:  # the last epoch, which has no verdict
        compat.set_intermediate_value(study, trial, epochs, value)
    if pruned:
        study.tell(number, state=state.PRUNED)
        shown = "" if value is None else f", {metric} {value:.4f}"
        return f"{describe(trial, plan)}: {run.data.tags[STATE_TAG]}{shown}  (run {run.info.run_id})"
    value = run.data.metrics[metric]
    store.mlflow_client().set_tag(run.info.run_id, STATE_TAG, "complete")
    study.tell(number, value)
    return f"{describe(trial, plan)}: complete after {counted(epochs, 'epoch')}, {metric} {value:.4f}  (run {run.info.run_id})"


