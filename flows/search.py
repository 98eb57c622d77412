"""`cnnflow search`: an Optuna study over a recipe's settings; each trial is one training run.

    cnnflow search experiment=fashion_mnist_fast data.source=idx data.path=DIR search.epochs=45 \\
        'model.width=int(interval(16,64))' 'optimizer.learning_rate=tag(log,interval(1e-3,2e-2))' \\
        'data.batch_size=choice(64,128,256)'

The space is written in Hydra's sweep grammar, as Hydra's Optuna sweeper reads it (or in a file of
conf/search/); every other override is fixed. The study lives in an Optuna storage (SQL beside a
SQLite MLflow store), so the same command again continues it: trials still training are taken up
where they are and no trial is counted twice. A trial is a training run tagged search=<study> and
search_trial=<n>, a child of the search's MLflow run; it never evaluates the test split
(train.test=false). When the budget is spent, the best trial alone is evaluated on test.

Pruning goes through the MLflow store alone, so a trial may train on any worker of a pool: at each
epoch end the trainer writes the epoch's metrics to its run's tag `search.report` and waits, briefly,
for the tag `search.verdict`, which this command's judge thread writes after asking the study's
pruner. A trainer that hears no verdict trains on; a judge that comes back judges what is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnflow.components.errors import (RunError, ServerOutage, SettingsError, UserError, counted, described, is_defect,
                                      is_transient)
from cnnflow.flows import report, store
from cnnflow.flows.config import Experiment, compose_config, parsed_overrides
from cnnflow.flows.engine import flow, run_logger
from cnnflow.flows.lifecycle import HeldElsewhere, Lease, store_wide_lock

REPORT_TAG, VERDICT_TAG, STATE_TAG = "search.report", "search.verdict", "search.state"
VERDICT_SECONDS = 60.0  # how long a trainer waits for a verdict before it trains on without one
JUDGE_SECONDS = 1.0  # how often the judge reads the trials' reports
MAX_FAILURES_IN_A_ROW = 3
CHANCE_MARGIN = 0.005  # a trial this close to always answering the most common class has learnt nothing


# ------------------------------------------------------------------------------------ the space

@dataclass(frozen=True)
class Plan:
    """Everything a search needs, checked before anything is created."""

    experiment: str
    fixed: list[str]
    expressions: dict[str, str]  # key -> the sweep expression as written
    space: dict[str, Any]  # key -> Optuna distribution
    search: dict[str, Any]  # the search.* settings
    cfg: dict[str, Any]  # the recipe with the fixed overrides
    study_name: str
    storage: str

    @property
    def max_epochs(self) -> int:
        return self.cfg["train"]["epochs"]


def planned(experiment: str, overrides: list[str]) -> Plan:
    """The search the command line asks for: `search=NAME` and `search.*` choose the search's own
    settings, overrides in sweep grammar make the space, the rest is fixed. Every bound of the space
    is composed and checked against the settings schema, so a range a setting does not take is
    refused here, in one line."""
    search_choice = [o for o in overrides if o.startswith("search=")][-1:] or ["search=default"]
    search_overrides = [o for o in overrides if o.startswith("search.")]
    rest = [o for o in overrides if not o.startswith(("search=", "search."))]
    expressions, fixed = _sweeps(rest)
    cfg = compose_config(experiment, [*fixed, *search_choice, *search_overrides])
    search = cfg.pop("search")
    expressions = {**search["space"], **expressions}
    if not expressions:
        raise SettingsError("search needs a space: overrides in Hydra's sweep grammar, e.g. "
                            "'model.width=int(interval(16,64))' 'data.batch_size=choice(64,128,256)', or search=NAME "
                            "for a file of conf/search/ with a space")
    if not search["trials"] and not search["epochs"]:
        raise SettingsError("search.trials=null and search.epochs=null: set a budget, e.g. search.trials=20 or "
                            "search.epochs=45")
    space = {key: distribution(key, expression) for key, expression in expressions.items()}
    for key, dist in space.items():
        for value in _extremes(dist):
            compose_config(experiment, [*fixed, as_override(key, value)])
    metric = search["metric"].removeprefix("val_")
    if metric != "loss" and metric not in cfg["train"]["metrics"]:
        raise SettingsError(f"search.metric={search['metric']!r}: the trials record val_loss and val_<m> for "
                            f"train.metrics={cfg['train']['metrics']}")
    identity = [experiment, sorted(fixed), sorted(expressions.items()),
                {k: search[k] for k in ("metric", "direction", "sampler", "startup_trials", "pruner", "seed")}]
    name = search["name"] or f"{experiment}-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:8]}"
    return Plan(experiment, fixed, expressions, space, search, cfg, name, _checked_storage(search["storage"], cfg))


def _checked_storage(url: str | None, cfg: dict[str, Any]) -> str:
    """The study's storage URL; a URL SQLAlchemy has no driver for is refused before anything is made."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if not url:
        return _default_storage(cfg)
    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise SettingsError(f"search.storage={url}: cannot open it as an Optuna storage ({str(error).splitlines()[0]}); "
                            f"give a database URL, like sqlite:///optuna.db or postgresql://USER:PASSWORD@HOST/DB") \
            from None
    return url


