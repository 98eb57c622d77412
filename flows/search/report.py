"""What a search ends with: the best trial evaluated on test (once per study), the table of every
trial and two figures, on the search's MLflow run and in the Prefect UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnflow.components.errors import RunError, counted
from cnnflow.flows.orchestration.report import publish_table
from cnnflow.flows.search.space import Plan, as_override, rounded
from cnnflow.flows.search.study import describe, states
from cnnflow.flows.tracking import names, store


def summary(study, plan: Plan, parent: str, logger) -> dict:
    """The best trial evaluated on test (once per study), figures and the table on the search's run."""

    from cnnflow.flows.inference import evaluate_flow

    state = states()
    trials = study.trials
    complete = [t for t in trials if t.state == state.COMPLETE]
    if not complete:
        raise RunError(f"no trial of study {plan.study_name} completed ({len(trials)} tried); nothing to evaluate")
    best = study.best_trial
    client = store.mlflow_client()
    recorded = client.get_run(parent).data
    test = {k.removeprefix("best_test_"): v for k, v in recorded.metrics.items() if k.startswith("best_test_")}
    if not test or recorded.tags.get(names.SEARCH_BEST_TRIAL) != str(best.number):
        test = evaluate_flow(best.user_attrs["run_id"], "test")
        store.log_metrics(parent, {f"best_test_{name}": value for name, value in test.items()})
    metric = plan.search["metric"]
    store.set_tags(parent, {names.SEARCH_BEST_TRIAL: best.number, names.SEARCH_BEST_RUN: best.user_attrs["run_id"],
                            names.SEARCH_BEST_PARAMS: " ".join(as_override(k, rounded(v)) for k, v in best.params.items())})
    epochs_spent = sum(t.user_attrs.get("epochs_trained", 0) for t in trials)
    store.log_metrics(parent, {f"best_{metric}": best.value, "epochs_spent": epochs_spent, "trials": len(trials),
                               "trials_pruned": sum(t.state == state.PRUNED for t in trials)})
    rows = table(study, plan)
    client.log_table(parent, {key: [row[key] for row in rows] for key in rows[0]}, "trials.json")
    for path in figures(study, plan, store.run_folder(parent, plan.cfg)):
        client.log_artifact(parent, str(path), "figures")
    publish_table(f"search-{plan.study_name}", rows, f"search {plan.study_name}: every trial, best first")
    result = {"study": plan.study_name, "run_id": parent, "best_trial": best.number, "best_run": best.user_attrs["run_id"],
              "params": best.params, metric: best.value, **{f"test_{k}": v for k, v in test.items()},
              "trials": len(trials), "pruned": sum(t.state == state.PRUNED for t in trials),
              "epochs_spent": epochs_spent}
    logger.info(f"search: best {describe(best, plan)}: {metric} {best.value:.4f}, test " +
                ", ".join(f"{k} {v:.4f}" for k, v in test.items()) + f"; {counted(len(trials), 'trial')}, "
                f"{result['pruned']} pruned, {counted(epochs_spent, 'epoch')}")
    return result


def table(study, plan: Plan) -> list[dict[str, Any]]:
    """One row per trial, the best first, then by value (pruned ones by their last value)."""
    state = states()
    sign = -1 if plan.search["direction"] == "max" else 1
    metric = plan.search["metric"]

    ordered = sorted(study.trials, key=lambda t: (t.state != state.COMPLETE, sign * (last_value(t) or 0)))
    return [{"trial": t.number, "state": t.state.name.lower(),
             metric: round(last_value(t), 4) if last_value(t) is not None else None,
             "epochs": t.user_attrs.get("epochs_trained", 0),
             **{key: rounded(t.params.get(key)) for key in plan.space}, "run": t.user_attrs.get("run_id", "")}
            for t in ordered]


def figures(study, plan: Plan, folder: Path) -> list[Path]:
    """The search's configured figures (search.plots), written to folder."""
    from cnnflow.components.plots import saved

    return saved("search_plot", plan.search["plots"], folder, trials=drawn(study, plan))


def drawn(study, plan: Plan):
    """The study as the search plots take it: plain data, no Optuna."""
    from cnnflow.components.search_plots import Trial, Trials

    state = states()

    def plain(trial) -> Trial:
        return Trial(trial.number, trial.state == state.COMPLETE, last_value(trial),
                     trial.user_attrs.get("epochs_trained", 0), dict(trial.params))

    ended = sorted((t for t in study.trials if t.state in (state.COMPLETE, state.PRUNED)), key=lambda t: t.datetime_complete)
    best = study.best_trial if any(t.state == state.COMPLETE for t in study.trials) else None
    return Trials(plan.study_name, plan.search["metric"], plan.search["direction"] == "max",
                  {key: bool(getattr(dist, "log", False)) for key, dist in plan.space.items()},
                  tuple(plain(t) for t in ended), plain(best) if best else None)


def last_value(trial) -> float | None:
    """A complete trial's value; a pruned one's last reported value."""
    if trial.value is not None:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None