def _sweeps(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Overrides in sweep grammar (key -> expression) and the fixed ones."""
    expressions, fixed = {}, []
    for override, parsed in zip(overrides, parsed_overrides(overrides)):
        if parsed.is_sweep_override():
            expressions[parsed.get_key_element()] = override.partition("=")[2]
        else:
            fixed.append(override)
    return expressions, fixed


def distribution(key: str, expression: str):
    """Hydra's sweep expression as an Optuna distribution: `choice(a,b)` and `a,b` categorical,
    `range(lo,hi,step)` stepped, `interval(lo,hi)` continuous (`int(...)`: integers, `tag(log, ...)`:
    on a log scale)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    [parsed] = parsed_overrides([f"{key}={expression}"])
    value = parsed.value()
    log = "log" in getattr(value, "tags", ())
    try:
        if isinstance(value, ChoiceSweep):
            return CategoricalDistribution(list(parsed.sweep_iterator()))
        if isinstance(value, RangeSweep):
            if value.step <= 0 or value.start >= value.stop:  # Optuna would name a bound it made, not the user's
                raise ValueError("range(start,stop,step) counts up from start by a step above 0 and stops before "
                                 "stop, so it needs start < stop (e.g. range(16,64,16): 16, 32, 48); choice(...) takes "
                                 "values in any order")
            # the last value the range reaches, so the distribution's bounds are the range's own values
            last = value.start + value.step * math.ceil(round((value.stop - value.start) / value.step - 1, 9))
            if all(isinstance(n, int) for n in (value.start, value.stop, value.step)):
                return IntDistribution(value.start, int(last), log=log, step=value.step)
            return FloatDistribution(value.start, last, step=value.step)
        if isinstance(value, IntervalSweep):
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log)
            return FloatDistribution(value.start, value.end, log=log)
    except ValueError as error:  # Optuna's own refusal: low > high, log of 0, ...
        raise SettingsError(f"{key}={expression}: {error}") from None
    raise SettingsError(f"{key}={expression}: a search space is choice(...), range(...) or interval(...) (with "
                        f"int(...) and tag(log, ...)), or a,b,c")


def _extremes(dist) -> list:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def as_override(key: str, value: Any) -> str:
    """A sampled value as the override that sets it (a string quoted unless it is a plain word)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        value = "'" + value.replace("'", "\\'") + "'"
    elif isinstance(value, float):
        value = repr(value)
    return f"{key}={value}"


def _default_storage(cfg: dict[str, Any]) -> str:
    """Beside a SQLite MLflow store (optuna.db next to mlflow.db); else optuna.db in this folder."""
    uri = store.tracking_uri(cfg)
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def shown(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ------------------------------------------------------------------------------------ the study

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


def _states():
    from optuna.trial import TrialState

    return TrialState


def epochs_for_next_trial(study, plan: Plan) -> int:
    """How many epochs the next trial may train (0: the budget is spent). Running trials keep what
    they were given, so the epoch budget is never overrun; the last trial may get fewer epochs."""
    state = _states()
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
    return [*plan.fixed, *sampled, *shorter, "train.test=false", f"+tags.search='{plan.study_name}'",
            f"+tags.search_trial={trial.number}"]


def new_trial(study, plan: Plan, epochs: int):
    trial = study.ask(plan.space)
    trial.set_user_attr("epochs", epochs)
    trial.set_user_attr("overrides", trial_overrides(plan, trial, epochs))
    return trial


def describe(trial, plan: Plan) -> str:
    values = " ".join(as_override(key, _rounded(trial.params[key])) for key in plan.space)
    return f"trial {trial.number} ({values})"


def _rounded(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def trial_run(plan: Plan, number: int):
    """The MLflow run of trial `number`, newest first, or None."""
    import mlflow

    runs = mlflow.search_runs([store.experiment_id(plan.cfg)], output_format="list", max_results=1,
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.search = '{plan.study_name}' and tags.search_trial = '{number}'")
    return runs[0] if runs else None


def concluded(study, plan: Plan, number: int, failure: str | None = None) -> str:
    """Tell the study how trial `number` ended, from its MLflow run; returns one line saying it."""
    from mlflow import MlflowClient

    state = _states()
    trial = study.trials[number]
    run = trial_run(plan, number)
    pruned = run is not None and run.data.tags.get(STATE_TAG, "").startswith("pruned")  # a diverged one too
    if not pruned and (failure or run is None or run.info.status != "FINISHED"):
        why = failure or (f"its run {run.info.run_id} ended {run.info.status}" if run else "it has no MLflow run")
        if run:
            MlflowClient().set_tag(run.info.run_id, STATE_TAG, f"failed: {why}"[:500])
        study.tell(number, state=state.FAIL)  # last: a step repeated after an outage finds the trial untold
        return f"{describe(trial, plan)}: failed ({why}); another trial takes its place"
    reported = json.loads(run.data.tags.get(REPORT_TAG) or "{}")
    epochs = reported.get("epoch") or trial.user_attrs.get("epochs", plan.max_epochs)
    study._storage.set_trial_user_attr(trial._trial_id, "run_id", run.info.run_id)
    study._storage.set_trial_user_attr(trial._trial_id, "epochs_trained", epochs)
    metric = plan.search["metric"]
    value = reported.get("logs", {}).get(metric)
    if value is not None and epochs not in trial.intermediate_values:  # the last epoch, which has no verdict
        study._storage.set_trial_intermediate_value(trial._trial_id, epochs, value)
    if pruned:
        study.tell(number, state=state.PRUNED)
        shown = "" if value is None else f", {metric} {value:.4f}"
        return f"{describe(trial, plan)}: {run.data.tags[STATE_TAG]}{shown}  (run {run.info.run_id})"
    value = run.data.metrics[metric]
    MlflowClient().set_tag(run.info.run_id, STATE_TAG, "complete")
    study.tell(number, value)
    return f"{describe(trial, plan)}: complete after {counted(epochs, 'epoch')}, {metric} {value:.4f}  (run {run.info.run_id})"


# ------------------------------------------------------------------------------------ pruning

class Judge:
    """The search's side of pruning: every JUDGE_SECONDS it reads the reports of the study's running
    trial runs in MLflow, reports each new epoch to the study, and writes the pruner's verdict. It
    also makes each trial run a child of the search's run."""

    def __init__(self, study, plan: Plan, parent_run_id: str, logger):
        self.study, self.plan, self.parent, self.logger = study, plan, parent_run_id, logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cnnflow-search-judge", daemon=True)
        self._failing = False

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        # bounded: in an outage a call of the judge's can sit in MLflow's retries for minutes, and its
        # verdicts would concern trials this search no longer runs (it is a daemon thread)
        self._thread.join(timeout=10 * JUDGE_SECONDS)

    def _loop(self) -> None:
        while not self._stop.wait(JUDGE_SECONDS):
            try:
                self.judge_reports()
                if self._failing:
                    self.logger.info("search: the judge reaches the MLflow store again")
                self._failing = False
            except Exception as error:  # a store outage (or a bug, named): the trainers train on meanwhile
                if not self._failing:
                    self.logger.warning(f"search: cannot read the trials' reports ({described(error)}); "
                                        f"trials train on without verdicts until the store answers")
                self._failing = True

    def judge_reports(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient()
        runs = mlflow.search_runs([store.experiment_id(self.plan.cfg)], output_format="list",
                                  filter_string=f"tags.search = '{self.plan.study_name}' and attributes.status = 'RUNNING'")
        for run in runs:
            tags = run.data.tags
            if tags.get("mlflow.parentRunId") != self.parent:
                client.set_tag(run.info.run_id, "mlflow.parentRunId", self.parent)
            reported = json.loads(tags.get(REPORT_TAG) or "null")
            judged = json.loads(tags.get(VERDICT_TAG) or "null")
            if not reported or (judged and judged["epoch"] >= reported["epoch"]):
                continue
            prune, why = self.verdict(int(tags["search_trial"]), reported["epoch"], reported["logs"],
                                      reported.get("chance") or {})
            if prune is not None:
                client.set_tag(run.info.run_id, VERDICT_TAG,
                               json.dumps({"epoch": reported["epoch"], "prune": prune, "why": why}))

    def verdict(self, number: int, epoch: int, logs: dict[str, float],
                chance: dict[str, float]) -> tuple[bool | None, str]:
        """Whether trial `number` stops after `epoch`, and why (None: it is no longer running). A trial
        that learns nothing (at chance level) or diverges stops whatever the pruner's brackets say: with
        few trials, a bracket may hold nobody to compare it with."""
        import optuna

        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        frozen = self.study._storage.get_trial(trial_id)
        if frozen.state != _states().RUNNING:
            return None, ""
        trial = optuna.trial.Trial(self.study, trial_id)
        value = logs.get(self.plan.search["metric"])
        if value is None:
            return False, ""
        if epoch not in frozen.intermediate_values and math.isfinite(value):
            trial.report(value, epoch)
        hopeless = hopeless_because(logs, chance)
        if hopeless:
            return True, hopeless
        return bool(trial.should_prune()), "weaker than its peers were at this epoch"  # numpy's bool, from some pruners


def diverged_trial(run_id: str, where: dict[str, Any]) -> None:
    """A trial whose training diverged is pruned at that epoch, not failed: its values are a region of
    the space the sampler learns to avoid (Optuna's samplers learn from pruned trials, not from failed
    ones), and it is no failure of the search's to count towards stopping it."""
    store.set_tags(run_id, {
        STATE_TAG: f"pruned at epoch {where['epoch']}: diverged (the loss became {where['loss']:.4g} at batch "
                   f"{where['batch']})",
        REPORT_TAG: json.dumps({"epoch": where["epoch"], "logs": {}})})


def hopeless_because(logs: dict[str, float], chance: dict[str, float]) -> str:
    """Why a trial's epoch says it will not learn (its loss not finite, or validation no better than
    always answering the most common class), or ""."""
    broken = sorted(name for name, value in logs.items() if not math.isfinite(value))
    if broken:
        return f"diverged ({', '.join(f'{name} {logs[name]}' for name in broken)})"
    # on training and validation both: validation alone may sit at chance while training learns (a batch
    # normalisation whose moving statistics lag after an epoch of few steps), and comes up later
    majority = chance.get("val_accuracy")
    accuracies = [logs[name] for name in ("val_accuracy", "accuracy") if name in logs]
    if majority is not None and accuracies and all(value <= majority + CHANCE_MARGIN for value in accuracies):
        shown = ", ".join(f"{name} {logs[name]:.4f}" for name in ("accuracy", "val_accuracy") if name in logs)
        return f"at chance level ({shown}; always answering the most common class gives {majority:.4f})"
    return ""


class Verdicts:
    """The trainer's side of pruning, as a Keras callback (flows/train.py adds it to a trial's
    training): at each epoch end the epoch's metrics go to the run's tag `search.report`; then it
    waits for the judge's verdict on that epoch, and a `prune` stops the training after it."""

    def __init__(self, run_id: str, last_epoch: int, logger, chance: dict[str, float] | None = None,
                 wait: float = VERDICT_SECONDS):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(inner, epoch, logs=None):
                if self.pruned_after(epoch + 1, logs or {}):
                    inner.model.stop_training = True

        self.callback = Callback()
        self.run_id, self.last_epoch, self.logger, self.wait = run_id, last_epoch, logger, wait
        self.chance = chance or {}  # what validation gives without learning (flows/train.py measures it)

    def pruned_after(self, epoch: int, logs: dict[str, Any]) -> bool:
        from mlflow import MlflowClient

        client = MlflowClient()
        try:
            client.set_tag(self.run_id, REPORT_TAG, json.dumps({"epoch": epoch, "chance": self.chance, "logs": {
                name: float(value) for name, value in logs.items()}}))
        except Exception as error:  # the store is out: the outbox keeps the training's own writes
            self.logger.warning(f"search: could not report epoch {epoch} ({described(error)}); training on")
            return False
        if epoch >= self.last_epoch:
            return False
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            try:
                verdict = json.loads(client.get_run(self.run_id).data.tags.get(VERDICT_TAG) or "null")
                if verdict and verdict["epoch"] >= epoch:
                    if verdict["prune"]:
                        why = verdict.get("why") or "weaker than its peers were at this epoch"
                        client.set_tag(self.run_id, STATE_TAG, f"pruned at epoch {epoch}: {why}")
                        self.logger.info(f"search: pruned after epoch {epoch}: {why}")
                    return bool(verdict["prune"])
            except Exception as error:  # the store is out: the wait below bounds it
                if is_defect(error):
                    raise
            time.sleep(0.3)
        self.logger.warning(f"search: no verdict on epoch {epoch} within {self.wait:.0f} s (is the search command "
                            f"running?); training on, and waiting at most 5 s from now on")
        self.wait = 5.0
        return False


# ------------------------------------------------------------------------------------ the flow

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
    state = _states()
    with _parent_run(study, plan, uri, logger) as parent, Judge(study, plan, parent, logger):
        done = [t for t in study.trials if t.state.is_finished()]  # read once this command holds the study
        if study.trials:
            logger.info(f"search: continuing study {plan.study_name}: {counted(len(done), 'trial')} done, "
                        f"{sum(t.state == state.RUNNING for t in study.trials)} to take up")
        if pool:
            _run_on_pool(study, plan, pool, logger)
        else:
            _run_here(study, plan, logger)
        summary = _summary(study, plan, parent, logger)
    return summary


def _run_here(study, plan: Plan, logger) -> None:
    """Trials one after another in this process; a trial the last command left running first."""
    state = _states()
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
    from cnnflow.flows.lifecycle import HeldElsewhere
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
    from cnnflow.flows.outbox import failing_fast, outage_reason

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

    from cnnflow.flows import serve
    from cnnflow.flows.outbox import outage_reason

    state = _states()
    in_flight = {t.number: t.user_attrs.get("flow_run_id") for t in study.trials if t.state == state.RUNNING}
    failures, unanswered = 0, False
    with get_client(sync_client=True) as client:
        while True:
            try:
                for number, flow_run_id in list(in_flight.items()):
                    run = client.read_flow_run(flow_run_id) if flow_run_id else None
                    if run is not None and not serve.has_ended(run):
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
                    [flow_run] = serve.submitted(pool, [(plan.experiment, trial.user_attrs["overrides"])])
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
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
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
    store.set_tags(run_id, {"search.study": plan.study_name, "search.budget.trials": plan.search["trials"],
                            "search.budget.epochs": plan.search["epochs"], "cnnflow.experiment": plan.experiment})
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


def _summary(study, plan: Plan, parent: str, logger) -> dict:
    """The best trial evaluated on test (once per study), figures and the table on the search's run."""
    from mlflow import MlflowClient

    from cnnflow.flows.inference import evaluate_flow

    state = _states()
    trials = study.trials
    complete = [t for t in trials if t.state == state.COMPLETE]
    if not complete:
        raise RunError(f"no trial of study {plan.study_name} completed ({len(trials)} tried); nothing to evaluate")
    best = study.best_trial
    client = MlflowClient()
    recorded = client.get_run(parent).data
    test = {k.removeprefix("best_test_"): v for k, v in recorded.metrics.items() if k.startswith("best_test_")}
    if not test or recorded.tags.get("search.best_trial") != str(best.number):
        test = evaluate_flow(best.user_attrs["run_id"], "test")
        store.log_metrics(parent, {f"best_test_{name}": value for name, value in test.items()})
    metric = plan.search["metric"]
    store.set_tags(parent, {"search.best_trial": best.number, "search.best_run": best.user_attrs["run_id"],
                            "search.best_params": " ".join(as_override(k, _rounded(v)) for k, v in best.params.items())})
    epochs_spent = sum(t.user_attrs.get("epochs_trained", 0) for t in trials)
    store.log_metrics(parent, {f"best_{metric}": best.value, "epochs_spent": epochs_spent, "trials": len(trials),
                               "trials_pruned": sum(t.state == state.PRUNED for t in trials)})
    rows = table(study, plan)
    client.log_table(parent, {key: [row[key] for row in rows] for key in rows[0]}, "trials.json")
    for path in figures(study, plan, store.run_folder(parent, plan.cfg)):
        client.log_artifact(parent, str(path), "figures")
    report.publish_table(f"search-{plan.study_name}", rows, f"search {plan.study_name}: every trial, best first")
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
    state = _states()
    sign = -1 if plan.search["direction"] == "max" else 1
    metric = plan.search["metric"]

    ordered = sorted(study.trials, key=lambda t: (t.state != state.COMPLETE, sign * (last_value(t) or 0)))
    return [{"trial": t.number, "state": t.state.name.lower(),
             metric: round(last_value(t), 4) if last_value(t) is not None else None,
             "epochs": t.user_attrs.get("epochs_trained", 0),
             **{key: _rounded(t.params.get(key)) for key in plan.space}, "run": t.user_attrs.get("run_id", "")}
            for t in ordered]


def figures(study, plan: Plan, folder: Path) -> list[Path]:
    """best-so-far against epochs spent; each parameter against the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = _states()
    metric, better = plan.search["metric"], (max if plan.search["direction"] == "max" else min)
    folder.mkdir(parents=True, exist_ok=True)
    ended = sorted((t for t in study.trials if t.state in (state.COMPLETE, state.PRUNED)),
                   key=lambda t: t.datetime_complete)
    spent, best, xs, ys, points = 0, None, [], [], []
    for t in ended:
        spent += t.user_attrs.get("epochs_trained", 0)
        if t.state == state.COMPLETE:
            best = t.value if best is None else better(best, t.value)
        points.append((spent, last_value(t), t.state == state.COMPLETE))
        if best is not None:
            xs.append(spent)
            ys.append(best)
    figure, axes = plt.subplots(figsize=(6.4, 4))
    axes.step(xs, ys, where="post", color="tab:blue", label=f"best {metric} so far")
    for done in (True, False):
        chosen = [(x, y) for x, y, c in points if c == done and y is not None]
        if chosen:
            axes.scatter(*zip(*chosen), s=28, label="complete trial" if done else "pruned trial (last value)",
                         color="tab:blue" if done else "none", edgecolors="tab:blue" if done else "tab:grey")
    axes.set(xlabel="epochs spent (all trials)", ylabel=metric,
             title=f"best {metric} against epochs spent\nsearch {plan.study_name}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right" if plan.search["direction"] == "max" else "upper right", fontsize=8)
    paths = [folder / "best_so_far.png"]
    figure.tight_layout()
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)

    figure, all_axes = plt.subplots(1, len(plan.space), figsize=(3.6 * len(plan.space), 3.4), squeeze=False)
    best_trial = study.best_trial if any(t.state == state.COMPLETE for t in study.trials) else None
    for axes, (key, dist) in zip(all_axes[0], plan.space.items()):
        for done in (True, False):
            chosen = [(t.params[key], last_value(t)) for t in ended
                      if (t.state == state.COMPLETE) == done and last_value(t) is not None]
            if chosen:
                axes.scatter(*zip(*chosen), s=28, color="tab:blue" if done else "none",
                             edgecolors="tab:blue" if done else "tab:grey",
                             label="complete" if done else "pruned (last value)")
        if best_trial:
            axes.scatter([best_trial.params[key]], [best_trial.value], s=120, marker="*", color="tab:orange",
                         label=f"best (trial {best_trial.number})", zorder=3)
        if getattr(dist, "log", False):
            axes.set_xscale("log")
        axes.set(xlabel=key, ylabel=metric)
        axes.grid(alpha=0.3)
    all_axes[0][0].legend(fontsize=7)
    figure.suptitle(f"each setting against {metric} (pruned trials: their last value)\nsearch {plan.study_name}")
    figure.tight_layout()
    paths.append(folder / "parameters.png")
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths


def last_value(trial) -> float | None:
    """A complete trial's value; a pruned one's last reported value."""
    if trial.value is not None:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None
